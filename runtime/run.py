"""The run loop of `tera-run`: data -> Trainer.train_step -> metrics -> checkpoints.

`run(plan, options)` runs on every rank of a world the launcher (runtime/launch.py) started
or joined. Order: process group (nccl on CUDA, gloo otherwise; one GPU per process at
LOCAL_RANK), seeds, Meshes.from_plan, this rank's TokenStream (its data-parallel
coordinate), Trainer, then, with `resume`, the latest complete checkpoint (trainer, data
position, RNG states and the step counter), then steps `start + 1 .. options.steps`.

Invariants:
  - `options.steps` is the last step of the whole run, resumed or not: the learning-rate
    schedule spans it, so a resumed run continues the uninterrupted one exactly (same
    losses) only with the same steps, seed, data, lr and warm-up, which `check_resume`
    enforces from the checkpoint's marker before any process starts. The plan may differ
    (another layout or world size): DCP reshards.
  - Checkpoints are written after every `checkpoint_every` steps and after the last step,
    when a checkpoint directory is given.
  - Metrics come from global rank 0: the loss is the global one, the comm bytes those rank 0
    issued in the step, next to the cost model's prediction for rank 0 at the precision
    the Trainer computes in (fp32 on CPU, so a bf16 plan run here is predicted as fp32).
    step_time_s is rank 0's wall time of train_step, and includes the cost of counting the
    collectives (CommCounter sees every op): on the 8-rank tiny-moe plan on the shared
    2-core CPU machine, the median step (steps 2-6 of 6) took 0.84-0.85 s counted against
    0.52-0.60 s with a no-op counter, in two runs of each.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from tera.planner.cost.comm_bytes import predicted_comm_bytes
from tera.planner.errors import InputError
from tera.runtime import checkpoint
from tera.runtime.comm_stats import CommCounter
from tera.runtime.data import SYNTHETIC, TokenFile, TokenStream
from tera.runtime.launch import backend
from tera.runtime.metrics import MetricsWriter


@dataclasses.dataclass(frozen=True)
class RunOptions:
    steps: int = 10
    seed: int = 0
    data: str = SYNTHETIC
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None
    resume: bool = False
    metrics: str | None = None
    lr: float = 3e-4  # the Trainer's defaults
    warmup_steps: int = 10


class RunError(InputError):
    """Options that cannot run; the message names the field and the fix."""


class Progress:
    """Stateful step counter: the last step whose update the checkpoint holds."""

    def __init__(self, step: int = 0):
        self.step = step

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


SETTING_FIELDS = {  # run setting -> the input that sets it, for error messages
    "model": "plan.model",
    "global_batch": "plan.global_batch",
    "seq_len": "plan.seq_len",
    "steps": "--steps",
    "seed": "--seed",
    "data": "--data",
    "lr": "--lr",
    "warmup_steps": "--warmup-steps",
}


def data_identity(data: str, plan) -> str:
    """What names the data in a checkpoint: "synthetic" or a file's name and length."""
    if data == SYNTHETIC:
        return SYNTHETIC
    return TokenFile(data, plan.spec.vocab, plan.seq_len).identity


def run_settings(plan, options: RunOptions, data: str) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint (see the
    module docstring), stored in the checkpoint's marker; `data` is the data's identity."""
    return {
        "model": plan.spec.name,
        "global_batch": plan.global_batch,
        "seq_len": plan.seq_len,
        "steps": options.steps,
        "seed": options.seed,
        "data": data,
        "lr": options.lr,
        "warmup_steps": options.warmup_steps,
    }


def check_options(plan, options: RunOptions) -> None:
    """Refuse options that cannot run `plan`, before any process starts: a data file that is
    missing or malformed, a checkpoint interval without a directory, a metrics path that is
    a directory, a resume without a matching checkpoint, and a new run into a directory
    that holds another run's checkpoints (resuming would later pick those up), and a plan
    the Trainer cannot run (UnsupportedPlan)."""
    from tera.runtime.trainer import check_supported

    check_supported(plan)
    data = data_identity(options.data, plan)
    if options.checkpoint_every and not options.checkpoint_dir:
        raise RunError("--checkpoint-every", "needs a directory", "pass --checkpoint-dir DIR")
    if options.metrics and os.path.isdir(options.metrics):
        raise RunError("--metrics", f"{options.metrics!r} is a directory", "name a file")
    if options.resume:
        check_resume(plan, options, data)
    elif options.checkpoint_dir and (step := checkpoint.latest(options.checkpoint_dir)) is not None:
        raise RunError(
            "--checkpoint-dir",
            f"{options.checkpoint_dir!r} holds a run's checkpoints (latest step {step})",
            "pass --resume to continue that run, or choose a new directory",
        )


def check_resume(plan, options: RunOptions, data: str | None = None) -> int:
    """The step to resume from; a RunError when there is none or it belongs to another run.
    `data` is the data's identity when the caller has opened it already."""
    directory = options.checkpoint_dir
    if directory is None:
        raise RunError("--resume", "needs a checkpoint directory", "pass --checkpoint-dir DIR")
    step = checkpoint.latest(directory)
    if step is None:
        raise RunError(
            "--checkpoint-dir",
            f"no complete checkpoint in {directory!r} to resume from",
            "run without --resume to start, or give the directory a run saved into",
        )
    saved = checkpoint.read_marker(directory, step).get("settings", {})
    data = data if data is not None else data_identity(options.data, plan)
    settings = run_settings(plan, options, data)
    for key, value in settings.items():
        if key in saved and saved[key] != value:
            raise RunError(
                SETTING_FIELDS[key],
                f"the checkpoint's run used {saved[key]!r}, this one {value!r}",
                "resume with the run's settings, or start afresh in another --checkpoint-dir",
            )
    if step >= options.steps:
        raise RunError(
            "--resume",
            f"the run is complete: its latest checkpoint is step {step} of {options.steps}",
            "start a new run in another --checkpoint-dir",
        )
    return step


def _device() -> torch.device:
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _as_computed(plan, device: torch.device):
    """The plan in the precision the Trainer computes it in: fp32 on CPU whatever the plan
    says (trainer.py), so that the predicted bytes compare with the measured ones."""
    if device.type == "cuda" or plan.precision == "fp32":
        return plan
    return dataclasses.replace(plan, precision="fp32")


def run(plan, options: RunOptions) -> list[tuple[int, float]]:
    """Train `plan` for `options`; returns (step, loss) of the steps this call ran."""
    from tera.runtime.mesh import Meshes
    from tera.runtime.trainer import Trainer

    device = _device()
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend(), device_id=device if device.type == "cuda" else None)
    try:
        torch.manual_seed(options.seed)
        random.seed(options.seed)
        np.random.seed(options.seed)
        meshes = Meshes.from_plan(plan)
        stream = TokenStream(
            options.data,
            plan.spec.vocab,
            plan.seq_len,
            plan.global_batch,
            meshes.dp_rank,
            meshes.dp_size,
            options.seed,
        )
        trainer = Trainer(
            plan,
            meshes,
            seed=options.seed,
            lr=options.lr,
            warmup_steps=options.warmup_steps,
            total_steps=options.steps,
            device=device,
        )
        progress = Progress()
        states = {
            "trainer": trainer,
            "data": stream,
            "rng": checkpoint.RNGState(),
            "progress": progress,
        }
        if options.resume:
            step = check_resume(plan, options, stream.identity)
            checkpoint.load(options.checkpoint_dir, step, states)
        return _loop(plan, options, device, meshes, trainer, stream, progress, states)
    finally:
        if created:
            dist.destroy_process_group()


def _loop(plan, options, device, meshes, trainer, stream, progress, states):
    start = progress.step
    counter = CommCounter(meshes)
    predicted = predicted_comm_bytes(_as_computed(plan, device), rank=dist.get_rank())
    settings = run_settings(plan, options, stream.identity)
    marker = {"settings": settings, "layout": str(plan.layout)}
    losses = []
    resumed_step = start if options.resume else None
    with MetricsWriter(options.metrics, device, resumed_step=resumed_step) as metrics:
        for step in range(start + 1, options.steps + 1):
            batch = stream.next_batch().to(device)
            counter.reset()
            lr = trainer.optimizer.param_groups[0]["lr"]  # the rate this step applies
            began = time.perf_counter()
            with counter:
                result = trainer.train_step(batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - began
            metrics.write(
                step=step,
                loss=result.loss,
                tokens=result.tokens,
                step_time_s=seconds,
                grad_norm=result.grad_norm,
                lr=lr,
                comm_bytes=counter.step_bytes(),
                comm_bytes_predicted=predicted,
            )
            if dist.get_rank() == 0:
                print(_summary(step, options.steps, result.loss, result.grad_norm, lr, seconds))
            losses.append((step, result.loss))
            progress.step = step
            last = step == options.steps
            every = options.checkpoint_every
            if options.checkpoint_dir and (last or (every and step % every == 0)):
                checkpoint.save(options.checkpoint_dir, step, states, marker)
    return losses


def _summary(step, steps, loss, grad_norm, lr, seconds) -> str:
    return (
        f"step {step}/{steps} loss {loss:.4f} grad_norm {grad_norm:.3f} lr {lr:.3g} "
        f"{seconds * 1e3:.0f} ms"
    )


def worker(plan_path: str, options: RunOptions) -> dict[str, Any]:
    """Entry point of one rank: {"losses": [(step, loss), ...]}, or {"error": message} for
    a bad input found only here (the launcher's parent reports it and exits 2)."""
    from tera.planner.plan import Plan

    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():
        # A forked worker inherits the launcher's thread pool size; the variable is the intent.
        torch.set_num_threads(int(threads))
    try:
        return {"losses": run(Plan.load(plan_path), options)}
    except InputError as exc:
        return {"error": str(exc)}
