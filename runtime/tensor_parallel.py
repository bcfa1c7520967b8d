"""Tensor parallelism with sequence parallelism (Megatron-LM's SP), by DTensor
`parallelize_module`, on the blocks of one Chunk.

Between blocks the residual stream is a plain tensor holding this tp rank's sequence shard
[B, S/tp, D]. Per block (as torchtitan's Llama plan):
  attn_norm, ffn_norm, head.norm  SequenceParallel (norm on the shard, weight replicated)
  attention                       all-gather the sequence; q/k/v column-parallel (local heads:
                                  heads/tp and kv_heads/tp), o row-parallel reduce-scattering
                                  back to the sequence shard
  dense FFN                       all-gather; w1/w3 column-parallel, w2 row-parallel
  MoE                             no tensor parallelism: the router, the experts (expert
                                  parallelism and expert tensor parallelism over etp, its own
                                  axis, expert_parallel.py) and the shared expert run on the
                                  rank's own tokens, its sequence shard
  embedding                       row-parallel over the vocabulary, reduce-scattered to the
                                  sequence shard
  LM head                         column-parallel over the vocabulary, logits all-gathered
                                  (every tp rank computes the same cross-entropy)

Two consequences of the MoE running on a sequence shard:
  - the gradients of its replicated parameters (router gate, shared expert) and of q/k
    norms over local heads are partial sums over tp: `tp_partial_params` names them and
    the trainer sums them over tp after backward (experts are reduced over their own data
    parallel group, edp, which holds the tp ranks that share an expert shard);
  - the Switch load-balancing loss needs the routing statistics of the whole sequence. As
    Megatron-LM does, each rank sums the expert counts over tp (not differentiable) and
    forms its share coeff * E * sum_e f_e * (sum of its tokens' p_e) / T; the shares add
    up over tp to the 1-rank loss exactly, and each share's gradient is the 1-rank loss's
    gradient with respect to this rank's tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from tera.kernels.router import gate_scores
from tera.models.moe import MoE, Router


def apply_tensor_parallel(chunk: nn.Module, tp_mesh) -> set[str]:
    """Parallelize `chunk` over `tp_mesh` in place; return the FQNs of the parameters whose
    gradients are partial sums over tp."""
    tp = tp_mesh.size()
    if chunk.embed is not None:
        parallelize_module(
            chunk.embed,
            tp_mesh,
            RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        )
    if chunk.head is not None:
        parallelize_module(
            chunk.head,
            tp_mesh,
            {
                "norm": SequenceParallel(),
                "proj": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
            },
        )
    partial: set[str] = set()
    for index, block in chunk.layers.items():
        attn = block.attn
        attn.heads //= tp
        attn.kv_heads //= tp
        attn.core.heads //= tp
        plan = {
            "attn_norm": SequenceParallel(),
            "attn": PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
            ),
            "attn.q_proj": ColwiseParallel(),
            "attn.k_proj": ColwiseParallel(),
            "attn.v_proj": ColwiseParallel(),
            "attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
        }
        if isinstance(block.ffn, MoE):
            # The MoE takes its own tokens as a plain tensor and returns them so.
            plan["ffn"] = PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),), use_local_output=True
            )
            _sequence_parallel_aux_loss(block.ffn.router, tp_mesh.get_group(), tp)
            replicated = ["ffn.router", "ffn.shared"]  # absent ones match nothing
        else:
            plan["ffn"] = PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
            )
            plan["ffn.w1"] = ColwiseParallel()
            plan["ffn.w2"] = RowwiseParallel(output_layouts=Shard(1))
            if block.ffn.w3 is not None:
                plan["ffn.w3"] = ColwiseParallel()
            replicated = []
        if attn.q_norm is not None:
            replicated += ["attn.q_norm", "attn.k_norm"]  # applied to local heads only
        parallelize_module(block, tp_mesh, plan)
        for name, _ in block.named_parameters():
            if name.startswith(tuple(f"{prefix}." for prefix in replicated)):
                partial.add(f"layers.{index}.{name}")
    return partial


def _sequence_parallel_aux_loss(router: Router, group: dist.ProcessGroup, tp: int) -> None:
    """Replace the router's aux loss (computed on this rank's tokens alone) by this rank's
    share of the aux loss of the whole sequence (module docstring)."""
    logits: list[torch.Tensor] = []
    router.gate.register_forward_hook(lambda _m, _args, out: logits.append(out))

    def share(module: Router, _args, output) -> None:
        logits_TE = logits.pop()
        if module.aux_loss is None:
            return
        m = module.moe
        _, _, counts_E = output
        counts = counts_E.detach().float()
        dist.all_reduce(counts, group=group)
        tokens = logits_TE.shape[0] * tp  # every tp rank holds S/tp of each sequence
        scores_TE = gate_scores(logits_TE, m.score)
        probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
        fraction_E = counts / (tokens * m.top_k)
        mean_share_E = probs_TE.sum(0) / tokens
        module.aux_loss = m.aux_loss_coeff * m.experts * (fraction_E * mean_share_E).sum()

    router.register_forward_hook(share)
