"""Exports: a plan written as the configuration of the stack that will run it.

    export(plan, "megatron")     Megatron-LM pretrain_gpt.py arguments (megatron.py)
    export(plan, "torchtitan")   torchtitan's [training] [parallelism] [activation_checkpoint]
    export(plan, "deepspeed")    ds_config.json (frameworks.py)
    export(plan, "torchrun")     one launch line per node running tera-run (launchers.py)
    export(plan, "slurm")        an sbatch script running tera-run under srun
    export(plan, "kubernetes")   a JobSet manifest running tera-run under torchrun

Each export is a pure function of the plan (and the path the launch lines give the plan
file). What a target cannot express is either refused with an ExportError naming the field
and the fix, or approximated in the direction that keeps the plan's memory bound (e.g. the
strongest recompute mode of any stage on every stage) with a comment line saying so; an
export never silently drops a setting of the plan.
"""

from __future__ import annotations

from collections.abc import Callable

from tera.planner.errors import InputError
from tera.planner.plan import Plan

FORMATS = ("megatron", "torchtitan", "deepspeed", "torchrun", "slurm", "kubernetes")
RECOMPUTE_STRENGTH = ("none", "selective", "full")  # weakest first
MASTER_PORT = 29500


class ExportError(InputError):
    """A plan the target cannot express: "export.<format>.<field>: <problem>; <fix>"."""

    def __init__(self, fmt: str, field_name: str, problem: str, fix: str):
        self.prefix = f"export.{fmt}."
        super().__init__(field_name, problem, fix)


def export(plan: Plan, fmt: str, *, plan_path: str = "plan.json") -> str:
    """The plan in format `fmt` (one of FORMATS) as text. `plan_path` is the plan file the
    launch formats (torchrun, slurm, kubernetes) hand to tera-run."""
    from tera.planner.exports import frameworks, launchers, megatron

    writers: dict[str, Callable[..., str]] = {
        "megatron": megatron.megatron,
        "torchtitan": frameworks.torchtitan,
        "deepspeed": frameworks.deepspeed,
        "torchrun": launchers.torchrun,
        "slurm": launchers.slurm,
        "kubernetes": launchers.kubernetes,
    }
    if fmt not in writers:
        raise ExportError(fmt, "format", "unknown format", f"use one of {', '.join(FORMATS)}")
    if fmt in ("torchrun", "slurm", "kubernetes"):
        return writers[fmt](plan, plan_path)
    return writers[fmt](plan)


def strongest_recompute(plan: Plan) -> tuple[str, str | None]:
    """One recompute mode for targets that set one for every stage, and a comment line
    when the plan's stages differ: the strongest mode keeps memory within the plan's."""
    modes = plan.layout.stage_recompute
    mode = max(modes, key=RECOMPUTE_STRENGTH.index)
    if len(set(modes)) == 1:
        return mode, None
    note = (
        f"tera recomputes per stage ({':'.join(modes)}); this target sets one mode for all "
        f"stages, so every stage uses the strongest, {mode}: memory stays within the plan, "
        "the step is slower than predicted"
    )
    return mode, note


def summary(plan: Plan) -> str:
    """One line naming the plan, for the comment at the top of every export."""
    return (
        f"tera plan: {plan.spec.name} on {plan.world_size} GPUs ({plan.cluster.name}, "
        f"{plan.cluster.num_nodes} nodes of {plan.cluster.gpus_per_node}), "
        f"global batch {plan.global_batch} x {plan.seq_len} tokens, {plan.precision}, "
        f"layout {plan.layout}"
    )


def microbatches(plan: Plan) -> int:
    """Micro-batches per step on each data-parallel rank (gradient accumulation steps)."""
    return plan.global_batch // (plan.layout.dp * plan.layout.mbs)
