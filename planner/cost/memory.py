"""Memory per rank: parameters, gradients, optimizer state, activations and buffers.

Bytes per parameter follow Megatron-LM's mixed-precision training: low-precision
weights (2 bytes in bf16 and fp8 runs: fp8 copies are made per GEMM, not kept), fp32 main
gradients (4), and Adam's fp32 master weights plus two moments (12). In fp32 training (the
CPU runtime) weights are the masters: 4 + 4 + 8.

ZeRO shards over the data-parallel group of the parameter: stage 1 the optimizer state,
stage 2 also the gradients, stage 3 also the weights. Dense parameters shard over dp*cp
(Megatron's distributed optimizer group), expert parameters over edp*dp_replicate.

Activations: the bytes the traced forward saves for backward (its bf16 part doubled in
fp32 training; fp32 statistics and indices keep their size), scaled to the micro-batch
and divided by tp*cp (with sequence parallelism every saved tensor is split over tp, and
context parallelism splits the sequence), times the micro-batches a stage holds at once.
Recompute modes (per stage): none keeps everything; selective recomputes attention cores
(their saved q, k, v, output and log-sum-exp are dropped); full keeps only each block's
input and re-runs one block at a time, whose activations are held once on top.

Every figure is a sum over the stage's segments (stages.py) of a per-segment figure, plus
terms that depend only on which segment kinds are present, so the solver can cost any
partition with the same numbers.

Invariant: every figure is >= 0 and grows with the micro-batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

from tera.planner.cost.stages import BLOCK_KINDS, Segments, Stage

BYTES_PER_PARAM = {
    # precision: (weights, grads, optimizer)
    "bf16": (2, 4, 12),
    "fp8": (2, 4, 12),
    "fp32": (4, 4, 8),
}


@dataclass
class StageMemory:
    params: float
    grads: float
    optimizer: float
    activations: float
    buffers: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.buffers

    def as_dict(self) -> dict[str, float]:
        return {
            "params": self.params,
            "grads": self.grads,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "buffers": self.buffers,
        }


def zero_shards(layout) -> tuple[int, int]:
    """Ranks over which ZeRO shards a dense and an expert parameter's state: dp*cp
    (Megatron's distributed-optimizer group) and edp*dp_replicate; HSDP (zero=3 with
    dp_replicate > 1) shards inside one replica only."""
    dense = layout.dp * layout.cp  # dp includes dp_replicate
    expert = layout.dp * layout.tp * layout.cp // (layout.ep * layout.etp)
    if layout.zero == 3 and layout.dp_replicate > 1:
        dense //= layout.dp_replicate
        expert //= layout.dp_replicate
    return dense, expert


def sharded_params(
    dense: float, expert: float, zero: int, shards: tuple[int, int], from_stage: int
) -> float:
    """Parameters' worth of a state one rank holds: divided over the ZeRO `shards`
    (zero_shards) when the run's stage `zero` shards that state (from `from_stage` on:
    1 optimizer, 2 gradients, 3 weights), whole otherwise."""
    if zero >= from_stage:
        return dense / shards[0] + expert / shards[1]
    return dense + expert


def static_bytes(
    dense: float, expert: float, zero: int, shards: tuple[int, int], precision: str
) -> tuple[float, float, float]:
    """(weights, gradients, optimizer state) bytes of `dense` and `expert` parameters
    per rank (before ZeRO) under ZeRO stage `zero` over `shards` (zero_shards)."""
    w_bytes, g_bytes, o_bytes = BYTES_PER_PARAM[precision]

    def sharded(from_stage: int) -> float:
        return sharded_params(dense, expert, zero, shards, from_stage)

    return w_bytes * sharded(3), g_bytes * sharded(2), o_bytes * sharded(1)


def in_flight_chunks(stage: int, pp: int, vpp: int, microbatches: int) -> int:
    """Virtual-chunk activations stage `stage` holds at its peak (Megatron's warm-up
    count plus the one in steady state): 1F1B holds pp - stage micro-batches; the
    interleaved schedule 2*(pp - stage - 1) + (vpp - 1)*pp + 1 chunks."""
    if vpp == 1:
        return min(microbatches, pp - stage)
    return min(microbatches * vpp, 2 * (pp - stage - 1) + (vpp - 1) * pp + 1)


@dataclass(frozen=True)
class SegmentMemory:
    """Per-segment memory figures of one rank (bytes; activations per micro-batch)."""

    dense: float  # dense parameters held before ZeRO sharding
    expert: float  # expert parameters held before ZeRO sharding
    saved: dict[str, float]  # recompute mode -> activation bytes kept per micro-batch
    working: float  # bytes a block re-materialises under full recompute (0: not a block)


class MemoryModel:
    """Memory of one rank, per segment and per stage, for a resolved layout."""

    def __init__(
        self,
        segs: Segments,
        layout,
        precision: str,
        seq_len: int,
        hidden: int,
        microbatches: int,
        act_scale: float,
        top_k: int,
    ):
        self.segs, self.layout, self.microbatches = segs, layout, microbatches
        self.precision = precision
        self.w_bytes, self.g_bytes, self.o_bytes = BYTES_PER_PARAM[precision]
        tp, cp = layout.tp, layout.cp
        self.shards = zero_shards(layout)
        self.layer_input = layout.mbs * seq_len * hidden * 2 * act_scale / (tp * cp)
        self.top_k = top_k
        self.act_scale = act_scale
        self.segment = {kind: self._segment(kind) for kind in segs.totals}

    def _segment(self, kind: str) -> SegmentMemory:
        L, totals = self.layout, self.segs.totals[kind]
        share = L.mbs / (L.tp * L.cp)  # trace bytes -> this rank's share of a micro-batch

        def scaled(saved: float, lowp: float) -> float:
            """Trace bytes at the run's precision: only bf16 activations change size."""
            return (saved + (self.act_scale - 1) * lowp) * share

        saved = scaled(totals.total("saved_bytes"), totals.total("saved_lowp_bytes"))
        modes = dict.fromkeys(("none", "selective", "full"), saved)
        working = 0.0
        if kind in BLOCK_KINDS:
            attention = totals.by_kind.get("attention", {})
            attention_saved = scaled(
                attention.get("saved_bytes", 0), attention.get("saved_lowp_bytes", 0)
            )
            modes["selective"] = saved - attention_saved
            modes["full"] = self.layer_input
            working = saved
        dense = totals.dense_per_rank(L.tp)
        expert = totals.expert_params / (L.ep * L.etp)
        return SegmentMemory(dense, expert, modes, working)

    def static_bytes(self, dense: float, expert: float) -> tuple[float, float, float]:
        """(weights, gradients, optimizer state) bytes of this many parameters per rank."""
        return static_bytes(dense, expert, self.layout.zero, self.shards, self.precision)

    def stage(self, stage: Stage) -> StageMemory:
        L, counts, seg = self.layout, stage.counts, self.segment
        present = [kind for kind, n in counts.items() if n]
        dense = sum(n * seg[kind].dense for kind, n in counts.items())
        expert = sum(n * seg[kind].expert for kind, n in counts.items())
        params, grads, optimizer = self.static_bytes(dense, expert)
        chunks = in_flight_chunks(stage.index, L.pp, L.vpp, self.microbatches)
        kept = sum(n * seg[kind].saved[stage.recompute] for kind, n in counts.items())
        activations = chunks / L.vpp * kept
        if stage.recompute == "full":
            activations += max((seg[kind].working for kind in present), default=0.0)
        return StageMemory(params, grads, optimizer, activations, self.buffers(present))

    def buffers(self, present: list[str]) -> float:
        """Communication and gather buffers of a stage holding these segment kinds."""
        L, buffers = self.layout, 0.0
        if L.tp > 1:  # sequence-parallel all-gather output of one block input
            buffers += self.layer_input * L.tp
        if L.ep > 1 and "moe" in present:  # dispatch send and receive buffers
            buffers += 2 * self.layer_input * self.top_k
        if L.zero == 3:  # the largest segment's gathered weights
            buffers += self.w_bytes * max(
                (self.segment[k].dense + self.segment[k].expert for k in present), default=0.0
            )
        return buffers
