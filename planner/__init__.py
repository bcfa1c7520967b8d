"""tera.planner."""
