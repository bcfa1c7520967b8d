"""The inputs every planner entry point takes, loaded and checked in one place."""

from __future__ import annotations

import math
from pathlib import Path

from tera.models.spec import LIMITS
from tera.planner.layout import LayoutError

# The longest sequence the planner takes, the longest any model may declare: its attention
# scores (heads x seq_len^2) still fit torch's int64 sizes on the meta device.
MAX_SEQ_LEN = LIMITS["max_seq_len"]


def load_problem(
    model, cluster, gpus, precision: str, global_batch: int, seq_len: int, imbalance: float = 1.0
):
    """(ModelSpec, Cluster) for a spec, preset name or YAML path and a Cluster, preset
    name or YAML path (sized to `gpus` when given), after checking the precision, the
    batch, the sequence length and the routing imbalance; a bad one raises LayoutError."""
    from tera.models import ModelSpec, load_spec
    from tera.planner.cost import PRECISIONS
    from tera.topologies import load

    spec = model if isinstance(model, ModelSpec) else load_spec(model)
    if isinstance(cluster, (str, Path)):
        cluster = load(cluster, gpus=gpus)
    elif gpus is not None and gpus != cluster.num_gpus:
        raise LayoutError("gpus", f"{gpus} given for a {cluster.num_gpus}-GPU cluster", "pass one")
    if precision not in PRECISIONS:
        raise LayoutError("precision", f"unknown {precision!r}", f"use {'|'.join(PRECISIONS)}")
    for name, value in (("global_batch", global_batch), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LayoutError(name, f"must be a positive integer, got {value!r}", "fix it")
    if seq_len > MAX_SEQ_LEN:
        raise LayoutError(
            "seq_len", f"{seq_len} is more than the {MAX_SEQ_LEN} tokens tera supports", "fix it"
        )
    check_traceable(spec)
    check_imbalance(imbalance, spec)
    return spec, cluster


# torch._grouped_mm, which runs the experts in a trace on the meta device, takes operands
# whose strides are multiples of 16 bytes: 8 bf16 elements (kernels/grouped_gemm.py).
GROUPED_MM_MULTIPLE = 8


def check_traceable(spec) -> None:
    """Refuse a model the trace cannot run: an MoE model whose hidden or expert width is
    not a multiple of GROUPED_MM_MULTIPLE (every published model's widths are)."""
    from tera.models import SpecError

    if spec.moe is None:
        return
    for name, width in (("hidden", spec.hidden), ("moe.expert_hidden", spec.moe.expert_hidden)):
        if width % GROUPED_MM_MULTIPLE:
            raise SpecError(
                name,
                f"{width} is not a multiple of {GROUPED_MM_MULTIPLE}, which the planner's "
                "trace of the experts needs (torch._grouped_mm's 16-byte strides)",
                f"use a multiple of {GROUPED_MM_MULTIPLE}",
            )


def check_imbalance(imbalance, spec) -> None:
    """The busiest expert's load over the mean is a finite number from 1 (balanced) to
    experts/top_k (every token picks that expert: its load T against a mean of T*k/E)."""
    if isinstance(imbalance, bool) or not isinstance(imbalance, (int, float)):
        raise LayoutError("imbalance", f"expected a number, got {imbalance!r}", "e.g. 1.2")
    most = spec.moe.experts / spec.moe.top_k if spec.moe is not None else math.inf
    try:
        value = float(imbalance)
    except OverflowError:  # an integer past float's range
        value = math.inf
    if not (math.isfinite(value) and 1.0 <= value <= most):
        bound = f"in [1, {most:g}] (experts/top_k)" if spec.moe is not None else ">= 1"
        raise LayoutError(
            "imbalance",
            f"{imbalance!r} is not the busiest expert's load over the mean",
            f"use a finite number {bound}; 1.0 is balanced routing",
        )
