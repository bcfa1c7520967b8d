"""The plan's headline numbers as one JSON-ready dict: `tera-plan show --json` prints it,
and the page and the terminal summary render it.

Every prediction comes from the plan file as written (`plan.prediction`), never from
costing the layout again; what the file does not store is derived from it: total
tokens/s, micro-batches (global batch / (dp * mbs)) and the dollars at the planner's
default price per GPU-hour (tera.planner.solve.search.DEFAULT_PRICE_PER_GPU_HOUR, sourced
there). Keys follow `evaluate --json` where they mean the same.
"""

from __future__ import annotations

GiB = 2**30


def summary(plan) -> dict:
    from tera.planner.solve.search import DEFAULT_PRICE_PER_GPU_HOUR

    p, layout, gpus = plan.prediction, plan.layout, plan.world_size
    step = p["step_time_s"]
    tokens_per_step = plan.global_batch * plan.seq_len
    usd_per_step = gpus * step / 3600 * DEFAULT_PRICE_PER_GPU_HOUR
    return {
        "model": plan.spec.name,
        "cluster": plan.cluster.name,
        "gpu": plan.cluster.gpu.name,
        "gpus": gpus,
        "gpus_per_node": plan.cluster.gpus_per_node,
        "nodes": len({node for node, _ in plan.rank_map()}),
        "layout": str(layout),
        "global_batch": plan.global_batch,
        "seq_len": plan.seq_len,
        "precision": plan.precision,
        "microbatches": plan.global_batch // (layout.dp * layout.mbs),
        "step_time_s": step,
        "tokens_per_s": tokens_per_step / step,
        "tokens_per_s_per_gpu": p.get("tokens_per_s_per_gpu", tokens_per_step / step / gpus),
        "model_tflops_per_gpu": p.get("model_tflops_per_gpu"),
        "mfu": p["mfu"],
        "peak_memory_gib": p["peak_memory_gib"],
        "hbm_gib": p.get("hbm_gib", plan.cluster.gpu.hbm_bytes / GiB),
        "fits": p["fits"],
        "price_per_gpu_hour_usd": DEFAULT_PRICE_PER_GPU_HOUR,
        "usd_per_step": usd_per_step,
        "usd_per_million_tokens": usd_per_step / tokens_per_step * 1e6,
        "breakdown_s": p["breakdown_s"],
        "memory_gib": p["memory_gib"],
        "stage_memory_gib": p.get("stage_memory_gib"),
        "certificate": plan.certificate,
        "alternatives": plan.alternatives,
    }
