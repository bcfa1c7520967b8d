"""Data parallelism as the plan's ZeRO stage says, and the gradient reductions of a step.

Dense parameters are data-parallel over dp (dp_replicate x dp_shard); expert parameters
over edp_full (dp_replicate x edp, where edp holds the tp and dp ranks that share an
expert shard). Gradients end as the gradient of the global mean loss: dense gradients are
averaged over dp; expert gradients are summed over edp_full (its ranks saw different
tokens, tp shards included) and divided by dp.

  zero=0  plain data parallelism: after the step's last micro-batch, one all-reduce per
          parameter kind (a flat bucket per group) over dp and over edp_full.
  zero=1  FSDP2 fully_shard, parameters kept gathered for the whole step
          (reshard_after_forward=False, resharded after the last micro-batch's backward)
          and gradients accumulated unsharded, reduce-scattered once after the last
          micro-batch: ZeRO-1 as Megatron-LM's distributed optimizer runs it (full
          gradients during accumulation, optimizer state and update sharded over dp,
          parameters re-gathered at the next step's first forward).
  zero=2  as zero=1, but gradients are reduce-scattered after every micro-batch (sharded
          gradients, ZeRO-2).
  zero=3  FSDP2 with reshard_after_forward=True: parameters gathered before each forward
          and backward, gradients reduce-scattered after every micro-batch. With
          dp_replicate > 1 this is HSDP: sharded over dp_shard, replicated over
          dp_replicate (a 2-D mesh); zero 1 and 2 shard over all of dp.
Under pipeline parallelism torch's schedule drives the FSDP switches itself: it
accumulates unsharded gradients over the micro-batches and reduces them once.

fully_shard is applied bottom-up: each MoE layer's experts on the expert data-parallel
mesh, each block, then the chunk (embedding, head) as the root. FSDP averages expert
gradients over edp_full; `GradientReducer.finish` rescales them by edp_full / dp. (FSDP2's
own gradient divide factor is not used: gloo lacks the pre-multiplied sum it needs, and on
a group of one rank torch 2.13 divides by it twice.)

Tensor-parallel gradients: parameters replicated over tp but used on a sequence shard
(tensor_parallel.py) hold partial sums; `GradientReducer.finish` sums them over tp, and
turns DTensor gradients whose placement is not their parameter's (a Partial gradient of a
SequenceParallel norm) into the parameter's placement.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from tera.models.moe import MoE


def apply_fsdp(chunk: nn.Module, meshes, zero: int, mp_policy: MixedPrecisionPolicy) -> None:
    """fully_shard `chunk` (a pipeline.Chunk) for ZeRO stage `zero` (1, 2 or 3)."""
    hsdp = zero == 3 and meshes.shape.dp_replicate > 1
    if hsdp:
        dense_mesh = meshes.dense["dp_replicate", "dp_shard"]
        expert_mesh = meshes.expert["dp_replicate", "edp"]
    else:
        dense_mesh, expert_mesh = meshes.mesh("dp"), meshes.mesh("edp_full")
    options = dict(reshard_after_forward=zero == 3, mp_policy=mp_policy)
    for block in chunk.layers.values():
        if isinstance(block.ffn, MoE):
            fully_shard(block.ffn.experts, mesh=expert_mesh, **options)
        fully_shard(block, mesh=dense_mesh, **options)
    fully_shard(chunk, mesh=dense_mesh, **options)


def set_microbatch(roots: list[nn.Module], zero: int, last: bool) -> None:
    """Before a micro-batch's backward (no pipeline): when FSDP reduces and reshards."""
    for root in roots:
        if not isinstance(root, FSDPModule):
            continue
        root.set_requires_gradient_sync(last or zero >= 2)
        root.set_reshard_after_backward(last or zero == 3)
        root.set_is_last_backward(last)


class GradientReducer:
    """The reductions after a step's backward that FSDP does not do (module docstring)."""

    def __init__(self, model: nn.Module, meshes, zero: int, tp_partial: set[str]):
        self.model, self.meshes, self.zero = model, meshes, zero
        self.tp_partial = tp_partial

    def finish(self) -> None:
        params = dict(self.model.named_parameters())
        for p in params.values():
            g = p.grad
            if isinstance(g, DTensor) and g.placements != p.placements:
                p.grad = g.redistribute(p.device_mesh, p.placements)
        m = self.meshes
        if m.size("tp") > 1:
            _all_reduce([params[n] for n in sorted(self.tp_partial)], m.group("tp"))
        experts = [p for n, p in params.items() if ".experts." in n]
        if self.zero == 0:
            dense = [p for n, p in params.items() if ".experts." not in n]
            _all_reduce(dense, m.group("dp"), divide=m.dp_size)
            _all_reduce(experts, m.group("edp_full"), divide=m.dp_size)
        elif m.size("edp_full") != m.dp_size:
            with torch.no_grad():
                for p in experts:
                    if p.grad is not None:
                        p.grad.mul_(m.size("edp_full") / m.dp_size)


def _all_reduce(params: list[nn.Parameter], group, divide: int = 1) -> None:
    """Sum the local gradients of `params` over `group` in one flat bucket, then divide."""
    grads = [_local(p.grad) for p in params if p.grad is not None]
    if not grads or (dist.get_world_size(group) == 1 and divide == 1):
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    if divide != 1:
        flat /= divide
    for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
        g.copy_(reduced)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t
