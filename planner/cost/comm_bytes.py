"""Bytes per collective kind that one training step moves on one rank: the prediction, for
the runtime's layout of the model, of what tera.runtime.comm_stats measures.

Everything derives from the quantities the cost model (estimate.py) costs with: A, the
bytes of one block input of a micro-batch before sequence-parallel sharding
(CostModel._activation_bytes: mbs * seq * hidden * activation bytes / cp), the
micro-batches per step m, the blocks and held segments of the rank's pipeline stage
(stages.py), the parameters of each segment (stages.Totals, the graph's nodes) and the
ZeRO stage. Elements move at the run's precision: 4 bytes in fp32, else 2 (bf16
activations and weights; gradients as estimate.py reduces them).

Byte convention (runtime/comm_stats.py, topologies/collectives.py): all_reduce the tensor,
all_gather the output, reduce_scatter the input, all_to_all the input including the slice
kept, send the tensor sent (receives uncounted). Kinds: tp, cp, ep, etp, pp, dp (dense data
parallelism), edp (expert data parallelism, edp_full), world (the trainer's scalar
reductions over all ranks). A group of one rank moves nothing and is not predicted.

What the runtime does (runtime/tensor_parallel.py, expert_parallel.py, pipeline.py,
data_parallel.py, trainer.py), per micro-batch on the rank's stage:
  tp  (tp > 1, sequence parallel) attention of every block and the FFN of dense blocks
      all-gather A before and reduce-scatter A after in forward, the mirror in backward;
      MoE blocks run router, experts and shared expert on the rank's sequence shard (no
      tensor parallelism). The vocabulary-parallel embedding reduce-scatters A forward
      and all-gathers A backward; the head all-gathers A before its projection (reduce-
      scatter backward) and all-gathers the logits (mbs * seq * vocab elements, / cp),
      every tp rank computing the same cross-entropy. Each MoE block's router all-reduces
      its expert counts (E fp32) for the load-balancing loss. Full recompute repeats the
      forward collectives of the blocks but a dense block's last reduce-scatter: torch's
      non-reentrant checkpoint stops re-running a block once the last tensor it saves for
      backward is rebuilt (the input of the FFN's w2), and nothing saves that output.
  ep  (ep > 1) per MoE block one all-to-all of the expert counts (E int32), then a
      dispatch and a combine all-to-all of the rank's routed rows, A / tp * top_k bytes
      (its sequence shard's tokens, top_k rows each), in forward and again in backward;
      full recompute repeats the forward three. Dispatch forward and combine backward send
      the rank's own rows whatever the routing; combine forward and dispatch backward
      send the rows its experts received: equal under balanced routing
      (Transformer(balanced_routing=True)), the cost model's view, which this predicts.
  etp (etp > 1) per MoE block, after the ep dispatch (or on the rank's own routed rows
      when ep = 1), one all-to-all of the received counts (etp copies of E int32), then
      one sending all the rank's received rows to every etp peer (etp copies of A / tp *
      top_k bytes) and one sending every peer the partial outputs of its rows (the
      etp group's rows: etp times as many under balanced routing), in forward and
      mirrored in backward; full recompute repeats the forward three.
  cp  (cp > 1; the runtime refuses it) estimate.py's ring: per block cp - 1 sends of this
      rank's K and V forward, 2 * (cp - 1) backward.
  pp  (pp > 1) per chunk of the stage, one send of its output (A / tp, the local sequence
      shard) in forward unless it is the last chunk, one send of its input gradient in
      backward unless it is the first. The first step also carries pipelining's one-time
      warm-up and shape exchange, not predicted.
Per step:
  tp  the gradients of the parameters every tp rank holds whole are partial sums over
      tp and are all-reduced: the router gate, shared experts (and q/k norms) once, by
      the trainer, as the local gradient (a 1/dp shard under FSDP2); the sequence-
      parallel norms (DTensors) whole, by FSDP2 at each of its reductions (by the trainer
      once without FSDP2).
  dp, edp  the stage's dense parameters over dp and its expert parameters over edp:
      zero=0  one all-reduce of the gradients;
      zero=1  one all-gather of the parameters (the first forward) and one
              reduce-scatter of the gradients (after the last backward);
      zero=2  as zero=1, but reduce-scattered after every micro-batch without pipeline
              parallelism (with it, pipelining reduces once per step);
      zero=3  FSDP2 units (every block, each MoE block's experts, the chunk's root;
              resharded after forward, root included): with pp = 1 every micro-batch
              gathers each unit for forward and again for backward and reduce-scatters
              its gradients (estimate.py's 2m gathers and m reductions); with pp > 1
              pipelining reduces once per step and keeps units gathered after a backward,
              so a unit is gathered by every forward or backward of its chunk that does
              not follow a backward of that chunk, in the schedule's order. HSDP
              (dp_replicate > 1) adds an all-reduce of each reduce-scattered shard.
  world  the step's loss (cross-entropy and aux sums, 2 float64) and squared gradient
      norm (1 float64), each all-reduced over all ranks.

Not predicted: FSDP2's padding of a parameter's dim 0 to a multiple of the shard count
(none in tiny-moe), pipelining's first-step warm-up, routing imbalance (see ep).

Where this departs from estimate.py's time model: estimate.py gives MoE blocks with
shared experts a tp all-gather / reduce-scatter pair around the FFN (Megatron shards
shared experts over tp; the runtime replicates them), and costs neither the embedding,
head, logits, router-count and replicated-gradient collectives, nor zero=2's per
micro-batch reduce-scatter, nor pipelining's once-a-step reduction under zero=3.

Invariant: every figure is >= 0; a parallelism of degree 1 predicts no bytes of its kind;
per-micro-batch collectives scale linearly with the micro-batch count.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass

from tera.planner.cost.estimate import CostModel
from tera.planner.cost.stages import BLOCK_KINDS, Stage
from tera.planner.ranks import group_of

WORLD_SCALARS = (2 * 8, 8)  # trainer: loss (2 float64) and squared grad norm (float64)
COUNT_BYTES = 4  # expert counts: int32 offsets (ep), fp32 (tp's aux-loss statistics)


@dataclass(frozen=True)
class Collective:
    """Bytes one kind of collective moves on the rank in one step, and why."""

    kind: str  # tp | cp | ep | etp | pp | dp | edp | world
    op: str  # all_gather | reduce_scatter | all_reduce | all_to_all | send
    nbytes: float  # per step
    what: str


def cost_model(plan) -> CostModel:
    """The cost model of a plan (the graph is traced once per model and sequence)."""
    from tera.planner.trace import trace

    graph = trace(plan.spec, plan.seq_len)
    return CostModel(graph, plan.cluster, plan.layout, plan.global_batch, plan.precision)


def predicted_collectives(plan, rank: int = 0) -> list[Collective]:
    """Every predicted collective of one step on `rank` (the plan's stages differ)."""
    cm = cost_model(plan)
    stage = cm.stages[group_of(plan.layout.mesh, "pp", rank).index(rank)]
    found = _tp(cm, stage) + _ep(cm, stage) + _etp(cm, stage) + _cp(cm, stage)
    found += _pp(cm, stage) + _dp(cm, stage)
    if plan.world_size > 1:
        found.append(Collective("world", "all_reduce", sum(WORLD_SCALARS), "loss, grad norm"))
    return [c for c in found if c.nbytes > 0]


def predicted_comm_ops(plan, rank: int = 0) -> dict[str, dict[str, int]]:
    """{kind: {collective: bytes}} of one step on `rank` (CommCounter.step_ops's shape)."""
    ops: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for c in predicted_collectives(plan, rank):
        ops[c.kind][c.op] += c.nbytes
    return {kind: {op: round(n) for op, n in by_op.items()} for kind, by_op in ops.items()}


def predicted_comm_bytes(plan, rank: int = 0) -> dict[str, int]:
    """{kind: bytes} of one step on `rank` (CommCounter.step_bytes's shape)."""
    return {kind: sum(by_op.values()) for kind, by_op in predicted_comm_ops(plan, rank).items()}


def element_bytes(precision: str) -> int:
    """Bytes of an activation, weight or gradient element in collectives."""
    return 4 if precision == "fp32" else 2


SP_NORMS = ("attn_norm", "ffn_norm", "norm")  # module names of the sequence-parallel norms


@dataclass(frozen=True)
class TpWhole:
    """Parameters of one segment that every tp rank holds whole, by how the runtime sums
    their partial gradients over tp."""

    norms: int  # sequence-parallel norms: DTensors, summed as FSDP2 (or the trainer) reads
    other: int  # router gate, shared experts, q/k norms: summed by the trainer once a step


@functools.cache
def tp_whole(graph) -> dict[str, TpWhole]:
    """TpWhole of every segment kind, from the graph's nodes (blocks of a kind are alike):
    the tp-replicated nodes plus an MoE block's shared experts (`ffn.shared`)."""
    spec = graph.graph["spec"]
    sums: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for name, d in graph.nodes(data=True):
        if d.get("tp_replicated") or ".ffn.shared." in name:
            norm = d["kind"] == "norm" and name.rsplit(".", 1)[-1] in SP_NORMS
            sums[d["layer"]][0 if norm else 1] += d["params"]
    moe_layers = {d["layer"] for _, d in graph.nodes(data=True) if d["expert"]}
    first = {"embedding": -1, "head": spec["layers"]}
    for layer in range(spec["layers"]):
        first.setdefault("moe" if layer in moe_layers else "dense", layer)
    return {kind: TpWhole(*sums[layer]) for kind, layer in first.items()}


def tp_held_params(cm: CostModel, kind: str) -> tuple[float, float]:
    """(tensor-parallel, whole on every tp rank) dense parameters of one segment."""
    whole = tp_whole(cm.graph).get(kind, TpWhole(0, 0))
    held = whole.norms + whole.other
    return cm.segs.totals[kind].dense_params + cm.segs.totals[kind].replicated_params - held, held


def fsdp(layout) -> bool:
    """Whether the runtime applies FSDP2: a ZeRO stage and a data-parallel group."""
    expert_group = layout.dp * layout.tp * layout.cp // (layout.ep * layout.etp)
    return layout.zero >= 1 and (layout.dp * layout.cp > 1 or expert_group > 1)


def _fsdp_reductions(cm: CostModel) -> int:
    """How often per step FSDP2 reduce-scatters a dense unit's gradients (module docstring):
    after every micro-batch for zero >= 2 without pipeline parallelism, else once."""
    L = cm.layout
    return cm.microbatches if L.zero >= 2 and L.pp == 1 else 1


def _tp(cm: CostModel, stage: Stage) -> list[Collective]:
    L, m, spec = cm.layout, cm.microbatches, cm.spec
    if L.tp == 1:
        return []
    A, size = cm._activation_bytes(), element_bytes(cm.precision)
    blocks = sum(stage.counts[kind] for kind in BLOCK_KINDS)
    pairs = blocks + stage.counts["dense"]  # attention everywhere, FFN of dense blocks
    ends = stage.counts["embedding"] + stage.counts["head"]
    gathers = scatters = 2 * pairs + ends
    if stage.recompute == "full":  # but for a dense block's last reduce-scatter
        gathers, scatters = gathers + pairs, scatters + pairs - stage.counts["dense"]
    logits = m * stage.counts["head"] * A / spec["hidden"] * spec["vocab"]
    moe = spec["moe"]
    counts = 0.0
    if moe and moe["aux_loss_coeff"]:
        runs = 2 if stage.recompute == "full" else 1
        counts = m * runs * stage.counts["moe"] * moe["experts"] * COUNT_BYTES
    whole = tp_whole(cm.graph)
    norms = sum(n * whole[k].norms for k, n in stage.counts.items() if k in whole)
    other = sum(n * whole[k].other for k, n in stage.counts.items() if k in whole)
    if fsdp(L):  # FSDP2 sums the norms whole at each reduction; the rest is sharded
        norms *= _fsdp_reductions(cm)
        other /= L.dp * L.cp
    return [
        Collective("tp", "all_gather", m * gathers * A + logits, "sequence; logits"),
        Collective("tp", "reduce_scatter", m * scatters * A, "sequence after tp sub-layers"),
        Collective("tp", "all_reduce", counts, "expert counts for the load-balancing loss"),
        Collective("tp", "all_reduce", (norms + other) * size, "tp-replicated gradients"),
    ]


def _ep(cm: CostModel, stage: Stage) -> list[Collective]:
    L, moe = cm.layout, cm.spec["moe"]
    if L.ep == 1 or not moe:
        return []
    rows = cm._activation_bytes() / L.tp * moe["top_k"]
    runs = 2 if stage.recompute == "full" else 1  # forwards of each MoE block per micro-batch
    per_block = (2 + 2 * runs) * rows + runs * moe["experts"] * COUNT_BYTES
    nbytes = cm.microbatches * stage.counts["moe"] * per_block
    return [Collective("ep", "all_to_all", nbytes, "expert counts, dispatch and combine")]


def _etp(cm: CostModel, stage: Stage) -> list[Collective]:
    L, moe = cm.layout, cm.spec["moe"]
    if L.etp == 1 or not moe:
        return []
    rows = cm._activation_bytes() / L.tp * moe["top_k"]  # what the ep dispatch brings
    runs = 2 if stage.recompute == "full" else 1
    per_block = L.etp * ((2 + 2 * runs) * rows + runs * moe["experts"] * COUNT_BYTES)
    nbytes = cm.microbatches * stage.counts["moe"] * per_block
    what = "expert counts, rows to every etp peer and partial outputs back"
    return [Collective("etp", "all_to_all", nbytes, what)]


def _cp(cm: CostModel, stage: Stage) -> list[Collective]:
    L, a = cm.layout, cm.spec["attention"]
    if L.cp == 1:
        return []
    kv_width = (
        (a["qk_nope_head_dim"] + a["qk_rope_head_dim"] + a["v_head_dim"]) * a["heads"]
        if a["kind"] == "mla"
        else 2 * a["kv_heads"] * a["head_dim"]
    )
    chunk = L.mbs * cm.seq_len / L.cp * kv_width * element_bytes(cm.precision) / L.tp
    blocks = sum(stage.counts[kind] for kind in BLOCK_KINDS)
    nbytes = cm.microbatches * blocks * 3 * (L.cp - 1) * chunk
    return [Collective("cp", "send", nbytes, "ring attention K/V (fwd) and K/V, dK/dV (bwd)")]


def _pp(cm: CostModel, stage: Stage) -> list[Collective]:
    L = cm.layout
    if L.pp == 1:
        return []
    last = L.pp * L.vpp - 1
    chunks = [stage.index + v * L.pp for v in range(L.vpp)]
    sends = sum(c < last for c in chunks) + sum(c > 0 for c in chunks)
    nbytes = cm.microbatches * sends * cm._activation_bytes() / L.tp
    return [Collective("pp", "send", nbytes, "chunk outputs (fwd) and input gradients (bwd)")]


# -- data parallelism ------------------------------------------------------------------------
def _held(cm: CostModel, kind: str, attr: str) -> float:
    """Dense or expert parameters one rank holds of a segment, before ZeRO."""
    L = cm.layout
    if attr == "expert":
        return cm.segs.totals[kind].expert_params / (L.ep * L.etp)
    parallel, whole = tp_held_params(cm, kind)
    return parallel / L.tp + whole


def _dp(cm: CostModel, stage: Stage) -> list[Collective]:
    L = cm.layout
    size = element_bytes(cm.precision)
    dense_group = L.dp * L.cp
    expert_group = L.dp * L.tp * L.cp // (L.ep * L.etp)
    found = []
    for kind, group, attr in (("dp", dense_group, "dense"), ("edp", expert_group, "expert")):
        total = sum(n * _held(cm, k, attr) for k, n in stage.counts.items())
        if group == 1 or total == 0:
            continue
        if L.zero == 0:
            found.append(Collective(kind, "all_reduce", total * size, "gradients"))
        elif L.zero in (1, 2):
            reductions = _fsdp_reductions(cm)
            found.append(Collective(kind, "all_gather", total * size, "parameters"))
            found.append(Collective(kind, "reduce_scatter", reductions * total * size, "grads"))
        else:
            found += _zero3(cm, stage, kind, attr, group, size)
    return found


def _zero3(cm: CostModel, stage: Stage, kind: str, attr: str, group: int, size: int):
    """FSDP2's gathers and reductions of one group's units on the stage (module docstring)."""
    L, m = cm.layout, cm.microbatches
    held = cm.segs.held(stage.index, L.pp)  # embedding with chunk 0, head with the last
    chunks = []  # parameters of each chunk of the stage, in chunk order
    for v, (first, last) in enumerate(stage.chunks):
        params = sum(_held(cm, cm.segs.block_kinds[x], attr) for x in range(first, last + 1))
        ends = ("embedding",) if v == 0 else ()
        ends += ("head", "tied_head") if v == L.vpp - 1 else ()
        chunks.append(params + sum(held[k] * _held(cm, k, attr) for k in ends))
    total = sum(chunks)
    if L.pp == 1:
        gathers, reductions = 2 * m * total, m
    else:
        orders = chunk_actions(L, m, stage.index)
        gathers = sum(p * unit_gathers(a) for p, a in zip(chunks, orders, strict=True))
        reductions = 1
    found = [
        Collective(kind, "all_gather", gathers * size, "parameters of FSDP2 units"),
        Collective(kind, "reduce_scatter", reductions * total * size, "gradients"),
    ]
    if L.dp_replicate > 1:  # HSDP: all-reduce each replica's reduced shard
        shard = group // L.dp_replicate
        what = "reduced shards over dp_replicate"
        found.append(Collective(kind, "all_reduce", reductions * total * size / shard, what))
    return found


def unit_gathers(actions: list[str]) -> int:
    """All-gathers of one FSDP2 unit over its chunk's forwards "F" and backwards "B" in
    order, under pipelining's settings (reshard after forward, not after backward): every
    action whose predecessor is not a backward, the first included."""
    return sum(prev != "B" for prev in [None, *actions[:-1]])


def chunk_actions(layout, microbatches: int, stage: int) -> list[list[str]]:
    """Per chunk of `stage` (in chunk order), its "F"/"B" actions in the order torch's
    Schedule1F1B (vpp = 1) or ScheduleInterleaved1F1B (vpp > 1) runs them."""
    pp, vpp, m = layout.pp, layout.vpp, microbatches
    if vpp == 1:
        warmup = min(m, pp - stage)
        order = ["F"] * warmup
        forwards = warmup
        for _ in range(m):
            order.append("B")
            if forwards < m:
                order.append("F")
                forwards += 1
        return [order]
    rounds = max(1, m // pp)
    per_round = m // rounds
    warmup = min((vpp - 1) * per_round + 2 * (pp - 1 - stage), m * vpp)
    steady = m * vpp - warmup
    actions: list[list[str]] = [[] for _ in range(vpp)]
    for op in range(warmup + steady + warmup):
        if op < warmup + steady:
            actions[(op // per_round) % vpp].append("F")
        if op >= warmup:
            actions[vpp - 1 - ((op - warmup) // per_round) % vpp].append("B")
    return actions
