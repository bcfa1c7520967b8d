"""planner/ranks.py: Megatron rank order, the DESIGN.md worked example, partitions."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tera.planner.ranks import ALL_AXES, MeshShape, group_of, process_groups


def test_design_worked_example():
    mesh = MeshShape(tp=2, pp=2, dp_shard=4, ep=4, etp=1)  # 16 ranks, dp4, edp2
    assert mesh.world == 16 and mesh.edp == 2
    g = process_groups(mesh)
    assert g["tp"][:2] == [[0, 1], [2, 3]]
    assert g["dp"] == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]
    assert g["pp"][:2] == [[0, 8], [1, 9]]
    assert g["ep"] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert g["edp"][:5] == [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12]]


def test_innermost_axis_has_stride_one():
    mesh = MeshShape(tp=2, cp=2, dp_shard=2, dp_replicate=2, pp=2)
    assert group_of(mesh, "tp", 0) == [0, 1]
    assert group_of(mesh, "cp", 0) == [0, 2]
    assert group_of(mesh, "dp_shard", 0) == [0, 4]
    assert group_of(mesh, "dp_replicate", 0) == [0, 8]
    assert group_of(mesh, "pp", 0) == [0, 16]
    assert group_of(mesh, "dp", 0) == [0, 4, 8, 12]
    assert group_of(mesh, "dp_cp", 0) == [0, 2, 4, 6, 8, 10, 12, 14]


@st.composite
def meshes(draw):
    tp, cp, dp_shard, dp_rep, pp = (draw(st.sampled_from([1, 2, 3, 4])) for _ in range(5))
    block = tp * cp * dp_shard
    divisors = [d for d in range(1, block + 1) if block % d == 0]
    ep = draw(st.sampled_from(divisors))
    etp = draw(st.sampled_from([d for d in divisors if (block // ep) % d == 0]))
    return MeshShape(tp=tp, cp=cp, dp_shard=dp_shard, dp_replicate=dp_rep, pp=pp, ep=ep, etp=etp)


SIZES = {
    "dp": lambda m: m.dp_shard * m.dp_replicate,
    "dp_cp": lambda m: m.cp * m.dp_shard * m.dp_replicate,
    "edp_full": lambda m: m.edp * m.dp_replicate,
    "edp": lambda m: m.edp,
}


@settings(max_examples=150, deadline=None)
@given(meshes())
def test_groups_partition_the_ranks_exactly(mesh):
    for axis, groups in process_groups(mesh).items():
        size = SIZES[axis](mesh) if axis in SIZES else getattr(mesh, axis)
        flat = sorted(r for g in groups for r in g)
        assert flat == list(range(mesh.world)), axis
        assert all(len(g) == size for g in groups), axis
    # expert parallelism re-slices one dense block: an ep group never crosses pp or
    # dp_replicate boundaries
    block = mesh.tp * mesh.cp * mesh.dp_shard
    for group in mesh.groups("ep"):
        assert len({r // block for r in group}) == 1
    assert set(ALL_AXES) == set(process_groups(mesh))


@pytest.mark.parametrize(
    "degrees",
    [(2, 1, 4, 1, 2, 4, 1), (2, 2, 2, 2, 2, 2, 2), (4, 2, 4, 2, 3, 4, 2), (8, 1, 16, 1, 4, 32, 2)],
)
def test_first_group_is_the_group_of_rank_zero(degrees):
    mesh = MeshShape(*degrees)
    for axis in ALL_AXES:
        assert list(mesh.first_group(axis)) == mesh.groups(axis)[0]


def test_tp_pp_dp_order_keeps_pipeline_neighbours_close():
    """Megatron's --use-tp-pp-dp-mapping: 16 ranks, tp2 pp2 dp4 ep4."""
    mesh = MeshShape(tp=2, dp_shard=4, pp=2, ep=4, order="tp-cp-pp-dp")
    assert mesh.groups("tp")[:2] == [[0, 1], [2, 3]]
    assert mesh.groups("pp")[:2] == [[0, 2], [1, 3]]
    assert mesh.groups("dp")[:2] == [[0, 4, 8, 12], [1, 5, 9, 13]]
    # the expert mesh re-slices stage 0's dense block [0, 1, 4, 5, 8, 9, 12, 13]
    assert mesh.groups("ep")[:2] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert [0, 8] in mesh.groups("edp")
    assert list(mesh.sizes("dense")) == ["tp", "cp", "pp", "dp_shard", "dp_replicate"]
    for axis in ALL_AXES:
        groups = mesh.groups(axis)
        assert sorted(r for g in groups for r in g) == list(range(16))
        assert list(mesh.first_group(axis)) == groups[0]


def test_unknown_order_is_refused():
    with pytest.raises(ValueError, match="order"):
        MeshShape(tp=2, order="pp-dp-tp")
