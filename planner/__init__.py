"""tera.planner: trace a model to the Graph IR, cost layouts, solve, emit plans.

Python API mirroring the CLI (`tera-plan evaluate`): `evaluate(model, cluster, gpus,
layout, global_batch, seq_len, precision)`. Importing this package is cheap; torch is
imported when a model is traced.
"""

from __future__ import annotations

from pathlib import Path

from tera.planner.layout import Layout, LayoutError

__all__ = ["Layout", "LayoutError", "evaluate"]


def evaluate(
    model,
    cluster,
    layout,
    global_batch: int,
    seq_len: int,
    gpus: int | None = None,
    precision: str = "bf16",
    imbalance: float = 1.0,
):
    """Cost one layout. `model` is a ModelSpec, preset name or YAML path; `cluster` a
    Cluster, preset name or YAML path (sized to `gpus` when given); `layout` a Layout or
    layout string. Returns a tera.planner.cost.Estimate."""
    from tera.models import ModelSpec, load_spec
    from tera.planner.cost import PRECISIONS, CostModel
    from tera.planner.trace import trace
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
    parsed = layout if isinstance(layout, Layout) else Layout.parse(layout)
    resolved = parsed.resolve(spec, cluster.num_gpus, global_batch, seq_len)
    graph = trace(spec, seq_len)
    cost = CostModel(graph, cluster, resolved, global_batch, precision, imbalance)
    return cost.estimate(spec.name)
