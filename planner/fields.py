"""The numeric fields of a Graph IR node (planner/trace.py documents each).

A module of its own, free of torch, so that the cost model can sum the fields without
importing the tracer."""

NODE_FIELDS = (
    "fwd_flops",
    "bwd_flops",
    "fwd_bytes",
    "bwd_bytes",
    "fwd_weight_bytes",
    "bwd_weight_bytes",
    "params",
    "param_bytes",
    "saved_bytes",
    "saved_lowp_bytes",
)
