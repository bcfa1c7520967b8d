"""tera.planner: trace a model to the Graph IR, cost layouts, solve, emit plans.

Python API mirroring the CLI (`tera-plan evaluate`): `evaluate(model, cluster, gpus,
layout, global_batch, seq_len, precision)`. Importing this package is cheap; torch is
imported when a model is traced.
"""

from __future__ import annotations

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
    from tera.planner.cost import CostModel
    from tera.planner.inputs import load_problem
    from tera.planner.trace import trace

    spec, cluster = load_problem(model, cluster, gpus, precision, global_batch, seq_len, imbalance)
    parsed = layout if isinstance(layout, Layout) else Layout.parse(layout)
    resolved = parsed.resolve(spec, cluster.num_gpus, global_batch, seq_len)
    graph = trace(spec, seq_len)
    cost = CostModel(graph, cluster, resolved, global_batch, precision, imbalance)
    return cost.estimate(spec.name)
