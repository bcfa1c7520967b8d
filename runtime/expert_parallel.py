"""Expert parallelism and expert tensor parallelism: the experts of every MoE layer sharded
over the ep axis, each expert's hidden width F over the etp axis, with an all-to-all
dispatch and combine of the routed rows around the grouped expert GEMMs.

Shape legend: R routed rows of this rank (expert-contiguous, global expert order),
Q rows received from the ep group (after the etp exchange: the rows of the whole etp
group), D model width, E experts, e = E/ep local experts, F expert hidden width, P ep
peers, X etp peers, G the sources of the received rows (P, or X*P after the etp exchange).

Layout: the stacked weights w1_EDF, w3_EDF, w2_EFD become DTensors on the 2-D expert mesh
("ep", "etp"), Shard(0) over ep and Shard(F) over etp (dim 2 of w1/w3, dim 1 of w2): ep
rank j holds experts j*e .. (j+1)*e - 1 (contiguous blocks, so a rank's routed rows for
one destination are contiguous in x_RD), etp rank f their F columns f*F/etp ..
(f+1)*F/etp - 1. FQNs and global shapes are unchanged, so state dicts reshard between
plans. The ep group of a rank holds the ranks of its etp coordinate (planner/ranks.py).

Forward of one Experts module (replacing its forward; the model code is untouched):
  1. counts per (destination, local expert) from offsets_E; one all_to_all_single of the
     counts tells every rank how many rows it receives from each source (one host sync:
     gloo and NCCL both need the split sizes on the host);
  2. all_to_all_single of the rows with uneven split sizes; received rows are ordered by
     (source, local expert);
  3. etp > 1: the etp peers hold different rows (their own tokens), and every peer must
     apply its F-shard to all of them: an all_to_all_single of the received counts, then
     one of the rows, each rank sending all its rows to every peer (an all-gather with
     uneven sizes, which gloo's all_gather lacks); the rows are then ordered by
     (peer, source, local expert);
  4. a stable sort regroups the rows to local-expert order, and the model's own
     Experts.forward runs on them with the local weights (to_local); with etp > 1 its
     outputs are partial sums over the F-shards;
  5. the inverse regrouping; etp > 1: the reverse all_to_all_single sends every peer the
     partial outputs of its rows, which it sums (a reduce-scatter with uneven sizes);
  6. the reverse ep all_to_all_single brings every row home.
The all-to-alls are differentiable (`AllToAll`: the backward is the reverse exchange), so
the backward mirrors this: the gradients of the rows sent to the etp peers come back and
are summed, and every rank's expert gradients are those of its F-shard for the rows of
its etp group (summed over edp like any expert gradient, data_parallel.py).
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


def apply_expert_parallel(experts: Experts, mesh) -> None:
    """Shard `experts` over the 2-D ("ep", "etp") `mesh` and route its forward through the
    ep and etp groups (module docstring)."""
    ep, j = mesh.size(0), mesh.get_local_rank(0)
    etp, f = mesh.size(1), mesh.get_local_rank(1)
    for name in WEIGHTS:
        weight = getattr(experts, name)
        if weight is None:
            continue
        hidden = 2 if name.endswith("_EDF") else 1  # the dimension of F
        local = weight.detach().chunk(ep, dim=0)[j].chunk(etp, dim=hidden)[f].clone()
        # Every rank holds the same full weight (same seed): cut locally, no scatter.
        sharded = DTensor.from_local(local, mesh, [Shard(0), Shard(hidden)], run_check=False)
        setattr(experts, name, nn.Parameter(sharded))
    ep_group, etp_group = mesh.get_group(0), mesh.get_group(1)

    def forward(x_RD: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        counts_E = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1))
        send_Pe = counts_E.view(ep, -1)  # P: peers (ep ranks), e: their local experts
        recv_Pe = torch.empty_like(send_Pe)
        dist.all_to_all_single(recv_Pe, send_Pe, group=ep_group)
        in_splits = send_Pe.sum(1).tolist()
        out_splits = recv_Pe.sum(1).tolist()
        x_QD = AllToAll.apply(x_RD, out_splits, in_splits, ep_group)
        e = recv_Pe.shape[1]
        recv_Ge = recv_Pe  # rows per (source, local expert), sources in the order received
        if etp > 1:
            # Every etp peer computes its F-shard for the rows of the whole etp group:
            # each rank sends all its rows to every peer, with its counts first.
            mine = len(x_QD)
            counts_XPe = recv_Pe.new_empty((etp, ep, e))
            dist.all_to_all_single(counts_XPe, recv_Pe.repeat(etp, 1, 1), group=etp_group)
            peer_rows = counts_XPe.sum((1, 2)).tolist()
            x_QD = AllToAll.apply(x_QD.repeat(etp, 1), peer_rows, [mine] * etp, etp_group)
            recv_Ge = counts_XPe.view(etp * ep, e)
        expert_Q = torch.arange(e, device=x_QD.device).repeat(len(recv_Ge))
        expert_Q = expert_Q.repeat_interleave(recv_Ge.flatten().long(), output_size=len(x_QD))
        order_Q = torch.sort(expert_Q, stable=True).indices
        local_offsets_e = torch.cumsum(recv_Ge.sum(0), 0, dtype=torch.int32)
        y_QD = _local_experts(experts).forward(x_QD[order_Q], local_offsets_e)
        y_QD = y_QD.index_select(0, torch.argsort(order_Q))
        if etp > 1:
            # Each peer's partial outputs of this rank's rows come back and are summed:
            # the reduce-scatter over etp.
            y_XQD = AllToAll.apply(y_QD, [mine] * etp, peer_rows, etp_group)
            y_QD = y_XQD.view(etp, mine, -1).sum(0)
        return AllToAll.apply(y_QD, in_splits, out_splits, ep_group)

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
