"""The run loop of `tera-run`: data -> Trainer.train_step -> metrics -> checkpoints.

`run(plan, options)` runs on every rank of a world the launcher (runtime/launch.py) started
or joined. Order: process group (nccl on CUDA, gloo otherwise; one GPU per process at
LOCAL_RANK), seeds, Meshes.from_plan, this rank's TokenStream (its data-parallel
coordinate), Trainer, then, with `resume`, the latest complete checkpoint (trainer, data
position, RNG states and the step counter) if there is one, then steps
`start + 1 .. options.steps`.

Invariants:
  - `options.steps` is the last step of the whole run, resumed or not: the learning-rate
    schedule spans it, so a resumed run continues the uninterrupted one exactly (same
    losses) only with the same steps, seed, data, lr and warm-up, which `check_resume`
    enforces from the checkpoint's marker before any process starts. The plan may differ
    (another layout or world size): DCP reshards.
  - Checkpoints are written after every `checkpoint_every` steps and after the last step,
    when a checkpoint directory is given.
  - `resume` continues from the latest complete checkpoint, or starts at step 0 when the
    directory holds none yet, so that one command line serves every attempt of a job that
    torchrun restarts (`--max-restarts`): an attempt killed at any point resumes from the
    last checkpoint and the finished run's losses are the uninterrupted run's. The metrics
    file then keeps the lines of steps up to the checkpoint and drops the later ones the
    killed attempt wrote (metrics.py), so it holds every step once.
  - Non-finite steps (`on_nonfinite`): a step whose global loss or gradient norm is NaN or
    infinite (both are the same on every rank, so every rank decides alike) either stops
    the run (`stop`, the default: NonFiniteLoss names the step; no checkpoint is written
    for it, so the latest one holds the last good state) or is skipped (`skip`: no
    optimizer step, parameters and optimizer state unchanged, the batch consumed, the step
    counted and logged with `skipped: true`). The learning-rate schedule follows the
    optimizer steps taken, so a skipped step delays it by one, as in Megatron-LM.
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
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from tera.planner.cost.comm_bytes import predicted_comm_bytes
from tera.planner.errors import InputError
from tera.runtime import checkpoint, faults
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
    on_nonfinite: str = "stop"  # stop | skip (see the module docstring)


NONFINITE_POLICIES = ("stop", "skip")


class RunError(InputError):
    """Options that cannot run; the message names the field and the fix."""


class NonFiniteLoss(RuntimeError):
    """A step's loss or gradient norm was NaN or infinite under `on_nonfinite="stop"`; the
    message (one line) names the step. Raised on every rank alike."""

    def __init__(self, step: int, loss: float, grad_norm: float):
        self.step = step
        super().__init__(
            f"step {step}: non-finite training (loss {loss}, gradient norm {grad_norm}); the "
            "run stopped before applying it (--on-nonfinite stop): resume from the latest "
            "checkpoint with a lower --lr, or pass --on-nonfinite skip to skip such steps"
        )


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
    missing or malformed, a checkpoint interval without a directory, a checkpoint directory
    or metrics file this process could not create or write, a metrics path that is a
    directory, a resume from a checkpoint of another run, a finished run or a checkpoint
    whose files do not match its manifest, a new run into a directory that holds another
    run's checkpoints (resuming would later pick those up), and a plan the Trainer cannot
    run (UnsupportedPlan)."""
    from tera.runtime.trainer import check_supported

    check_supported(plan)
    data = data_identity(options.data, plan)
    if options.on_nonfinite not in NONFINITE_POLICIES:
        raise RunError(
            "--on-nonfinite",
            f"unknown policy {options.on_nonfinite!r}",
            f"use one of {', '.join(NONFINITE_POLICIES)}",
        )
    if options.checkpoint_every and not options.checkpoint_dir:
        raise RunError("--checkpoint-every", "needs a directory", "pass --checkpoint-dir DIR")
    if options.checkpoint_dir:
        check_writable_directory("--checkpoint-dir", options.checkpoint_dir)
    if options.metrics and os.path.isdir(options.metrics):
        raise RunError("--metrics", f"{options.metrics!r} is a directory", "name a file")
    if options.metrics:
        check_writable_directory("--metrics", os.path.dirname(options.metrics) or ".")
    if options.resume:
        check_resume(plan, options, data)
    elif options.checkpoint_dir and (step := checkpoint.latest(options.checkpoint_dir)) is not None:
        raise RunError(
            "--checkpoint-dir",
            f"{options.checkpoint_dir!r} holds a run's checkpoints (latest step {step})",
            "pass --resume to continue that run, or choose a new directory",
        )


def check_writable_directory(field: str, path: str) -> None:
    """Refuse a directory the run could not create or write into: a file in its place or
    on its path, or no write permission on it or, where it does not exist yet, on the
    nearest directory that does (where it would be created)."""
    existing = Path(path).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        problem = f"{str(existing)!r} is a file, not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"this user cannot write into {str(existing)!r}"
    else:
        return
    raise RunError(
        field,
        f"{path!r} cannot be written: {problem}",
        "choose a directory this user can create and write",
    )


def check_resume(plan, options: RunOptions, data: str | None = None) -> int:
    """The step to resume from: the latest complete checkpoint's, or 0 when the directory
    holds none yet (the first attempt of a job that torchrun may restart runs the same
    command line as the next). A RunError when the checkpoint belongs to another run or
    the run is complete, a CheckpointError when its files do not match its manifest
    (presence and sizes: `checkpoint.load` checks the contents). `data` is the data's
    identity when the caller has opened it already."""
    directory = options.checkpoint_dir
    if directory is None:
        raise RunError("--resume", "needs a checkpoint directory", "pass --checkpoint-dir DIR")
    step = checkpoint.latest(directory)
    if step is None:
        return 0
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
    checkpoint.verify(directory, step, contents=False)
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


def _init_process_group(device: torch.device) -> None:
    """Join the world the launcher described in the environment (env://), except that a
    worker of torch's elastic agent (torchrun, the local launcher) joins through the agent's
    store under a prefix of its attempt. torch's env:// handler assumes a new store per
    attempt, but the agent of `torchrun --standalone --max-restarts 1` kept its store, and
    the killed attempt's keys (gloo's rank addresses) in it: the restarted workers hung in
    init_process_group, or failed to connect to the dead ranks' ports (torch 2.13)."""
    device_id = device if device.type == "cuda" else None
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend(), device_id=device_id)
        return
    agent_store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False)
    attempt = env.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(
        backend(),
        store=dist.PrefixStore(f"tera/attempt_{attempt}", agent_store),
        rank=int(env["RANK"]),
        world_size=int(env["WORLD_SIZE"]),
        device_id=device_id,
    )


def run(plan, options: RunOptions) -> list[tuple[int, float]]:
    """Train `plan` for `options`; returns (step, loss) of the steps this call ran."""
    from tera.runtime.mesh import Meshes
    from tera.runtime.trainer import Trainer

    device = _device()
    created = not dist.is_initialized()
    if created:
        _init_process_group(device)
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
            if step:
                checkpoint.load(options.checkpoint_dir, step, states)
            if dist.get_rank() == 0:
                directory = options.checkpoint_dir
                print(
                    f"resuming from the checkpoint of step {step} in {directory}"
                    if step
                    else f"no checkpoint in {directory} yet: starting at step 0"
                )
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
                loss, grad_norm, skipped = train_step(trainer, batch, step, options.on_nonfinite)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - began
            metrics.write(
                step=step,
                loss=loss,
                tokens=plan.global_batch * plan.seq_len,
                step_time_s=seconds,
                grad_norm=grad_norm,
                lr=lr,
                comm_bytes=counter.step_bytes(),
                comm_bytes_predicted=predicted,
                skipped=skipped,
            )
            if dist.get_rank() == 0:
                summary = _summary(step, options.steps, loss, grad_norm, lr, seconds)
                print(summary + (" (non-finite: skipped)" if skipped else ""))
            losses.append((step, loss))
            progress.step = step
            last = step == options.steps
            every = options.checkpoint_every
            if options.checkpoint_dir and (last or (every and step % every == 0)):
                checkpoint.save(options.checkpoint_dir, step, states, marker)
    return losses


def train_step(trainer, batch, step: int, on_nonfinite: str) -> tuple[float, float, bool]:
    """Step `step` of the run under the non-finite policy (module docstring): (loss,
    gradient norm before clipping, whether the update was skipped). Raises NonFiniteLoss
    under "stop"."""
    loss = faults.loss(step, trainer.forward_backward(batch))  # faults: a test hook
    faults.kill_point("backward", step)
    grad_norm = trainer.clip_gradients()
    if math.isfinite(loss) and math.isfinite(grad_norm):
        trainer.apply_gradients()
        return loss, grad_norm, False
    if on_nonfinite == "skip":
        trainer.discard_gradients()
        return loss, grad_norm, True
    raise NonFiniteLoss(step, loss, grad_norm)


def _summary(step, steps, loss, grad_norm, lr, seconds) -> str:
    return (
        f"step {step}/{steps} loss {loss:.4f} grad_norm {grad_norm:.3f} lr {lr:.3g} "
        f"{seconds * 1e3:.0f} ms"
    )


def worker(plan_path: str, options: RunOptions) -> dict[str, Any]:
    """Entry point of one rank: {"losses": [(step, loss), ...]}, {"error": message} for a
    bad input found only here (the launcher's parent reports it and exits 2), or
    {"stopped": message} for a run stopped at a non-finite step (exit 1)."""
    from tera.planner.plan import Plan

    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():
        # A forked worker inherits the launcher's thread pool size; the variable is the intent.
        torch.set_num_threads(int(threads))
    try:
        return {"losses": run(Plan.load(plan_path), options)}
    except InputError as exc:
        return {"error": str(exc)}
    except NonFiniteLoss as exc:
        return {"stopped": str(exc)}
