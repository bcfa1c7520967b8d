"""tera.planner.cost: the cost model."""
