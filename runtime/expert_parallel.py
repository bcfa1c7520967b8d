"""Expert parallelism: the experts of every MoE layer sharded over the ep axis, with an
all-to-all dispatch and combine of the routed rows around the grouped expert GEMMs.

Shape legend: R routed rows of this rank (expert-contiguous, global expert order),
Q rows received from the ep group, D model width, E experts, e = E/ep local experts.

Layout: the stacked weights w1_EDF, w3_EDF, w2_EFD become DTensors Shard(0) on the ep mesh:
ep rank j holds experts j*e .. (j+1)*e - 1 (contiguous blocks, so a rank's routed rows for
one destination are contiguous in x_RD). FQNs and global shapes are unchanged, so state
dicts reshard between plans.

Forward of one Experts module (replacing its forward; the model code is untouched):
  1. counts per (destination, local expert) from offsets_E; one all_to_all_single of the
     counts tells every rank how many rows it receives from each source (one host sync:
     gloo and NCCL both need the split sizes on the host);
  2. all_to_all_single of the rows with uneven split sizes; received rows are ordered by
     (source, local expert) and are regrouped to (local expert, source) by a stable sort;
  3. the model's own Experts.forward on the local rows with the local weights (to_local);
  4. the inverse regrouping and the reverse all_to_all_single bring every row home.
The all-to-alls are differentiable (`AllToAll`: the backward is the reverse exchange).
Dropless routing only: a capacity factor is refused at load time (trainer.py).
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from tera.models.moe import Experts

WEIGHTS = ("w1_EDF", "w3_EDF", "w2_EFD")


class AllToAll(torch.autograd.Function):
    """all_to_all_single of rows with uneven split sizes; backward is the reverse."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, dy):
        out_splits, in_splits = ctx.splits
        return _exchange(dy, in_splits, out_splits, ctx.group), None, None, None


def _exchange(x: torch.Tensor, out_splits, in_splits, group) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


def apply_expert_parallel(experts: Experts, ep_mesh) -> None:
    """Shard `experts` over the 1-D `ep_mesh` and route its forward through the ep group."""
    ep, j = ep_mesh.size(), ep_mesh.get_local_rank()
    for name in WEIGHTS:
        weight = getattr(experts, name)
        if weight is None:
            continue
        local = weight.detach().chunk(ep, dim=0)[j].clone()
        # Every rank holds the same full weight (same seed): cut locally, no scatter.
        sharded = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False)
        setattr(experts, name, nn.Parameter(sharded))
    group = ep_mesh.get_group()

    def forward(x_RD: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        counts_E = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1))
        send_Pe = counts_E.view(ep, -1)  # P: peers (ep ranks), e: their local experts
        recv_Pe = torch.empty_like(send_Pe)
        dist.all_to_all_single(recv_Pe, send_Pe, group=group)
        in_splits = send_Pe.sum(1).tolist()
        out_splits = recv_Pe.sum(1).tolist()
        x_QD = AllToAll.apply(x_RD, out_splits, in_splits, group)
        e = recv_Pe.shape[1]
        expert_Q = torch.arange(e, device=x_QD.device).repeat(ep)
        expert_Q = expert_Q.repeat_interleave(recv_Pe.flatten().long(), output_size=len(x_QD))
        order_Q = torch.sort(expert_Q, stable=True).indices
        local_offsets_e = torch.cumsum(recv_Pe.sum(0), 0, dtype=torch.int32)
        y_QD = _local_experts(experts).forward(x_QD[order_Q], local_offsets_e)
        y_QD = y_QD.index_select(0, torch.argsort(order_Q))
        return AllToAll.apply(y_QD, in_splits, out_splits, group)

    experts.forward = forward


def _local_experts(experts: Experts):
    """A view of `experts` whose weights are the local shards (plain tensors, gradients
    flowing back to the DTensors), on which the model's own Experts.forward runs."""
    weights = {
        name: None if getattr(experts, name) is None else getattr(experts, name).to_local()
        for name in WEIGHTS
    }
    view = types.SimpleNamespace(kind=experts.kind, **weights)
    view.forward = types.MethodType(Experts.forward, view)
    return view
