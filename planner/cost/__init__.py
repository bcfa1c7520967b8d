"""tera.planner.cost: step time, throughput and memory of a layout on a cluster."""

from tera.planner.cost.estimate import PRECISIONS, CostModel, Estimate

__all__ = ["PRECISIONS", "CostModel", "Estimate"]
