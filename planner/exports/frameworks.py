"""torchtitan and DeepSpeed configurations of a plan.

torchtitan: a TOML document whose [training] and [parallelism] keys are field names of
torchtitan's TrainingConfig and ParallelismConfig (torchtitan.config.configs; a test checks
them when torchtitan is installed) and whose [activation_checkpoint] mode is none, selective
or full. torchtitan >= 0.3 builds its config in Python (config_registry) and takes
overrides on the command line, `--section.key value`, one per TOML key, and the
activation-checkpoint policy as a subcommand (full | selective | none); the header comment
says so. Mapping: data_parallel_replicate_degree = dp_replicate, data_parallel_shard_degree
= dp_shard (torchtitan always shards that axis with FSDP2, so zero=0 is written like
zero 1 with a note, which keeps EP's borrowed ranks intact); zero 1 and 2 keep FSDP2's
parameters gathered between forward and backward (fsdp_reshard_after_forward = "never"),
zero 3 reshards them ("always"). With pp > 1 each virtual chunk's modules are listed
(module_fqns_per_model_part, torchtitan's llama/deepseek module names), so any partition is
exact; torchtitan's micro-batches are pipeline_parallel_microbatch_size within
local_batch_size = global batch / dp, and without pp the gradient accumulation steps are
global_batch_size / (local_batch_size * dp). torchtitan has no expert tensor parallelism
(experts are not split by tp), so etp > 1 is refused.

DeepSpeed: ds_config.json with train_batch_size = train_micro_batch_size_per_gpu *
gradient_accumulation_steps * dp, zero_optimization.stage, bf16 and gradient_clipping 1.0
(the plan holds no clipping value; 1.0 is the usual setting, change it freely). tp, pp, cp
and ep live in the model code (Megatron-DeepSpeed flags, PipelineModule(num_stages=pp)),
not in this file. DeepSpeed's pipeline engine refuses ZeRO 2 and 3, and shards ZeRO 1 and 2
state over the whole data-parallel group, so those plans are refused; zero=3 with
dp_replicate > 1 is MiCS (mics_shard_size = dp_shard). fp8 runs through Transformer Engine
in the model; the config holds its bf16 part.
"""

from __future__ import annotations

import json

from tera.planner.exports import ExportError, microbatches, strongest_recompute, summary
from tera.planner.plan import Plan

TORCHTITAN_KEYS = {
    "training": (
        "local_batch_size", "global_batch_size", "seq_len", "max_norm", "mixed_precision_param",
    ),
    "parallelism": (
        "data_parallel_replicate_degree", "data_parallel_shard_degree",
        "fsdp_reshard_after_forward", "tensor_parallel_degree", "enable_sequence_parallel",
        "pipeline_parallel_degree", "pipeline_parallel_schedule",
        "pipeline_parallel_microbatch_size", "module_fqns_per_model_part",
        "context_parallel_degree", "expert_parallel_degree",
    ),
    "activation_checkpoint": ("mode",),
}  # fmt: skip
PRECISION_DTYPE = {"bf16": "bfloat16", "fp8": "bfloat16", "fp32": "float32"}


def torchtitan(plan: Plan) -> str:
    lay = plan.layout
    if lay.etp > 1:
        raise ExportError(
            "torchtitan",
            "etp",
            f"etp={lay.etp}: torchtitan has no expert tensor parallelism",
            "use etp=1",
        )
    notes = []
    mode, note = strongest_recompute(plan)
    if note:
        notes.append(note)
    if lay.order != "tp-cp-dp-pp":
        notes.append(
            f"order={lay.order}: torchtitan's mesh order is fixed (pp, dp_replicate, "
            "dp_shard, cp, tp, outermost first), so ranks land as in tp-cp-dp-pp"
        )
    if plan.precision == "fp8":
        notes.append("fp8: enable torchtitan's float8 model converter as well")
    if lay.zero == 0:
        notes.append(
            "zero=0: torchtitan shards the data-parallel dimension with FSDP2 whatever the "
            "stage; without resharding after forward, memory stays within the plan"
        )
    if lay.pp > 1:
        local = plan.global_batch // lay.dp
    else:
        local = lay.mbs
    training = {
        "local_batch_size": local,
        "global_batch_size": plan.global_batch,
        "seq_len": plan.seq_len,
        "max_norm": 1.0,
        "mixed_precision_param": PRECISION_DTYPE[plan.precision],
    }
    parallelism: dict = {
        "data_parallel_replicate_degree": lay.dp_replicate,
        "data_parallel_shard_degree": lay.dp_shard,
        "fsdp_reshard_after_forward": "always" if lay.zero == 3 else "never",
        "tensor_parallel_degree": lay.tp,
        "enable_sequence_parallel": lay.tp > 1,
        "context_parallel_degree": lay.cp,
        "expert_parallel_degree": lay.ep,
        "pipeline_parallel_degree": lay.pp,
    }
    if lay.pp > 1:
        parallelism["pipeline_parallel_schedule"] = "Interleaved1F1B" if lay.vpp > 1 else "1F1B"
        parallelism["pipeline_parallel_microbatch_size"] = lay.mbs
        parallelism["module_fqns_per_model_part"] = _model_parts(plan)
    sections = {
        "training": training,
        "parallelism": parallelism,
        "activation_checkpoint": {"mode": mode},
    }
    lines = [
        f"# {summary(plan)}",
        *(f"# note: {n}" for n in notes),
        "# torchtitan >= 0.3: pass each key as `--section.key value` after --module/--config,",
        f"# and the activation checkpointing policy as the subcommand `{mode}`.",
    ]
    for name, values in sections.items():
        lines += ["", f"[{name}]"] + [f"{k} = {_toml(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def _model_parts(plan: Plan) -> list[list[str]]:
    parts, first = [], 0
    for blocks in plan.layout.partition:
        parts.append([f"layers.{i}" for i in range(first, first + blocks)])
        first += blocks
    parts[0].insert(0, "tok_embeddings")
    parts[-1] += ["norm", "output"]
    return parts


def _toml(value) -> str:
    """A TOML value: JSON's strings, numbers, booleans and arrays are TOML's."""
    return json.dumps(value)


def deepspeed(plan: Plan) -> str:
    lay = plan.layout
    if lay.pp > 1 and lay.zero >= 2:
        raise ExportError(
            "deepspeed",
            "zero",
            f"DeepSpeed's pipeline engine refuses ZeRO {lay.zero} with pp={lay.pp}",
            "use zero=1 or zero=0 with pipeline parallelism",
        )
    if lay.dp_replicate > 1 and lay.zero in (1, 2):
        raise ExportError(
            "deepspeed",
            "dp_replicate",
            f"DeepSpeed shards ZeRO {lay.zero} state over the whole data-parallel group",
            "use dp_replicate=1, or zero=3 (MiCS)",
        )
    zero: dict = {"stage": lay.zero}
    if lay.zero == 3 and lay.dp_replicate > 1:
        zero["mics_shard_size"] = lay.dp_shard
    config = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": lay.mbs,
        "gradient_accumulation_steps": microbatches(plan),
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "bf16": {"enabled": plan.precision in ("bf16", "fp8")},
    }
    return json.dumps(config, indent=2) + "\n"
