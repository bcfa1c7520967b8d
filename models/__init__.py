"""tera.models: the MoE transformer family (pure torch, no torch.distributed) and its presets.

Importing this package does not import torch; `build` does.
"""

from tera.models.spec import (
    AttentionSpec,
    FFNSpec,
    ModelSpec,
    MoESpec,
    SpecError,
    load_spec,
    preset_names,
)

__all__ = [
    "AttentionSpec",
    "FFNSpec",
    "ModelSpec",
    "MoESpec",
    "SpecError",
    "build",
    "ParamCounts",
    "load_spec",
    "param_counts",
    "preset_names",
]


def build(spec: ModelSpec, device: str = "cpu", dtype=None, **options):
    """Build the torch module for `spec` (see tera.models.transformer.Transformer)."""
    from tera.models.transformer import Transformer

    return Transformer(spec, device=device, dtype=dtype, **options)


class ParamCounts:
    """Parameter counts of a built model: `total` counts every parameter once (a tied LM
    head is the embedding), `active` counts what one token uses: routed experts only
    top_k of experts times."""

    def __init__(self, total: int, active: int):
        self.total, self.active = total, active

    def __repr__(self) -> str:
        return f"ParamCounts(total={self.total:,}, active={self.active:,})"


def param_counts(spec: ModelSpec) -> ParamCounts:
    """Count parameters on a `meta` build of `spec` (no memory is allocated)."""
    from tera.models.moe import Experts

    model = build(spec, device="meta")
    total = sum(p.numel() for p in model.parameters())
    idle = 0
    for module in model.modules():
        if isinstance(module, Experts):
            routed = sum(p.numel() for p in module.parameters())
            idle += routed * (spec.moe.experts - spec.moe.top_k) // spec.moe.experts
    return ParamCounts(total, total - idle)
