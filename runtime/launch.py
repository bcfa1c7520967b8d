"""Start or join the world of processes that runs a plan.

`tera-run plan.json` works three ways:
  - under torchrun (RANK, WORLD_SIZE and LOCAL_RANK set), each process joins that world;
  - under srun (SLURM_PROCID and SLURM_NTASKS set, RANK not), each process maps Slurm's
    variables to torch.distributed's: RANK = SLURM_PROCID, WORLD_SIZE = SLURM_NTASKS,
    LOCAL_RANK = SLURM_LOCALID, MASTER_ADDR given by the batch script (127.0.0.1 on a
    single node) and MASTER_PORT 29500 unless given;
  - otherwise it starts the local world itself with torch's elastic launcher
    (LaunchConfig + elastic_launch, a c10d rendezvous on localhost, no restarts): one
    process per rank of the plan. On a machine with CUDA each process drives one GPU
    (backend nccl, processes spawned, since CUDA does not survive fork); without CUDA the
    processes run on the CPU with gloo and are forked by a fork server that has imported
    torch, since spawning re-imports torch in each (measured on the 2-core machine: 8
    workers that join a gloo group and return, 1.5 s forked against 17 s spawned, imports
    included). Not forked from the launcher itself: a process that has run threads (torch's
    OpenMP pool, CP-SAT) can deadlock its forked children, as tera-run's launch test did
    inside pytest. The fork server costs one torch import (`tera-run` of the 8-rank
    tiny-moe plan for 3 steps: 16.9 s, against 14.0 s forked from the launcher). Unless
    OMP_NUM_THREADS is set, each worker of a multi-process CPU world gets an equal share of
    the CPU cores (at least one thread), so the workers do not oversubscribe them.

Invariant: the world always has exactly the plan's number of ranks. A plan for another
world size (more ranks than local GPUs, a torchrun or srun world of another size), or a
world that cannot exist (a rank outside 0..WORLD_SIZE-1, a variable that is not an
integer), is refused before any process group starts, with a LaunchError naming the field
and the fix.
"""

from __future__ import annotations

import multiprocessing
import os
import uuid
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from tera.planner.errors import InputError

DEFAULT_MASTER_PORT = "29500"  # torch.distributed's default


class LaunchError(InputError):
    """A world that cannot run the plan; the message names the field and the fix."""


@dataclass(frozen=True)
class World:
    """The world this process belongs to, as its launcher described it."""

    launcher: str  # torchrun | srun
    rank: int
    world_size: int
    local_rank: int


# torch is imported inside the functions that need it, so that `tera-run` refuses a bad
# plan or world before paying for the import.


def backend() -> str:
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


# launcher -> its (rank, world size, local rank) variables; the first one set wins
LAUNCHER_VARIABLES = {
    "torchrun": ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
    "srun": ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
}


def joined_world(env: Mapping[str, str] = os.environ) -> World | None:
    """The world torchrun or srun started this process in; None when neither did. RANK wins
    over SLURM_PROCID: torchrun inside an srun step sets both. A variable that is not an
    integer, or a rank outside 0..world size - 1, is a LaunchError naming the variable."""
    for launcher, (rank, size, local) in LAUNCHER_VARIABLES.items():
        if rank in env and size in env:
            world = World(
                launcher, _integer(env, rank), _integer(env, size), _integer(env, local, "0")
            )
            if world.world_size < 1:
                raise LaunchError(size, f"{world.world_size} processes", "launch at least one")
            if not 0 <= world.rank < world.world_size:
                raise LaunchError(
                    rank,
                    f"{world.rank} is not a rank of a {world.world_size}-process world "
                    f"(0 to {world.world_size - 1})",
                    "fix the launch",
                )
            if world.local_rank < 0:
                raise LaunchError(local, f"{world.local_rank} is negative", "fix the launch")
            return world
    return None


def _integer(env: Mapping[str, str], name: str, default: str | None = None) -> int:
    text = env.get(name, default)
    try:
        return int(text)
    except ValueError:
        raise LaunchError(name, f"{text!r} is not an integer", "fix the launch") from None


def adopt_slurm(env: MutableMapping[str, str] = os.environ) -> None:
    """Set torch.distributed's variables from Slurm's (see the module docstring)."""
    nodes = _integer(env, "SLURM_NNODES", "1")
    if "MASTER_ADDR" not in env and nodes > 1:
        raise LaunchError(
            "MASTER_ADDR",
            f"not set for an srun world over {nodes} nodes",
            "export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1) "
            "in the batch script",
        )
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", DEFAULT_MASTER_PORT)


def check_joined(plan_world_size: int, world: World) -> None:
    """Refuse a torchrun/srun world that does not have the plan's number of ranks."""
    if world.world_size != plan_world_size:
        how = (
            f"torchrun with {plan_world_size} processes in all (--nproc-per-node "
            f"{plan_world_size} on one node)"
            if world.launcher == "torchrun"
            else f"srun --ntasks {plan_world_size}"
        )
        raise LaunchError(
            "plan.world_size",
            f"the plan is for {plan_world_size} ranks but {world.launcher} started "
            f"{world.world_size}",
            f"launch {how}, or plan for {world.world_size} ranks "
            f"(tera-plan search --gpus {world.world_size})",
        )


def check_local_rank(world: World, gpus: int) -> None:
    """Refuse a process whose local rank has no GPU on a node with `gpus` GPUs (0: CPU)."""
    if gpus and world.local_rank >= gpus:
        raise LaunchError(
            "LOCAL_RANK",
            f"{world.local_rank} but this node has {gpus} GPUs",
            f"start at most {gpus} processes per node",
        )


def check_local(plan_world_size: int, gpus: int) -> None:
    """Refuse to start a local world the machine cannot hold (more ranks than GPUs)."""
    if gpus and plan_world_size > gpus:
        raise LaunchError(
            "plan.world_size",
            f"the plan is for {plan_world_size} ranks but this machine has {gpus} GPUs",
            f"plan for {gpus} (tera-plan search --gpus {gpus}), or launch on more nodes "
            "with torchrun or srun",
        )


def launch_local(
    world_size: int, entrypoint: Callable[..., Any], *args: Any, gpus: int = 0
) -> dict[int, Any]:
    """Run `entrypoint(*args)` in `world_size` local processes with torch.distributed's
    environment set; returns {rank: return value}. A failed worker raises
    torch.distributed.elastic.multiprocessing.errors.ChildFailedError."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    check_local(world_size, gpus)
    if not gpus and world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
        share = max(1, (os.cpu_count() or 1) // world_size)
        os.environ["OMP_NUM_THREADS"] = str(share)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=world_size,
        run_id=f"tera-{uuid.uuid4().hex[:12]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # a free port, as torchrun --standalone
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn" if gpus else "forkserver",
    )
    if not gpus:
        # the server imports torch and the entrypoint's module once, for every worker
        multiprocessing.set_forkserver_preload(["torch.distributed", entrypoint.__module__])
    return elastic_launch(config, entrypoint)(*args)


def local_gpus() -> int:
    """GPUs this process can use: 0 without CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
