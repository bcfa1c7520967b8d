"""Meshes.from_plan: torch's groups are the planner's, in both rank orders; a disagreement
names its axis; a plan for another world size is refused."""

import pytest

from tera.planner.ranks import ALL_AXES, process_groups

from .world import run_world, tiny_plan


def groups_worker(rank: int, world_size: int, plan):
    import torch.distributed as dist

    from tera.runtime.mesh import Meshes

    meshes = Meshes.from_plan(plan)
    return {
        "groups": {a: sorted(dist.get_process_group_ranks(meshes.group(a))) for a in ALL_AXES},
        "names": {a: meshes.axis_of_group(meshes.group(a)) for a in ALL_AXES},
        "dp": (meshes.dp_rank, meshes.dp_size),
        "pp": (meshes.pp_rank, meshes.pp_size),
    }


@pytest.mark.parametrize(
    "layout",
    ["tp=2,pp=2,ep=2", "tp=2,pp=2,ep=2,order=tp-cp-pp-dp", "tp=2,ep=4,dp_replicate=2"],
)
def test_every_group_is_the_planners(layout):
    plan = tiny_plan(layout, 8)
    planned = process_groups(plan.layout.mesh)
    for rank, got in enumerate(run_world(groups_worker, 8, plan)):
        for axis in ALL_AXES:
            assert got["groups"][axis] in planned[axis], (rank, axis)
            assert rank in got["groups"][axis]
            assert got["names"][axis] == axis  # each axis has its own torch group
        dp_group = got["groups"]["dp"]
        assert got["dp"] == (dp_group.index(rank), len(dp_group))
        pp_group = got["groups"]["pp"]
        assert got["pp"] == (pp_group.index(rank), len(pp_group))


def verify_worker(rank: int, world_size: int, plan, other_shape):
    from tera.runtime.mesh import MeshError, Meshes

    meshes = Meshes.from_plan(plan)
    try:
        meshes.verify(other_shape)
    except MeshError as error:
        return str(error)
    return None


def test_a_group_that_disagrees_is_named():
    plan = tiny_plan("tp=2,pp=2", 8)
    other = tiny_plan("tp=2,pp=2,order=tp-cp-pp-dp", 8).layout.mesh
    messages = run_world(verify_worker, 8, plan, other)
    # tp groups agree in both orders; data parallelism is the first axis that differs
    assert all(m is not None and m.startswith("mesh axis 'dp_shard'") for m in messages)


def world_size_worker(rank: int, world_size: int, plan):
    from tera.runtime.mesh import MeshError, Meshes

    try:
        Meshes.from_plan(plan)
    except MeshError as error:
        return str(error)
    return None


def test_a_plan_for_another_world_size_is_refused():
    messages = run_world(world_size_worker, 2, tiny_plan("tp=2,pp=2", 4))
    assert messages[0] == messages[1]
    assert "for 4 ranks but this world has 2" in messages[0]
