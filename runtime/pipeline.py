"""Pipeline split by the plan's stages and virtual chunks, and the pipeline schedules.

Chunk c holds blocks first..last of plan.stages() and runs on stage c % pp; the first chunk
also holds the embedding, the last the final norm and the LM head. A `Chunk` keeps the
unsplit Transformer's attribute names (`embed`, `layers` keyed by the block's original
index, `head`), so its parameter FQNs are the unsplit model's ("layers.3.attn.q_proj.weight")
whatever the plan. `split` also returns the union of a rank's chunks under the same names,
the module whose parameters the optimizer and the state dicts see (it is never called).

MoE auxiliary losses (the Router's Switch loss, which the 1-rank model adds to the loss)
are computed inside the blocks of every stage, but only the last stage holds the loss. As
Megatron-LM's MoEAuxLossAutoScaler does, each chunk attaches a block's aux loss to the
block's output with `AttachAuxLoss`: the identity forward, and in backward it also sends
d(loss)/d(aux) = `aux_scale` (1 / micro-batches, the weight of one micro-batch's loss in
the step's mean) into the aux loss's graph. So every stage's aux losses reach the backward
without travelling to the last stage; their values are kept in `aux_values` for logging.

Schedules: torch.distributed.pipelining's Schedule1F1B for vpp == 1 and
ScheduleInterleaved1F1B for vpp > 1 (PipelineStage c on pp rank c % pp), with
scale_grads=False because the loss function already divides by the micro-batch count.
Both need at least pp micro-batches (trainer.check_supported refuses fewer).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

from tera.models.moe import MoE


class AttachAuxLoss(torch.autograd.Function):
    """y = x; backward also returns `scale` as the gradient of `aux` (a scalar loss)."""

    @staticmethod
    def forward(ctx, x, aux, scale: float):
        ctx.scale = scale
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        # an alias of x that is no autograd view (x.view_as(x) would be one): FSDP warns
        # about modules returning views, which in-place ops could detach from its hooks
        return x.detach()

    @staticmethod
    def backward(ctx, dy):
        shape, dtype, device = ctx.aux_meta
        return dy, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


class Chunk(nn.Module):
    """Blocks `layers` of `model` (+ embedding, + head) under their original names."""

    def __init__(self, model: nn.Module, layers: list[int], embed: bool, head: bool):
        super().__init__()
        self.embed = model.embed if embed else None
        self.pos_embed = model.pos_embed if embed else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
        self.head = model.head if head else None
        self.aux_scale = 1.0
        self.aux_values: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids -> hidden states (first chunk), hidden -> hidden, hidden -> logits
        (last chunk)."""
        if self.embed is not None:
            tokens_BS = x
            x = self.embed(tokens_BS)
            if self.pos_embed is not None:
                x = x + self.pos_embed(torch.arange(tokens_BS.shape[1], device=x.device))
        for block in self.layers.values():
            x = block(x)
            aux = block.ffn.aux_loss if isinstance(block.ffn, MoE) else None
            if aux is not None:
                self.aux_values.append(aux.detach())
                x = AttachAuxLoss.apply(x, aux, self.aux_scale)
        return self.head(x) if self.head is not None else x


def chunk_layers(plan) -> list[tuple[int, list[int]]]:
    """(chunk index, its blocks) of every chunk, in chunk order."""
    chunks = [c for stage in plan.stages() for c in stage["chunks"]]
    chunks.sort(key=lambda c: c["chunk"])
    return [(c["chunk"], list(range(c["first_layer"], c["last_layer"] + 1))) for c in chunks]


def split(model: nn.Module, plan, pp_rank: int) -> tuple[list[tuple[int, Chunk]], Chunk]:
    """This pp rank's chunks [(chunk index, Chunk)] and the local model (their union)."""
    chunks = chunk_layers(plan)
    last = len(chunks) - 1
    mine = [(c, layers) for c, layers in chunks if c % plan.layout.pp == pp_rank]
    local_chunks = [(c, Chunk(model, layers, c == 0, c == last)) for c, layers in mine]
    union = [i for _, layers in mine for i in layers]
    local = Chunk(model, union, any(c == 0 for c, _ in mine), any(c == last for c, _ in mine))
    return local_chunks, local


def build_schedule(chunks, plan, pp_group, device, loss_fn, microbatches: int, dtypes):
    """The plan's schedule over this rank's chunks (`pp_group`: the pp axis's group).

    Stage inputs and outputs are declared (token ids [mbs, S] into the first chunk, the
    sequence shard [mbs, S/tp, D] between chunks, logits [mbs, S, V] out of the last), so
    torch skips its metadata inference, which would run an extra forward and backward on
    placeholder tensors. `dtypes`: (hidden states, logits) as the parallelized model
    produces them."""
    L, spec = plan.layout, plan.spec
    num_stages = L.pp * L.vpp
    hidden_dtype, logits_dtype = dtypes

    def meta(*shape, dtype):
        # requires_grad marks what carries a gradient back across stages
        return torch.empty(shape, dtype=dtype, device="meta", requires_grad=dtype.is_floating_point)

    hidden = meta(L.mbs, plan.seq_len // L.tp, spec.hidden, dtype=hidden_dtype)
    stages = [
        PipelineStage(
            chunk,
            c,
            num_stages,
            torch.device(device),
            input_args=meta(L.mbs, plan.seq_len, dtype=torch.long) if c == 0 else hidden,
            output_args=(
                meta(L.mbs, plan.seq_len, spec.vocab, dtype=logits_dtype)
                if c == num_stages - 1
                else hidden
            ),
            group=pp_group,
        )
        for c, chunk in chunks
    ]
    if L.vpp == 1:
        return Schedule1F1B(stages[0], microbatches, loss_fn=loss_fn, scale_grads=False)
    return ScheduleInterleaved1F1B(stages, microbatches, loss_fn=loss_fn, scale_grads=False)
