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
    "load_spec",
    "preset_names",
]


def build(spec: ModelSpec, device: str = "cpu", dtype=None, **options):
    """Build the torch module for `spec` (see tera.models.transformer.Transformer)."""
    from tera.models.transformer import Transformer

    return Transformer(spec, device=device, dtype=dtype, **options)
