"""Per-step metrics as JSON lines (`tera-run --metrics out.jsonl`).

One JSON object per line per step, written by global rank 0 only and flushed at every line
so that a crashed or running job's file is readable up to its last step. Keys: step, loss,
grad_norm, lr, tokens (tokens of the global batch the step trained on), step_time_s,
tokens_per_s, peak_memory_bytes, comm_bytes (bytes each collective kind moved on rank 0 in
the step, measured) and comm_bytes_predicted (the cost model's bytes per kind on that rank
per step), both passed in by the run loop, plus any extra keys the caller passes (the run
loop passes `skipped`: true for a step whose non-finite update was skipped). A non-finite
number (a diverged loss) is written as null: JSON has no NaN or Infinity.

A resumed run (`resumed_step=N`) keeps the lines of steps <= N and drops the later ones,
which an attempt killed after its checkpoint of step N wrote, so after any number of
restarts the file holds every step once. The kept lines are written to a temporary file
that replaces the old one (os.replace), so a kill during the rewrite leaves the old file
whole; a line torn by a kill mid-write does not parse and is dropped.

peak_memory_bytes is torch.cuda.max_memory_allocated() on a GPU (tensor memory only, since
the process started or the last reset); on CPU it is the process's peak resident set size
from getrusage (everything the process ever held: Python, torch, buffers), so the two are
not comparable with each other.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tera.runtime.files import write_atomically


def peak_memory_bytes(device: torch.device | str | None = None) -> int:
    """Peak memory of this process on `device` (see the module docstring for the meaning)."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kibibytes, macOS bytes.
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _step(line: str) -> float:
    """The step of a metrics line; infinity for one that does not parse (torn by a kill)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def _finite(value):
    """`value` with every non-finite float (in nested dicts) replaced by None."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """Write one JSON line per step to `path` on global rank 0; a no-op elsewhere and when
    `path` is None. A new run starts the file afresh; a run resumed after step N
    (`resumed_step=N`) keeps the lines of steps <= N and drops the later ones, written
    before an interruption, so the file holds every step once (see the module docstring).
    Use as a context manager or call close()."""

    def __init__(
        self,
        path: str | Path | None,
        device: torch.device | str | None = None,
        resumed_step: int | None = None,
    ):
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.device = device
        self._file = None
        if path is None or rank != 0:
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resumed_step is not None and path.is_file():
            kept = [line for line in path.read_text().splitlines() if _step(line) <= resumed_step]
        write_atomically(path, "".join(line + "\n" for line in kept))
        self._file = open(path, "a")

    def write(
        self,
        step: int,
        loss: float,
        tokens: int,
        step_time_s: float,
        grad_norm: float | None = None,
        lr: float | None = None,
        comm_bytes: dict[str, int] | None = None,
        comm_bytes_predicted: dict[str, float] | None = None,
        **extra: Any,
    ) -> dict[str, Any] | None:
        """Write one step's line; returns the record written (None on other ranks)."""
        if self._file is None:
            return None
        record = {
            "step": step,
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens": tokens,
            "step_time_s": step_time_s,
            "tokens_per_s": tokens / step_time_s if step_time_s > 0 else None,
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "comm_bytes": comm_bytes or {},
            "comm_bytes_predicted": comm_bytes_predicted or {},
            **extra,
        }
        self._file.write(json.dumps(_finite(record), allow_nan=False) + "\n")
        self._file.flush()
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
