"""Launch: detecting torchrun and srun worlds, Slurm's variables mapped to torch's, the
world-size refusals, and a real local world started by the elastic launcher."""

import os

import pytest

from tera.runtime import launch
from tera.runtime.launch import LaunchError, World


def test_joined_world_reads_torchrun_then_srun_variables():
    assert launch.joined_world({}) is None
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}
    assert launch.joined_world(torchrun) == World("torchrun", 3, 8, 1)
    srun = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5"}
    assert launch.joined_world(srun) == World("srun", 5, 16, 5)
    # torchrun inside an srun step sets both: torchrun's world is the one to join.
    assert launch.joined_world({**srun, **torchrun}).launcher == "torchrun"
    with pytest.raises(LaunchError, match="^RANK: 'x' is not an integer; fix the launch$"):
        launch.joined_world({"RANK": "x", "WORLD_SIZE": "2"})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK: 2 is not a rank of a 2-process world (0 to 1)"),
        ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK: -1 is not a rank of a 2-process world"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE: 0 processes; launch at least one"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "-1"}, "LOCAL_RANK: -1 is negative"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "one"}, "LOCAL_RANK: 'one' is not an"),
        ({"SLURM_PROCID": "4", "SLURM_NTASKS": "4"}, "SLURM_PROCID: 4 is not a rank of a 4-"),
    ],
)
def test_a_world_that_cannot_exist_is_refused_naming_the_variable(env, message):
    """Such a world would start a process group that never forms (a rank past the world)."""
    with pytest.raises(LaunchError) as err:
        launch.joined_world(env)
    assert str(err.value).startswith(message)


def test_adopt_slurm_maps_to_torch_variables():
    env = {"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_LOCALID": "2", "SLURM_NNODES": "1"}
    launch.adopt_slurm(env)
    assert env["RANK"] == "2" and env["WORLD_SIZE"] == "4" and env["LOCAL_RANK"] == "2"
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] == "29500"
    multi = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_NNODES": "2"}
    with pytest.raises(LaunchError, match="MASTER_ADDR: not set .* 2 nodes; export MASTER_ADDR"):
        launch.adopt_slurm(multi)
    given = {**multi, "MASTER_ADDR": "node7", "MASTER_PORT": "1234"}
    launch.adopt_slurm(given)
    assert (given["MASTER_ADDR"], given["MASTER_PORT"]) == ("node7", "1234")
    with pytest.raises(LaunchError, match="^SLURM_NNODES: 'two' is not an integer"):
        launch.adopt_slurm({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NNODES": "two"})


def test_a_world_of_another_size_is_refused_with_the_fix():
    with pytest.raises(LaunchError) as err:
        launch.check_joined(8, World("torchrun", 0, 4, 0))
    assert str(err.value) == (
        "plan.world_size: the plan is for 8 ranks but torchrun started 4; launch torchrun "
        "with 8 processes in all (--nproc-per-node 8 on one node), or plan for 4 ranks "
        "(tera-plan search --gpus 4)"
    )
    with pytest.raises(LaunchError, match="srun --ntasks 8"):
        launch.check_joined(8, World("srun", 0, 16, 0))
    launch.check_joined(8, World("torchrun", 7, 8, 3))
    with pytest.raises(LaunchError, match="LOCAL_RANK: 4 but this node has 4 GPUs"):
        launch.check_local_rank(World("torchrun", 4, 8, 4), gpus=4)
    launch.check_local_rank(World("torchrun", 7, 8, 3), gpus=4)  # two nodes of four GPUs
    launch.check_local_rank(World("torchrun", 7, 8, 7), gpus=0)  # CPU


def test_more_ranks_than_local_gpus_is_refused():
    with pytest.raises(LaunchError, match="plan.world_size: .*8 ranks but this machine has 2 GPUs"):
        launch.check_local(8, gpus=2)
    launch.check_local(2, gpus=8)
    launch.check_local(8, gpus=0)  # CPU: any number of processes


def report_world():
    """A worker: joins the process group the launcher set up and sums the ranks."""
    import torch
    import torch.distributed as dist

    dist.init_process_group(launch.backend())
    total = torch.tensor([dist.get_rank()])
    dist.all_reduce(total)
    result = (dist.get_rank(), dist.get_world_size(), int(total), os.environ["OMP_NUM_THREADS"])
    dist.destroy_process_group()
    return result


def test_launch_local_starts_the_plans_world(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "")  # restored after the test: the launcher sets it
    monkeypatch.delenv("OMP_NUM_THREADS")
    results = launch.launch_local(3, report_world)
    threads = str(max(1, (os.cpu_count() or 1) // 3))
    assert results == {rank: (rank, 3, 0 + 1 + 2, threads) for rank in range(3)}
