"""The inputs every planner entry point takes, loaded and checked in one place."""

from __future__ import annotations

from pathlib import Path

from tera.planner.layout import LayoutError


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
        if not isinstance(value, int) or value < 1:
            raise LayoutError(name, f"must be a positive integer, got {value!r}", "fix it")
    if imbalance < 1.0:
        raise LayoutError("imbalance", f"{imbalance} < 1", "the busiest expert is >= the mean")
    return spec, cluster
