"""Checkpoints: torch.distributed.checkpoint (DCP) save and load of Stateful objects,
written atomically.

Layout on disk: `<directory>/step_<N>/` holds DCP's files (`.metadata` and one `.distcp`
per rank) and a `COMPLETE` marker (JSON: step, world size, the manifest and the caller's
metadata). Invariants:
  - A checkpoint is complete if and only if it is a `step_<N>` directory with a `COMPLETE`
    marker. `save` writes into `step_<N>.tmp`, waits for every rank (DCP's own gather plus a
    barrier), then rank 0 renames the directory to `step_<N>` and writes the marker last
    (to a temporary name, fsynced, then renamed), and a final barrier lets no rank go on
    before the checkpoint is complete. A crash at any point leaves either the previous
    state or a `.tmp` / unmarked directory, which `latest` and `load` ignore and the next
    `save` of that step replaces.
  - The marker's manifest (`files`) holds the size and sha256 of every file DCP wrote,
    hashed after the write (each rank hashes a share of the files). `load` verifies the
    files against it before DCP reads them (each rank hashes a share again), so a file
    truncated, changed or deleted since the save is a CheckpointError naming the checkpoint
    and the file, not a DCP error or silently wrong weights. `verify(..., contents=False)`
    checks presence and sizes only, cheaply, before a run starts. A checkpoint written
    before manifests existed has none and loads unchecked.
  - Every rank must see the same directory (a shared file system across nodes).
  - DCP reshards on load: tensors saved as DTensors under one mesh load into another mesh,
    or into plain tensors, as long as the fully qualified names agree.

`RNGState` is a Stateful holding the torch (CPU and CUDA), Python `random` and numpy
generator states of every rank, so a resumed run draws the same random numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.stateful import Stateful

from tera.planner.errors import InputError
from tera.runtime import faults
from tera.runtime.files import write_atomically

MARKER = "COMPLETE"
MANIFEST = "files"  # the marker's key of {file name: {"bytes": size, "sha256": hex digest}}
_STEP_DIR = re.compile(r"step_(\d+)")


class CheckpointError(InputError):
    """A checkpoint that is missing or incomplete; the message names the field and the fix."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step_{step}"


def is_complete(directory: str | Path, step: int) -> bool:
    return (step_dir(directory, step) / MARKER).is_file()


def latest(directory: str | Path) -> int | None:
    """The highest step with a complete checkpoint in `directory`, None when there is none."""
    return max(_complete_steps(directory), default=None)


def _complete_steps(directory: str | Path) -> list[int]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return [
        int(match.group(1))
        for entry in directory.iterdir()
        if (match := _STEP_DIR.fullmatch(entry.name)) and (entry / MARKER).is_file()
    ]


def read_marker(directory: str | Path, step: int) -> dict[str, Any]:
    """The COMPLETE marker of a checkpoint: step, world_size, the manifest and the metadata
    saved with it."""
    _require_complete(directory, step)
    try:
        return json.loads((step_dir(directory, step) / MARKER).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            "checkpoint",
            f"step_{step} in {str(directory)!r} is corrupt: its {MARKER} marker is not JSON "
            f"({exc.msg})",
            _drop_fix(directory, step),
        ) from None


def save(
    directory: str | Path,
    step: int,
    states: dict[str, Stateful],
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write `states` as checkpoint `step` atomically (see the module docstring); called on
    every rank. `metadata` (JSON) goes into the marker, readable without torch.distributed."""
    final = step_dir(directory, step)
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        Path(directory).mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
    _barrier()
    dcp.save(dict(states), checkpoint_id=tmp)  # DCP fsyncs each file it writes
    faults.kill_point("checkpoint", step)  # a test hook; nothing unless TERA_FAULT_INJECT
    _barrier()
    manifest = _manifest(tmp)
    if _rank() == 0:
        marker = {"step": step, "world_size": _world_size(), MANIFEST: manifest}
        _publish(tmp, final, {**marker, **(metadata or {})})
    _barrier()
    return final


def _manifest(checkpoint: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file in `checkpoint`, each rank hashing a share of them,
    merged on every rank (a collective when there is a process group)."""
    names = sorted(entry.name for entry in checkpoint.iterdir() if entry.is_file())
    mine = {name: _digest(checkpoint / name) for name in names[_rank() :: _world_size()]}
    if not dist.is_initialized():
        return mine
    every: list[dict] = [None] * _world_size()
    dist.all_gather_object(every, mine)
    return dict(sorted(entry for share in every for entry in share.items()))


def _digest(path: Path) -> dict[str, Any]:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": sha.hexdigest()}


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _publish(tmp: Path, final: Path, marker: dict[str, Any]) -> None:
    """Rank 0: move the written checkpoint into place, then mark it complete."""
    if final.exists():  # an earlier, possibly unmarked, checkpoint of the same step
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_atomically(final / MARKER, json.dumps(marker))
    _fsync_dir(final)
    _fsync_dir(final.parent)


def _fsync_dir(path: Path) -> None:
    """Make renames in `path` durable (POSIX: a directory's entries are synced on its fd)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(directory: str | Path, step: int, states: dict[str, Stateful]) -> None:
    """Load checkpoint `step` into `states` in place (each Stateful's load_state_dict is
    called); called on every rank. Refuses an incomplete checkpoint and a corrupt one
    (`verify`)."""
    verify(directory, step)
    dcp.load(dict(states), checkpoint_id=step_dir(directory, step))


def verify(directory: str | Path, step: int, contents: bool = True) -> None:
    """Check the files of checkpoint `step` against its manifest: each present with its
    size and, with `contents`, its sha256 (each rank hashes a share of the files; with a
    process group every rank must call it, and all raise the same CheckpointError naming
    the first bad file)."""
    manifest = read_marker(directory, step).get(MANIFEST)
    if manifest is None:  # saved before checkpoints had manifests
        return
    checkpoint = step_dir(directory, step)
    names = sorted(manifest)
    hashed = set(names[_rank() :: _world_size()]) if contents else set()
    problems = [
        (name, problem)
        for name in names
        if (problem := _file_problem(checkpoint / name, manifest[name], name in hashed))
    ]
    if contents and dist.is_initialized():
        every: list[list] = [None] * _world_size()
        dist.all_gather_object(every, problems)
        problems = sorted(set(p for share in every for p in share))
    if problems:
        raise CheckpointError(
            "checkpoint",
            f"step_{step} in {str(directory)!r} is corrupt: {problems[0][1]}",
            _drop_fix(directory, step),
        )


def _file_problem(path: Path, expected: dict[str, Any], hashed: bool) -> str | None:
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    if size != expected["bytes"]:
        return f"{path.name} holds {size} bytes, the manifest {expected['bytes']}"
    if hashed and _digest(path)["sha256"] != expected["sha256"]:
        return f"{path.name} differs from the manifest's sha256 (its bytes changed)"
    return None


def _drop_fix(directory: str | Path, step: int) -> str:
    """How to get past a corrupt checkpoint `step`: the complete one before it, if any."""
    earlier = [s for s in _complete_steps(directory) if s < step]
    target = f"resume from step {max(earlier)}" if earlier else "start afresh"
    return f"restore the checkpoint, or delete {step_dir(directory, step)} to {target}"


def _require_complete(directory: str | Path, step: int) -> None:
    if not is_complete(directory, step):
        found = latest(directory)
        fix = f"use step {found}, the latest complete one" if found is not None else "save first"
        raise CheckpointError(
            "checkpoint", f"no complete checkpoint of step {step} in {str(directory)!r}", fix
        )


class RNGState:
    """Stateful random-number-generator states of every rank (torch CPU and CUDA, Python
    `random`, numpy).

    DCP keeps one copy of a non-tensor value, so `state_dict` gathers every rank's states
    into one list (the same on all ranks) and `load_state_dict` restores this rank's entry.
    In a world of another size rank r takes entry r mod n: per-rank streams have no
    counterpart there, and the run stays deterministic."""

    def state_dict(self) -> dict[str, bytes]:
        mine = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            "python": random.getstate(),
            "numpy": np.random.get_state(),
        }
        every = [mine]
        if dist.is_initialized():
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, mine)
        # One opaque value: DCP would otherwise flatten the nested containers per key.
        return {"per_rank": pickle.dumps(every)}

    def load_state_dict(self, state: dict[str, bytes]) -> None:
        every = pickle.loads(state["per_rank"])
        mine = every[_rank() % len(every)]
        torch.set_rng_state(mine["torch"])
        if mine["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(mine["cuda"])
        random.setstate(mine["python"])
        np.random.set_state(mine["numpy"])
