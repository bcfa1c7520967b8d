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
Recompute modes: none keeps everything; selective recomputes attention cores (their
saved q, k, v, output and log-sum-exp are dropped); full keeps only each block's input and
re-runs one block at a time, whose activations are held once.

Invariant: every figure is >= 0 and grows with the micro-batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

from tera.planner.cost.stages import Stage

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


def in_flight_chunks(stage: int, pp: int, vpp: int, microbatches: int) -> int:
    """Virtual-chunk activations stage `stage` holds at its peak (Megatron's warm-up
    count plus the one in steady state): 1F1B holds pp - stage micro-batches; the
    interleaved schedule 2*(pp - stage - 1) + (vpp - 1)*pp + 1 chunks."""
    if vpp == 1:
        return min(microbatches, pp - stage)
    return min(microbatches * vpp, 2 * (pp - stage - 1) + (vpp - 1) * pp + 1)


def stage_memory(
    stage: Stage,
    layout,
    precision: str,
    seq_len: int,
    hidden: int,
    microbatches: int,
    act_scale: float,
    top_k: int,
) -> StageMemory:
    """Memory of one rank of `stage` (a resolved layout). The trace is one sequence of
    `seq_len`; `act_scale` converts its bf16 activation bytes to the run's precision."""
    w_bytes, g_bytes, o_bytes = BYTES_PER_PARAM[precision]
    tp, cp = layout.tp, layout.cp
    dense = stage.totals.dense_per_rank(tp)
    expert = stage.totals.expert_params / (layout.ep * layout.etp)
    dense_shards, expert_shards = zero_shards(layout)

    def sharded(count_dense: float, count_expert: float, stage_zero: int) -> float:
        if layout.zero >= stage_zero:
            return count_dense / dense_shards + count_expert / expert_shards
        return count_dense + count_expert

    params = w_bytes * sharded(dense, expert, 3)
    grads = g_bytes * sharded(dense, expert, 2)
    optimizer = o_bytes * sharded(dense, expert, 1)

    shard = layout.mbs / (tp * cp)  # trace bytes -> this rank's share of a micro-batch

    def scaled(saved: float, lowp: float) -> float:
        """Trace bytes at the run's precision: only bf16 activations change size."""
        return (saved + (act_scale - 1) * lowp) * shard

    layer_input = layout.mbs * seq_len * hidden * 2 * act_scale / (tp * cp)
    per_layer = [
        scaled(s, lp)
        for s, lp in zip(stage.per_layer_saved, stage.per_layer_saved_lowp, strict=True)
    ]
    saved = sum(per_layer)
    if layout.recompute == "full":
        kept = len(stage.layers) * layer_input + max(per_layer, default=0)
    elif layout.recompute == "selective":
        attention = stage.totals.by_kind.get("attention", {})
        kept = saved - scaled(attention.get("saved_bytes", 0), attention.get("saved_lowp_bytes", 0))
    else:
        kept = saved
    # embedding and head activations live outside the blocks
    outside = scaled(
        stage.totals.total("saved_bytes") - sum(stage.per_layer_saved),
        stage.totals.total("saved_lowp_bytes") - sum(stage.per_layer_saved_lowp),
    )
    chunks = in_flight_chunks(stage.index, layout.pp, layout.vpp, microbatches)
    per_chunk = (kept + outside) / max(1, len(stage.chunks))
    activations = chunks * per_chunk

    buffers = 0.0
    if tp > 1:  # sequence-parallel all-gather output of one block input
        buffers += layer_input * tp
    if layout.ep > 1 and stage.moe_layers:  # dispatch send and receive buffers
        buffers += 2 * layer_input * top_k
    if layout.zero == 3:  # one block's gathered weights
        per_layer = (dense * tp + expert * layout.ep * layout.etp) / max(1, len(stage.layers))
        buffers += w_bytes * per_layer / tp
    return StageMemory(params, grads, optimizer, activations, buffers)
