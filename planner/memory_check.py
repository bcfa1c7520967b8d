"""Check the cost model's memory per rank against a real CPU build of one rank's share.

`measure_rank` builds, in fp32 on the CPU and in one process (no torch.distributed), the
share of the model that one rank of a pipeline stage holds under a layout, as Megatron-LM
shards it, runs one micro-batch forward and backward and a torch.optim.AdamW step, and
measures four figures in bytes:

  params       weights the rank keeps between steps
  grads        gradients the rank holds when the optimizer steps
  optimizer    AdamW's exp_avg and exp_avg_sq. torch also keeps one scalar `step` tensor
               per optimized tensor: that is O(tensors), not O(parameters), and no cost
               model counts it, so it is reported apart as `optimizer_steps`
  activations  bytes saved for backward during the forward, seen by
               torch.autograd.graph.saved_tensors_hooks: each storage counted once, whole
               (a saved view holds its base alive), parameter storage excluded

`compare` puts them next to `CostModel.stage_memory` for the same layout in fp32, with a
global batch of dp*mbs so that the prediction's activations are one micro-batch's.

The rank's share (Megatron-LM's rules, the first rank of the stage):
  - dense weights split over tp: attention heads and KV heads (column-parallel q, k, v and
    the row-parallel output), the dense FFN and the shared experts' hidden width, the
    vocabulary of the embedding and the LM head; norms, the router gate and MLA's
    down-projections are whole (tp-replicated), and so are learned position embeddings
    (Megatron keeps them in a plain torch.nn.Embedding);
  - routed experts: the rank holds E/ep experts, each of hidden width F/etp. The router
    still scores all E experts; the rows a rank's experts receive from the all-to-all are
    emulated by sending each row to local expert (global expert mod E/ep), which under
    balanced routing gives every local expert the T*K*ep/E rows that dispatch delivers;
  - pipeline stage s holds the blocks of its chunks (layers cut into pp*vpp contiguous
    chunks, chunk c on stage c % pp), the embedding on stage 0 and the final norm and LM
    head on the last stage; with tied embeddings a last stage that is not also the first
    keeps its own copy of the embedding for the head, as Megatron does;
  - weights and gradients live in two contiguous flat fp32 buffers, dense and expert
    (Megatron's DDP buffers); ZeRO shards each over its own data-parallel group, whose
    size comes from tera.planner.ranks: dense over dp_cp, experts over edp_full (HSDP,
    zero=3 with dp_replicate > 1, shards inside one replica). The first rank of a stage is
    position 0 of its groups, so it owns the first n/shards entries of a buffer of n
    parameters. Stage 1: AdamW steps a parameter aliasing only that slice, so its moments
    are 1/shards of the buffer (Megatron's distributed optimizer); stage 2: after backward
    the rank keeps only its slice of the gradient buffer (the reduce-scatter's output) and
    frees the rest; stage 3: the rank also keeps only its slice of the weights (the
    forward used the whole buffer, as a per-layer all-gather would provide it). A single
    process has no peers, so the slice's gradient is the rank's own, not a sum; bytes do
    not depend on it. Buffers are not padded: n must divide by the shard count (Megatron
    pads it; the cost model does not count padding).

A stage after the first starts from a received activation (requires_grad, as a pipeline
keeps it for backward); a stage before the last backpropagates a random output gradient
and its auxiliary losses. Communication buffers (StageMemory.buffers) are not measured.

Restrictions: saved bytes are compared only for tp = cp = 1 and recompute=none (the
measurement never recomputes). The prediction assumes sequence parallelism (every saved
tensor divided by tp) and context parallelism (the sequence divided by cp), which one
process cannot reproduce without the communication that re-assembles the sequence;
parameters, gradients and optimizer state are compared exactly for every layout. tp must
divide the KV heads (no KV replication), and top_k must not exceed E/ep (the local MoE
layer is built from the models package).

Invariant: the measured figures are exact byte counts of storages that existed on the CPU
(saved activations during the forward, the rest after the step); none is computed from the
graph or the cost model.

Shape legend: B batch, S sequence, T tokens, D model width, E experts, e local experts,
K top-k.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from tera.models import ModelSpec
from tera.models.moe import Experts, MoE, Router
from tera.models.transformer import Block, LMHead
from tera.planner.cost.stages import chunk_bounds
from tera.planner.layout import Layout
from tera.planner.ranks import group_of

FIELDS = ("params", "grads", "optimizer", "activations")


@dataclass(frozen=True)
class MeasuredMemory:
    """Bytes held by one rank of a stage (see the module docstring for each figure)."""

    params: int
    grads: int
    optimizer: int
    activations: int
    optimizer_steps: int  # AdamW's scalar `step` tensors, excluded from `optimizer`


@dataclass(frozen=True)
class Comparison:
    """Predicted (CostModel.stage_memory) and measured bytes of one rank of one stage.
    `activations_comparable` is False where the prediction's sharding of saved tensors
    cannot be emulated in one process (tp > 1, cp > 1 or recomputation)."""

    layout: Layout
    stage: int
    predicted: dict[str, float]
    measured: MeasuredMemory
    activations_comparable: bool

    def errors(self, saved_tolerance: float = 0.10) -> list[str]:
        """Violations: params, grads and optimizer must match exactly, activations within
        `saved_tolerance` of the measurement (when comparable). Empty when all hold."""
        out = []
        for name in FIELDS:
            if name == "activations" and not self.activations_comparable:
                continue
            predicted, measured = self.predicted[name], getattr(self.measured, name)
            tolerance = saved_tolerance * measured if name == "activations" else 0
            if abs(predicted - measured) > tolerance:
                out.append(
                    f"{self.layout} stage {self.stage} {name}: predicted {predicted:,.0f} B, "
                    f"measured {measured:,} B ({predicted / measured - 1:+.1%})"
                )
        return out


def resolve(spec: ModelSpec, layout: str | Layout, seq_len: int) -> Layout:
    """Resolve `layout` on its own world size: tp*cp*pp*dp ranks (dp defaults to 1) and a
    global batch of dp*mbs sequences, i.e. one micro-batch per step."""
    parsed = layout if isinstance(layout, Layout) else Layout.parse(layout)
    dp = parsed.dp or 1
    gpus = parsed.tp * parsed.cp * parsed.pp * dp
    return parsed.resolve(spec, gpus, dp * parsed.mbs, seq_len)


def compare(spec: ModelSpec, layout: str | Layout, stage: int, seq_len: int) -> Comparison:
    """The cost model's fp32 memory for one rank of `stage` against `measure_rank`."""
    from tera.planner.cost import CostModel
    from tera.planner.trace import trace
    from tera.topologies import load

    resolved = resolve(spec, layout, seq_len)
    gpus = resolved.tp * resolved.cp * resolved.pp * resolved.dp
    cost = CostModel(
        trace(spec, seq_len),
        load("local-cpu", gpus=gpus),
        resolved,
        resolved.dp * resolved.mbs,
        "fp32",
    )
    predicted = cost.stage_memory(cost.stages[stage]).as_dict()
    comparable = resolved.tp == resolved.cp == 1 and resolved.recompute == "none"
    measured = measure_rank(spec, resolved, stage, seq_len)
    return Comparison(resolved, stage, predicted, measured, comparable)


def rank_spec(spec: ModelSpec, layout: Layout) -> ModelSpec:
    """The spec whose modules have the shapes of one rank's share: heads, KV heads, FFN
    and shared-expert widths and the vocabulary divided by tp, E/ep experts of width
    F/etp. Raises ValueError for a width that does not divide."""
    tp, a = layout.tp, spec.attention
    attention = dataclasses.replace(
        a,
        heads=_split("attention.heads", a.heads, tp),
        kv_heads=_split("attention.kv_heads", a.kv_heads, tp),
    )
    ffn = dataclasses.replace(spec.ffn, hidden=_split("ffn.hidden", spec.ffn.hidden, tp))
    moe = spec.moe
    if moe is not None:
        local = _split("moe.experts", moe.experts, layout.ep)
        if moe.top_k > local:
            raise ValueError(f"moe.top_k {moe.top_k} exceeds the {local} experts of one ep rank")
        shared = moe.shared_hidden and _split("moe.shared_hidden", moe.shared_hidden, tp)
        moe = dataclasses.replace(
            moe,
            experts=local,
            expert_hidden=_split("moe.expert_hidden", moe.expert_hidden, layout.etp),
            shared_hidden=shared,
        )
    vocab = _split("vocab", spec.vocab, tp)
    return dataclasses.replace(spec, vocab=vocab, attention=attention, ffn=ffn, moe=moe)


def _split(name: str, value: int, parts: int) -> int:
    if value % parts:
        raise ValueError(f"{name} {value} does not split into {parts} equal shards")
    return value // parts


class _RankRouter(nn.Module):
    """The full router (all E experts, whole on every tp rank) whose rows are delivered to
    the E/ep local experts: global expert g goes to local expert g mod E/ep. Under
    balanced routing that is the row count dispatch gives each local expert."""

    balanced = True

    def __init__(self, dim: int, moe, local_experts: int):
        super().__init__()
        self.inner = Router(dim, moe, balanced=True)
        self.local = local_experts

    @property
    def aux_loss(self) -> torch.Tensor | None:
        return self.inner.aux_loss

    def forward(self, x_TD: torch.Tensor):
        expert_idx_TK, weight_TK, counts_E = self.inner(x_TD)
        counts_e = counts_E.view(-1, self.local).sum(0)
        return expert_idx_TK % self.local, weight_TK, counts_e


class _RankModel(nn.Module):
    """The blocks `layers` of the rank spec, with the embedding when `first` and the final
    norm and LM head when `last`. forward returns the loss on the last stage and
    (output, auxiliary losses) elsewhere."""

    def __init__(self, spec: ModelSpec, local: ModelSpec, layers, first: bool, last: bool):
        super().__init__()
        D = spec.hidden
        self.embed = None
        if first or (last and spec.tie_embeddings):
            self.embed = nn.Embedding(local.vocab, D)
        self.pos_embed = None
        if first and spec.position == "learned":  # replicated over tp (torch.nn.Embedding)
            self.pos_embed = nn.Embedding(spec.max_seq_len, D)
        self.first = first
        self.layers = nn.ModuleList(Block(local, i, balanced_routing=True) for i in layers)
        for module in list(self.modules()):  # the loop replaces submodules
            if isinstance(module, MoE):
                module.router = _RankRouter(D, spec.moe, local.moe.experts)
            if isinstance(module, Experts):  # allocated with torch.empty
                for p in module.parameters():
                    nn.init.normal_(p, std=0.02)
        self.head = LMHead(local, self.embed) if last else None

    def forward(self, x: torch.Tensor, targets_BS: torch.Tensor):
        if self.first:
            tokens_BS = x
            x = self.embed(tokens_BS)
            if self.pos_embed is not None:
                x = x + self.pos_embed(torch.arange(tokens_BS.shape[1]))
        for layer in self.layers:
            x = layer(x)
        aux = [m.aux_loss for m in self.modules() if isinstance(m, MoE) and m.aux_loss is not None]
        if self.head is None:
            return x, aux
        return self.head(x, targets_BS, aux)


def measure_rank(spec: ModelSpec, layout: Layout, stage: int, seq_len: int) -> MeasuredMemory:
    """Build the first rank of pipeline stage `stage` of a resolved `layout` in fp32 on the
    CPU, run one micro-batch of `layout.mbs` sequences of `seq_len` tokens forward and
    backward and one AdamW step, and return what it holds (see the module docstring)."""
    if not 0 <= stage < layout.pp:
        raise ValueError(f"stage {stage} outside the {layout.pp} pipeline stages")
    local = rank_spec(spec, layout)
    bounds = chunk_bounds(layout.chunk_sizes(spec.layers))
    layers = [
        i for c, (a, b) in enumerate(bounds) if c % layout.pp == stage for i in range(a, b + 1)
    ]
    first, last = stage == 0, stage == layout.pp - 1
    model = _RankModel(spec, local, layers, first, last).float()
    experts = {p for m in model.modules() if isinstance(m, Experts) for p in m.parameters()}
    params = list(model.parameters())  # unique: a tied head shares the embedding's weight
    # The first rank of the stage: position 0 of each of its ZeRO groups.
    dense_shards, expert_shards = _zero_shards(layout, stage * layout.mesh.world // layout.pp)
    buffers = [
        _FlatBuffer([p for p in params if p not in experts], dense_shards),
        _FlatBuffer([p for p in params if p in experts], expert_shards),
    ]
    buffers = [b for b in buffers if b.size]

    B, S = layout.mbs, seq_len
    targets_BS = torch.randint(0, local.vocab, (B, S))
    x = torch.randint(0, local.vocab, (B, S)) if first else torch.randn(B, S, spec.hidden)
    x.requires_grad_(not first)  # a received activation: its gradient is sent back
    weights = {b.weights.untyped_storage().data_ptr() for b in buffers}
    saved: dict[int, int] = {}
    alive = []  # hold every saved tensor so that no freed storage's address is reused

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved.setdefault(storage.data_ptr(), storage.nbytes())
        alive.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x, targets_BS)
    if last:
        out.backward()
    else:  # the next stage's gradient, and the auxiliary losses' own backward
        y, aux = out
        torch.autograd.backward([y, *aux], [torch.randn_like(y), *map(torch.ones_like, aux)])
    alive.clear()

    mains = [b.step_state(layout.zero) for b in buffers]
    optimizer = torch.optim.AdamW(mains)
    optimizer.step()
    moments = steps = 0
    for state in optimizer.state.values():
        moments += _storage_bytes(state["exp_avg"], state["exp_avg_sq"])
        steps += _storage_bytes(state["step"])
    return MeasuredMemory(
        params=_storage_bytes(*(b.weights for b in buffers)),
        grads=_storage_bytes(*(b.grads for b in buffers)),
        optimizer=moments,
        activations=sum(saved.values()),
        optimizer_steps=steps,
    )


def _storage_bytes(*tensors: torch.Tensor) -> int:
    """Bytes of the distinct storages behind `tensors`."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _zero_shards(layout: Layout, rank: int) -> tuple[int, int]:
    """Ranks of the dense and of the expert ZeRO shard group of `rank`, read off the
    Megatron-order process groups: dp_cp and edp_full, cut to one replica under HSDP."""
    sizes = [len(group_of(layout.mesh, axis, rank)) for axis in ("dp_cp", "edp_full")]
    if layout.zero == 3 and layout.dp_replicate > 1:
        sizes = [size // layout.dp_replicate for size in sizes]
    return sizes[0], sizes[1]


class _FlatBuffer:
    """Parameters made views of one flat fp32 weight buffer and one flat gradient buffer
    (autograd accumulates into an existing .grad in place), of which the rank owns the
    first 1/shards. Invariant: `weights` and `grads` are what the rank keeps."""

    def __init__(self, params: list[nn.Parameter], shards: int):
        self.params = params
        self.size = sum(p.numel() for p in params)
        if self.size % shards:
            raise ValueError(f"{self.size} parameters do not split into {shards} ZeRO shards")
        self.weights = torch.empty(self.size)
        self.grads = torch.zeros(self.size)
        start = 0
        for p in params:
            end = start + p.numel()
            self.weights[start:end].copy_(p.detach().flatten())
            p.data = self.weights[start:end].view_as(p)
            p.grad = self.grads[start:end].view_as(p)
            start = end
        self.shard = self.size // shards

    def step_state(self, zero: int) -> nn.Parameter:
        """After backward: drop what ZeRO stage `zero` does not keep and return the main
        parameter AdamW steps: the owned slice from stage 1 on, else the whole buffer."""
        if any(
            p.grad.untyped_storage().data_ptr() != self.grads.untyped_storage().data_ptr()
            for p in self.params
        ):
            raise RuntimeError("autograd replaced a gradient view instead of accumulating")
        if zero >= 2:  # the reduce-scatter's output; the full gradient buffer is freed
            self.grads = self.grads[: self.shard].clone()
            for p in self.params:
                p.grad = None
        if zero >= 3:  # the weights outside the slice were all-gathered for the step only
            self.weights = self.weights[: self.shard].clone()
            for p in self.params:
                p.data = torch.empty(0)
        keep = slice(0, self.size if zero == 0 else self.shard)
        main = nn.Parameter(self.weights[keep])  # aliases the weights it updates
        main.grad = self.grads[keep]
        return main
