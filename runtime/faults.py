"""A testing hook that injects faults into a run at chosen points: TERA_FAULT_INJECT.

For tests only (tests/runtime/test_faults.py); it does nothing when the variable is unset,
which is how every real run goes. The value is one fault:

    kill:step=S:where=W[:rank=R]   SIGKILL this process at point W of step S
    nan:step=S  /  inf:step=S      the loss of step S becomes NaN / +inf

Points W: `backward` (after the step's forward and backward, before the optimizer step: the
gradients are reduced, the parameters not yet updated) and `checkpoint` (inside the save of
the checkpoint of step S, after this rank wrote its share of the files and before the
checkpoint is published). `rank` (global rank) limits a kill to one rank, every rank
otherwise. A NaN or inf replaces the global loss, which is the same on every rank, so it is
injected on every rank alike.

A fault fires only in the first attempt of a job: torchrun sets TORCHELASTIC_RESTART_COUNT
to the number of restarts so far (0, or absent outside torchrun, in the first), so the
restarted workers run without it, as after a real one-off failure.
"""

from __future__ import annotations

import dataclasses
import os
import signal

VARIABLE = "TERA_FAULT_INJECT"
KINDS = ("kill", "nan", "inf")
KILL_POINTS = ("backward", "checkpoint")


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str  # kill | nan | inf
    step: int
    where: str | None = None  # a point of KILL_POINTS, for a kill
    rank: int | None = None  # None: every rank


def parse(text: str) -> Fault:
    """A Fault from the variable's value; ValueError names what is wrong."""
    kind, *pairs = text.split(":")
    fields = dict(pair.partition("=")[::2] for pair in pairs)
    if kind not in KINDS or "step" not in fields or not fields.keys() <= {"step", "where", "rank"}:
        expected = "kill:step=S:where=W[:rank=R], nan:step=S or inf:step=S"
        raise ValueError(f"{VARIABLE}={text!r}: expected {expected}")
    where = fields.get("where")
    if (kind == "kill") != (where in KILL_POINTS):
        raise ValueError(f"{VARIABLE}={text!r}: a kill, and only a kill, takes where={KILL_POINTS}")
    rank = fields.get("rank")
    return Fault(kind, int(fields["step"]), where, None if rank is None else int(rank))


def _armed() -> Fault | None:
    """The fault this process may inject: None when the variable is unset or the job is a
    restarted attempt."""
    text = os.environ.get(VARIABLE)
    if not text or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    return parse(text)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def kill_point(where: str, step: int) -> None:
    """SIGKILL this process if the armed fault is a kill at `where` of `step` on this rank."""
    fault = _armed()
    if fault is None or (fault.kind, fault.where, fault.step) != ("kill", where, step):
        return
    if fault.rank is None or fault.rank == _rank():
        os.kill(os.getpid(), signal.SIGKILL)


def loss(step: int, value: float) -> float:
    """The loss of `step` as the armed fault leaves it: NaN or inf at its step, else `value`."""
    fault = _armed()
    if fault is not None and fault.kind in ("nan", "inf") and fault.step == step:
        return float(fault.kind)
    return value
