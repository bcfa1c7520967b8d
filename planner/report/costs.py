"""What the report's charts need from the cost model that a plan file does not store: the
forward and backward seconds of every virtual chunk (for the schedule) and the memory
parts of every stage (the plan keeps the parts of the fullest stage only).

The plan's own prediction stays the source of every number in the summary; these views
come from costing the plan's layout again with today's calibration and balanced routing
(a plan does not record --imbalance), so `estimate` is returned too and the page says so
when its step time differs from the plan's.
"""

from __future__ import annotations

from dataclasses import dataclass

from tera.planner.cost.estimate import Estimate, GiB

# Relative step-time difference above which the page says the charts were costed anew.
STALE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class CostViews:
    estimate: Estimate  # the cost model's estimate of the plan's layout now
    forward: list[list[float]]  # [stage][local chunk] seconds per micro-batch
    backward: list[list[float]]  # the same for the backward, recompute included
    stage_memory_gib: list[dict[str, float]]  # per stage: params, grads, optimizer, ...

    @property
    def pipeline_s(self) -> float:
        """The cost model's pipeline seconds per step: the step less the data-parallel
        collectives and the optimizer, which run outside the schedule."""
        b = self.estimate.breakdown_s
        return self.estimate.step_time_s - b["dp_comm"] - b["optimizer"]

    def differs_from(self, prediction: dict) -> bool:
        """Whether the plan's stored step time is not what the cost model gives now."""
        stored = prediction["step_time_s"]
        return abs(self.estimate.step_time_s - stored) > STALE_TOLERANCE * max(stored, 1e-30)


def cost_views(plan) -> CostViews:
    """Cost the plan's layout (traces the model: about a second for the largest presets)."""
    from tera.planner.cost import CostModel
    from tera.planner.trace import trace

    graph = trace(plan.spec, plan.seq_len)
    model = CostModel(graph, plan.cluster, plan.layout, plan.global_batch, plan.precision)
    chunks = model.chunk_times()
    return CostViews(
        estimate=model.estimate(plan.spec.name),
        forward=[[t.forward for t in row] for row in chunks],
        backward=[[t.backward for t in row] for row in chunks],
        stage_memory_gib=[
            {part: value / GiB for part, value in memory.as_dict().items()}
            for memory in model.stage_memories
        ],
    )
