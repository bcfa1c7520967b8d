"""CommCounter: the exact bytes of every kind of collective, counted by process-group kind.

Each test runs a 2-rank gloo world (tests/runtime/world.py) whose groups are separate
process groups over the same two ranks, named by axis, so that only the counter's group
-> kind mapping tells them apart. Expected bytes follow the convention of
runtime/comm_stats.py: all_reduce the tensor, all_gather the output, reduce_scatter the
input, all_to_all the input, broadcast the tensor, send the tensor (receives uncounted).
"""

import torch
import torch.distributed as dist
from torch import nn

from .world import run_world

F32 = 4  # bytes


class Axes:
    """The meshes' `axis_of_group` over explicitly created groups: the axes a group
    serves, joined by "+" as runtime/mesh.py joins them."""

    def __init__(self, groups: dict):
        self.names: dict[str, list[str]] = {}
        for axis, group in groups.items():
            self.names.setdefault(group.group_name, []).append(axis)

    def axis_of_group(self, group):
        return "+".join(self.names.get(group.group_name, [])) or None


def _groups(*axes: str) -> dict:
    return {axis: dist.new_group([0, 1]) for axis in axes}


def _c10d_world(rank, world):
    from tera.runtime.comm_stats import CommCounter

    g = _groups("tp", "dp_shard", "ep", "edp", "pp")
    g["dp_replicate"] = [dist.new_group([r]) for r in range(world)][rank]
    counter = CommCounter(Axes(g))
    ones, empty = torch.ones, torch.empty
    peer = 1 - rank
    with counter:
        dist.all_reduce(ones(3), group=g["tp"])
        dist.all_reduce(ones(4, dtype=torch.float64), group=g["tp"])
        dist.all_gather_into_tensor(empty(6), ones(3), group=g["dp_shard"])
        dist.all_gather_single(empty(6), ones(3), group=g["dp_shard"])
        dist.all_gather([empty(3), empty(3)], ones(3), group=g["dp_shard"])
        dist.reduce_scatter_tensor(empty(3), ones(6), group=g["dp_shard"])
        dist.reduce_scatter_single(empty(3), ones(6), group=g["dp_shard"])
        dist.reduce_scatter(empty(3), [ones(3), ones(3)], group=g["dp_shard"])
    with counter:  # entering again accumulates
        # uneven: rank 0 sends 1 row to itself and 3 to rank 1, rank 1 sends 2 and 4
        sends = [1, 3] if rank == 0 else [2, 4]
        receives = [1, 2] if rank == 0 else [3, 4]
        dist.all_to_all_single(empty(sum(receives)), ones(sum(sends)), receives, sends, g["ep"])
        dist.broadcast(ones(3, dtype=torch.float64), group_src=0, group=g["edp"])
        if rank == 0:
            dist.send(ones(7), group_dst=1, group=g["pp"])
        else:
            dist.recv(empty(7), group_src=0, group=g["pp"])
        work = (
            dist.isend(ones(2), group_dst=0, group=g["pp"])
            if rank == 1
            else dist.irecv(empty(2), group_src=1, group=g["pp"])
        )
        work.wait()
        ops = [
            dist.P2POp(dist.isend, ones(5), group_peer=peer, group=g["pp"]),
            dist.P2POp(dist.irecv, empty(5), group_peer=peer, group=g["pp"]),
        ]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        dist.all_reduce(ones(1))  # the world group belongs to no axis
        dist.all_reduce(ones(9), group=g["dp_replicate"])  # one rank: moves nothing
        dist.barrier(group=g["tp"])  # no payload
    before_reset = counter.step_ops(), counter.step_calls(), counter.step_bytes()
    counter.reset()
    return before_reset, counter.step_bytes()


def test_c10d_collectives_count_exact_bytes_by_kind():
    for rank, ((ops, calls, totals), after_reset) in enumerate(run_world(_c10d_world, 2)):
        pp_sends = 7 + 5 if rank == 0 else 2 + 5
        assert ops == {
            "tp": {"all_reduce": 3 * F32 + 4 * 8},
            "dp": {"all_gather": 3 * 6 * F32, "reduce_scatter": 3 * 6 * F32},
            "ep": {"all_to_all": (4 if rank == 0 else 6) * F32},
            "edp": {"broadcast": 3 * 8},
            "pp": {"send": pp_sends * F32},
            "other": {"all_reduce": F32},
        }, f"rank {rank}"
        assert calls["dp"] == {"all_gather": 3, "reduce_scatter": 3}
        assert calls["pp"] == {"send": 2}
        assert totals == {kind: sum(by_op.values()) for kind, by_op in ops.items()}
        assert after_reset == {}


def _shared_world(rank, world):
    from tera.runtime.comm_stats import CommCounter

    dp_ep, tp_edp, cp_etp = (dist.new_group([0, 1]) for _ in range(3))
    groups = {"dp_shard": dp_ep, "ep": dp_ep, "tp": tp_edp, "edp": tp_edp}
    groups |= {"cp": cp_etp, "etp": cp_etp}
    counter = CommCounter(Axes(groups | {"world": dist.group.WORLD}))
    with counter:
        x = torch.ones(4)
        dist.all_to_all_single(torch.empty(4), x, group=dp_ep)  # only ep and etp do these
        dist.all_to_all_single(torch.empty(2), x[:2], group=cp_etp)  # so this is etp's
        dist.all_gather_into_tensor(torch.empty(8), x, group=dp_ep)  # so this is dp's
        dist.all_gather_into_tensor(torch.empty(8), x, group=tp_edp)  # tp or edp: unknown
        dist.all_reduce(torch.ones(3, dtype=torch.float64))  # the world group
    return counter.step_ops()


def test_a_group_shared_by_axes_of_several_kinds_counts_where_the_collective_decides():
    for ops in run_world(_shared_world, 2):
        assert ops == {
            "ep": {"all_to_all": 4 * F32},
            "etp": {"all_to_all": 2 * F32},
            "dp": {"all_gather": 8 * F32},
            "other": {"all_gather": 8 * F32},
            "world": {"all_reduce": 3 * 8},
        }


def _functional_world(rank, world):
    import torch.distributed._functional_collectives as funcol
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    from tera.runtime.comm_stats import CommCounter

    g = _groups("tp", "ep", "dp_replicate")
    counter = CommCounter(Axes(g))
    mesh = DeviceMesh.from_group(g["tp"], "cpu", mesh_dim_names=("tp",))
    with counter:
        # autograd all-to-all: the forward sends 4 rows, the backward their 4 gradients
        x = torch.ones(4, 3, requires_grad=True)
        y = funcol.all_to_all_single_autograd(x, [2, 2], [2, 2], g["ep"])
        funcol.wait_tensor(y).sum().backward()
        funcol.wait_tensor(funcol.all_reduce(torch.ones(5), "sum", g["dp_replicate"]))
        funcol.wait_tensor(funcol.all_gather_tensor(torch.ones(2), 0, g["dp_replicate"]))
        funcol.wait_tensor(funcol.reduce_scatter_tensor(torch.ones(6), "sum", 0, g["ep"]))
    ep_and_dp = counter.step_ops()
    counter.reset()
    with counter:
        # DTensor Shard(0) -> Replicate: an all-gather of the global [8, 3]
        shard = DTensor.from_local(torch.ones(4, 3), mesh, [Shard(0)])
        shard.redistribute(mesh, [Replicate()]).to_local()
    gather = counter.step_ops()
    counter.reset()
    with counter:
        # Partial -> Shard(0): a reduce-scatter of the [8, 3] partial sums; its backward
        # turns the Shard(0) gradient back into the Partial input's Replicate: all-gather
        local = torch.ones(8, 3, requires_grad=True)
        partial = DTensor.from_local(local, mesh, [Partial()])
        partial.redistribute(mesh, [Shard(0)]).to_local().sum().backward()
    return ep_and_dp, gather, counter.step_ops(), counter.step_calls()


def test_functional_and_dtensor_collectives_count_forward_and_backward():
    for ep_and_dp, gather, scatter, calls in run_world(_functional_world, 2):
        assert ep_and_dp == {
            "ep": {"all_to_all": 2 * 4 * 3 * F32, "reduce_scatter": 6 * F32},
            "dp": {"all_reduce": 5 * F32, "all_gather": 2 * 2 * F32},
        }
        assert gather == {"tp": {"all_gather": 8 * 3 * F32}}
        assert scatter == {"tp": {"reduce_scatter": 8 * 3 * F32, "all_gather": 8 * 3 * F32}}
        assert calls == {"tp": {"reduce_scatter": 1, "all_gather": 1}}


class _Chunk(nn.Module):
    """Two FSDP2 units inside a root unit (every dim 0 even: FSDP2 pads nothing, so its
    buffers are exactly the parameters)."""

    def __init__(self, width: int):
        super().__init__()
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, 2 * width)
        self.root = nn.Linear(2 * width, width)

    def forward(self, x):
        return self.root(self.b(self.a(x)))


def _shard(chunk: _Chunk, mesh) -> _Chunk:
    from torch.distributed.fsdp import fully_shard

    # reshard_after_forward=True on the root too, as the runtime's ZeRO-3 sets it (the
    # FSDP2 default keeps the root gathered from forward to backward)
    for unit in (chunk.a, chunk.b, chunk):
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)
    return chunk


def _fsdp_world(rank, world, microbatches, width):
    from torch.distributed.device_mesh import DeviceMesh

    from tera.runtime.comm_stats import CommCounter

    g = _groups("dp_shard")
    torch.manual_seed(0)
    chunk = _shard(_Chunk(width), DeviceMesh.from_group(g["dp_shard"], "cpu"))
    counter = CommCounter(Axes(g))
    steps = []
    for _ in range(2):
        counter.reset()
        with counter:
            for _ in range(microbatches):
                chunk(torch.randn(2, width)).sum().backward()
        steps.append((counter.step_ops(), counter.step_calls()))
    return steps


def _chunk_bytes(width: int) -> int:
    return sum(p.numel() for p in _Chunk(width).parameters()) * F32


def test_fsdp2_gathers_and_reduce_scatters_match_the_parameter_bytes():
    m, width = 3, 4
    for steps in run_world(_fsdp_world, 2, m, width):
        for ops, calls in steps:
            # per micro-batch every unit is gathered for forward and again for backward,
            # and its gradients are reduce-scattered
            params = _chunk_bytes(width)
            assert ops == {"dp": {"all_gather": 2 * m * params, "reduce_scatter": m * params}}
            assert calls == {"dp": {"all_gather": 2 * m * 3, "reduce_scatter": m * 3}}


def _fsdp_pipeline_world(rank, world, cases, width):
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

    from tera.runtime.comm_stats import CommCounter

    # 2 stages x 2 data-parallel ranks, Megatron order: pp groups [0, 2] [1, 3]
    pp = [dist.new_group(ranks) for ranks in ([0, 2], [1, 3])][rank % 2]
    dp = [dist.new_group(ranks) for ranks in ([0, 1], [2, 3])][rank // 2]
    mesh = DeviceMesh.from_group(dp, "cpu")
    stage = rank // 2
    counter = CommCounter(Axes({"dp_shard": dp, "pp": pp}))
    measured = []
    for vpp, microbatches in cases:
        stages = []
        for v in range(vpp):
            torch.manual_seed(v)
            chunk = _shard(_Chunk(width), mesh)
            index = stage + 2 * v
            stages.append(PipelineStage(chunk, index, 2 * vpp, torch.device("cpu"), group=pp))
        loss = lambda y, t: y.sum()  # noqa: E731
        if vpp == 1:
            schedule = Schedule1F1B(stages[0], microbatches, loss_fn=loss)
        else:
            schedule = ScheduleInterleaved1F1B(stages, microbatches, loss_fn=loss)
        for _ in range(2):  # the first step also runs a forward to infer shapes: count the 2nd
            counter.reset()
            with counter:
                if stage == 0:
                    schedule.step(torch.randn(2 * microbatches, width))
                else:
                    schedule.step(target=torch.zeros(2 * microbatches, width))
        measured.append(counter.step_ops()["dp"])
    return measured


def test_fsdp2_under_pipelining_gathers_as_comm_bytes_simulates():
    from tera.planner.cost.comm_bytes import chunk_actions, unit_gathers
    from tera.planner.layout import Layout

    width, cases = 4, ((1, 4), (2, 6))
    params = _chunk_bytes(width)
    for rank, measured in enumerate(run_world(_fsdp_pipeline_world, 4, cases, width)):
        for (vpp, m), ops in zip(cases, measured, strict=True):
            layout = Layout(pp=2, vpp=vpp, schedule="interleaved" if vpp > 1 else "1f1b")
            gathers = sum(unit_gathers(order) for order in chunk_actions(layout, m, rank // 2))
            # the reduce-scatter waits for the last backward: once per chunk and step
            assert ops == {"all_gather": gathers * params, "reduce_scatter": vpp * params}
            assert gathers < 2 * m * vpp  # pipelining keeps units gathered after backward


def _pipeline_world(rank, world, microbatches, batch, width):
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    from tera.runtime.comm_stats import CommCounter

    g = _groups("pp")
    torch.manual_seed(0)
    stage = PipelineStage(nn.Linear(width, width), rank, 2, torch.device("cpu"), group=g["pp"])
    schedule = Schedule1F1B(stage, n_microbatches=microbatches, loss_fn=lambda y, t: y.sum())
    counter = CommCounter(Axes(g))
    steps = []
    for _ in range(3):
        counter.reset()
        with counter:
            if rank == 0:
                schedule.step(torch.randn(batch, width))
            else:
                schedule.step(target=torch.zeros(batch, width))
        steps.append(counter.step_ops())
    return steps


def test_pipelining_sends_one_activation_or_gradient_per_microbatch():
    m, batch, width = 4, 8, 6
    per_microbatch = batch // m * width * F32
    for steps in run_world(_pipeline_world, 2, m, batch, width):
        first, *steady = steps
        # stage 0 sends each micro-batch's activation, stage 1 each input gradient
        assert steady == [{"pp": {"send": m * per_microbatch}}] * 2
        # the first step also carries pipelining's one-time warm-up and shape exchange
        assert first["pp"]["send"] > m * per_microbatch
