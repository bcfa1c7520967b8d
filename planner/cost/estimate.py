"""Step time, throughput, MFU and memory of a layout: the first-version cost model.

Everything is costed per segment (an embedding, a dense block, an MoE block, a head:
stages.py) and summed over the segments of each stage, so a stage's time and memory are
linear in how many blocks of each kind it holds. Per segment and micro-batch the model
sums, forward and backward separately:
  compute  every operator kind of the segment at max(FLOPs / matmul or attention rate,
           bytes / HBM rate), scaled to this rank's share (with sequence parallelism all
           work divides by tp, context parallelism divides the sequence by cp; balanced
           routing gives every
           rank of the expert mesh the same share of expert rows, times the imbalance)
  tp       per block 1 all-gather + 1 reduce-scatter of the block input around attention
           and around the dense FFN (or shared experts); none around routed experts with
           etp=1, whose tokens stay sequence-sharded (Megatron's sequence parallelism);
           the calibrated fraction tp_exposed of it is on the critical path
  ep       per MoE block a dispatch and a combine all-to-all of the routed rows, of which
           the fraction ep_exposed is on the critical path
  cp       per block cp-1 ring steps exchanging K and V, hidden under attention compute
           when shorter (ring attention)
  pp       one send/recv of the stage's output activations per micro-batch and direction
Communication splits between the directions as it runs: tp, ep and pp half forward, half
backward; the cp ring one third forward (K, V) and two thirds backward (K, V, dK, dV).
Recompute (per stage) adds to the backward: full re-runs each block's forward compute,
selective its attention cores.
The pipeline runs m micro-batches: step = m * T_max + (sum_s T_s - T_max) / vpp, with T_s
a stage's forward+backward time per micro-batch (1F1B for vpp=1, Megatron's interleaved
schedule otherwise; uniform stages give the textbook bubble (pp-1)/vpp * T).
Data parallelism reduces gradients once per step in one bucket per segment (all-reduce
for zero=0, reduce-scatter then a parameter all-gather for zero>=1, per micro-batch
gathers for zero=3), overlapped with the last micro-batch's backward (and the next
step's first forward for the gather); what does not fit under it is exposed, and at
least the calibrated fraction dp_exposed of it always is. The optimizer step streams the
local shard.

Rates and overlap fractions come from a Calibration (calibration.py); collective times do
not depend on it and are computed once per CostModel, so `recalibrated` is cheap.

Collectives are costed on the first group of each axis (groups of one axis have the same
shape under contiguous placement) over the cluster's topology.
"""

from __future__ import annotations

import copy
import functools
import weakref
from dataclasses import dataclass, field

from tera.planner.cost.calibration import ADAM_BYTES_PER_PARAM, CAUSAL_FRACTION, Calibration
from tera.planner.cost.memory import MemoryModel, StageMemory, sharded_params, zero_shards
from tera.planner.cost.stages import (
    BLOCK_KINDS,
    Segments,
    Stage,
    segments,
    split_chunks,
    split_stages,
)
from tera.planner.layout import Layout

GiB = 2**30
MATMUL_KINDS = ("matmul", "expert")
PRECISIONS = ("bf16", "fp8", "fp32")


@dataclass(frozen=True)
class SegmentTime:
    """One segment's seconds per micro-batch on one rank."""

    forward: float  # compute and the forward share of its communication
    backward: float  # compute and the backward share, without recompute
    recompute: dict[str, float]  # recompute mode -> seconds added to the backward
    parts: dict[str, float]  # compute, tp_comm, ep_comm, cp_comm (forward + backward)


@dataclass(frozen=True)
class SegmentDP:
    """One segment's data-parallel seconds per step and optimizer-state parameters."""

    reduce: float  # gradient reduction (all micro-batches for zero=3)
    gather: float  # parameter gathering
    local_params: float  # parameters whose Adam state this rank updates


@dataclass
class StageTime:
    forward: float  # seconds per micro-batch, compute and critical-path communication
    backward: float
    breakdown: dict[str, float] = field(default_factory=dict)  # per micro-batch, fwd+bwd

    @property
    def total(self) -> float:
        return self.forward + self.backward


@dataclass
class Estimate:
    """What `tera-plan evaluate` reports; `to_dict` is the --json object of DESIGN.md."""

    model: str
    cluster: str
    gpus: int
    layout: Layout
    global_batch: int
    seq_len: int
    precision: str
    fits: bool
    step_time_s: float
    tokens_per_s_per_gpu: float
    model_tflops_per_gpu: float
    mfu: float
    peak_memory_gib: float
    hbm_gib: float
    breakdown_s: dict[str, float]
    memory_gib: dict[str, float]
    stage_memory_gib: list[float]
    microbatches: int
    model_flops_per_step: float

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "cluster": self.cluster,
            "gpus": self.gpus,
            "layout": self.layout.to_dict(),
            "global_batch": self.global_batch,
            "seq_len": self.seq_len,
            "precision": self.precision,
            "fits": self.fits,
            "step_time_s": self.step_time_s,
            "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
            "model_tflops_per_gpu": self.model_tflops_per_gpu,
            "mfu": self.mfu,
            "peak_memory_gib": self.peak_memory_gib,
            "hbm_gib": self.hbm_gib,
            "breakdown_s": self.breakdown_s,
            "memory_gib": self.memory_gib,
            "stage_memory_gib": self.stage_memory_gib,
            "microbatches": self.microbatches,
            "model_flops_per_step": self.model_flops_per_step,
        }


class CostModel:
    """Costs one (graph, cluster, layout, batch) problem. Build once, call `estimate`."""

    def __init__(
        self,
        graph,
        cluster,
        layout: Layout,
        global_batch: int,
        precision: str,
        imbalance: float = 1.0,
        calibration: Calibration | None = None,
    ):
        self.collectives = _CachedCollectives(cluster)
        self.graph = graph
        self.spec = graph.graph["spec"]
        self.seq_len = graph.graph["seq_len"]
        self.cluster = cluster
        self.gpu = cluster.gpu
        self.layout = layout
        self.global_batch = global_batch
        self.precision = precision
        self.imbalance = imbalance
        self.microbatches = global_batch // (layout.dp * layout.mbs)
        mesh = layout.mesh
        self.groups = {
            axis: mesh.first_group(axis)
            for axis in ("tp", "cp", "pp", "ep", "dp_cp", "edp_full", "dp_shard")
        }
        # the trace is bf16; fp32 training moves twice the bytes
        self.act_scale = self.weight_scale = 2.0 if precision == "fp32" else 1.0
        self.segs: Segments = graph_segments(graph)
        self.cal = calibration if calibration is not None else Calibration.load()
        self._comm: dict[str, object] = {}  # calibration-free collective seconds

    @functools.cached_property
    def stages(self) -> list[Stage]:
        return split_stages(self.segs, self.layout)

    def recalibrated(self, calibration: Calibration) -> CostModel:
        """The same problem under other constants; shares the collective-time cache."""
        other = copy.copy(self)
        other.cal = calibration
        other.__dict__.pop("_rates", None)
        other.__dict__.pop("segment_times", None)
        other.__dict__.pop("segment_dp", None)
        return other

    def _cached(self, key: str, compute):
        if key not in self._comm:
            self._comm[key] = compute()
        return self._comm[key]

    # -- compute -----------------------------------------------------------------------
    @functools.cached_property
    def _rates(self) -> tuple[float, float, float]:
        """FLOP/s of GEMMs and of attention, and HBM bytes/s, under the calibration."""
        gpu = self.gpu
        fp8 = self.precision == "fp8" and gpu.fp8_flops
        peak = gpu.fp8_flops if fp8 else gpu.bf16_flops
        matmul = peak * self.cal.matmul_efficiency(gpu.arch, bool(fp8))
        attention = gpu.bf16_flops * self.cal.attention_efficiency(self.seq_len)
        return matmul, attention, gpu.hbm_bw * self.cal.hbm_efficiency

    def rows_per_expert(self) -> float:
        """Routed rows one local expert receives per micro-batch under balanced routing:
        the ep ranks of a group each send their sequence-parallel share of tokens."""
        moe = self.spec["moe"]
        if not moe:
            return 0.0
        L = self.layout
        tokens = L.mbs * self.seq_len / (L.cp * L.tp)
        return L.ep * tokens * moe["top_k"] / moe["experts"]

    def _compute(self, kind_sums: dict[str, dict[str, int]], direction: str) -> float:
        """Roofline time of a segment's operators for one micro-batch on this rank.
        Token work divides by tp*cp; weight traffic by tp, or by ep*etp for experts."""
        matmul_rate, attention_rate, hbm = self._rates
        L = self.layout
        share = L.mbs / (L.tp * L.cp)
        seconds = 0.0
        expert_factor = self.cal.expert_gemm_factor(self.rows_per_expert())
        for kind, sums in kind_sums.items():
            flops = sums[f"{direction}_flops"] * share
            weights = sums[f"{direction}_weight_bytes"]
            tokens = (sums[f"{direction}_bytes"] - weights) * share * self.act_scale
            weight_shard = L.ep * L.etp if kind == "expert" else L.tp
            moved = tokens + weights * self.weight_scale / weight_shard
            if kind == "attention":
                flop_time = flops * CAUSAL_FRACTION / attention_rate
            elif kind == "expert":
                flop_time = flops / (matmul_rate * expert_factor)
            else:
                flop_time = flops / matmul_rate
            t = max(flop_time, moved / hbm)
            if kind in ("expert", "permute", "unpermute"):
                t *= self.imbalance
            seconds += t
        return seconds

    def _attention_forward(self, kind_sums: dict[str, dict[str, int]]) -> float:
        attention = kind_sums.get("attention")
        if not attention:
            return 0.0
        _, attention_rate, _ = self._rates
        share = self.layout.mbs / (self.layout.tp * self.layout.cp)
        return attention["fwd_flops"] * share * CAUSAL_FRACTION / attention_rate

    # -- communication on the critical path ----------------------------------------------
    def _activation_bytes(self) -> float:
        """One block input on this rank before sequence-parallel gathering."""
        L = self.layout
        return L.mbs * self.seq_len * self.spec["hidden"] * 2 * self.act_scale / (L.cp)

    def _tp_pair(self) -> float:
        """Seconds of one all-gather plus one reduce-scatter of a block input over tp."""
        if self.layout.tp == 1:
            return 0.0
        c, group, size = self.collectives, self.groups["tp"], self._activation_bytes()
        return c("all_gather", group, size) + c("reduce_scatter", group, size)

    def _a2a(self) -> float:
        """Seconds of one dispatch (or combine) all-to-all of a micro-batch's routed rows."""
        if self.layout.ep == 1:
            return 0.0
        rows = self._activation_bytes() / self.layout.tp * self.spec["moe"]["top_k"]
        return self.collectives("all_to_all", self.groups["ep"], rows)

    def _cp_ring(self) -> float:
        """Seconds per micro-batch and block of ring-attention K/V exchange, fwd+bwd."""
        if self.layout.cp == 1:
            return 0.0
        a = self.spec["attention"]
        kv_width = (
            (a["qk_nope_head_dim"] + a["qk_rope_head_dim"] + a["v_head_dim"]) * a["heads"]
            if a["kind"] == "mla"
            else 2 * a["kv_heads"] * a["head_dim"]
        )
        chunk = self.layout.mbs * self.seq_len / self.layout.cp * kv_width * 2 * self.act_scale
        chunk /= self.layout.tp
        group = self.groups["cp"]
        step = self.collectives("send_recv", group[:2], chunk)
        return (self.layout.cp - 1) * step * 3  # fwd K,V; bwd K,V,dK,dV

    def pp_time(self) -> float:
        """Seconds per micro-batch of a stage's pipeline send/recv, fwd+bwd."""
        if self.layout.pp == 1:
            return 0.0

        def send() -> float:
            group = self.groups["pp"]
            size = self._activation_bytes() / self.layout.tp
            return 2 * self.collectives("send_recv", group[:2], size)

        return self._cached("pp", send)

    @functools.cached_property
    def segment_times(self) -> dict[str, SegmentTime]:
        """Seconds per micro-batch of every segment kind on one rank."""
        return {kind: self._segment_time(kind) for kind in self.segs.totals}

    def _segment_time(self, kind: str) -> SegmentTime:
        sums = self.segs.totals[kind].by_kind
        fwd, bwd = self._compute(sums, "fwd"), self._compute(sums, "bwd")
        zero = dict.fromkeys(("none", "selective", "full"), 0.0)
        if kind not in BLOCK_KINDS:
            parts = {"compute": fwd + bwd, "tp_comm": 0.0, "ep_comm": 0.0, "cp_comm": 0.0}
            return SegmentTime(fwd, bwd, zero, parts)
        moe = self.spec["moe"]
        ffn_comm = kind == "dense" or bool(moe and (moe["shared_experts"] or self.layout.etp > 1))
        tp = 2 * (1 + ffn_comm) * self._cached("tp_pair", self._tp_pair) * self.cal.tp_exposed
        ep = 0.0
        if kind == "moe":
            ep = 4 * self._cached("a2a", self._a2a) * self.cal.ep_exposed * self.imbalance
        attention_forward = self._attention_forward(sums)
        ring = self._cached("cp_ring", self._cp_ring)
        cp = max(0.0, ring - 3 * attention_forward)  # hidden under attention when shorter
        parts = {"compute": fwd + bwd, "tp_comm": tp, "ep_comm": ep, "cp_comm": cp}
        recompute = {"none": 0.0, "selective": attention_forward, "full": fwd}
        forward = fwd + (tp + ep) / 2 + cp / 3
        backward = bwd + (tp + ep) / 2 + cp * 2 / 3
        return SegmentTime(forward, backward, recompute, parts)

    def stage_time(self, stage: Stage) -> StageTime:
        pp = self.pp_time()
        forward, backward = pp / 2, pp / 2
        parts = dict.fromkeys(("compute", "recompute", "tp_comm", "ep_comm", "cp_comm"), 0.0)
        parts["pp_comm"] = pp
        for kind, n in stage.counts.items():
            seg = self.segment_times[kind]
            forward += n * seg.forward
            backward += n * (seg.backward + seg.recompute[stage.recompute])
            parts["recompute"] += n * seg.recompute[stage.recompute]
            for name, value in seg.parts.items():
                parts[name] += n * value
        return StageTime(forward, backward, parts)

    def chunk_times(self) -> list[list[StageTime]]:
        """Seconds per micro-batch of every virtual chunk, per stage in chunk order: entry
        [s][k] is global chunk k*pp + s (split_chunks). A chunk is costed as stage_time
        costs a stage, with the stage's pipeline send/recv split evenly over its vpp
        chunks, so the forward and backward of a stage's chunks add up to its stage_time.
        For drawing the pipeline schedule; the step time does not use it."""
        vpp = self.layout.vpp
        surplus = self.pp_time() / 2 * (1 - 1 / vpp)  # stage_time charges each chunk pp/2
        times = []
        for chunks in split_chunks(self.segs, self.layout):
            row = []
            for chunk in chunks:
                t = self.stage_time(chunk)
                parts = dict(t.breakdown, pp_comm=t.breakdown["pp_comm"] / vpp)
                row.append(StageTime(t.forward - surplus, t.backward - surplus, parts))
            times.append(row)
        return times

    # -- data parallelism and optimizer -------------------------------------------------
    @functools.cached_property
    def segment_dp(self) -> dict[str, SegmentDP]:
        return {kind: self._segment_dp(kind) for kind in self.segs.totals}

    def _segment_dp(self, kind: str) -> SegmentDP:
        L, seg = self.layout, self.memory_model.segment[kind]
        reduce, gather = self._cached(f"dp/{kind}", lambda: self._dp_collectives(kind))
        local = sharded_params(seg.dense, seg.expert, L.zero, zero_shards(L), 1)
        return SegmentDP(reduce, gather, local)

    def _dp_collectives(self, kind: str) -> tuple[float, float]:
        """Seconds per step of one segment's gradient reduction and parameter gathering."""
        L, c = self.layout, self.collectives
        seg = self.memory_model.segment[kind]  # parameters per rank before ZeRO
        dense, expert = seg.dense, seg.expert
        grad_bytes = 2 if self.precision != "fp32" else 4  # grads reduce in bf16 (Megatron's
        weight_bytes = 2 if self.precision != "fp32" else 4  # --grad-reduce-in-bf16 default)
        reduce = gather = 0.0
        for params, group in ((dense, self.groups["dp_cp"]), (expert, self.groups["edp_full"])):
            if len(group) == 1 or params == 0:
                continue
            if L.zero == 0:
                reduce += c("all_reduce", group, params * grad_bytes)
            else:
                reduce += c("reduce_scatter", group, params * grad_bytes)
                gathers = 2 * self.microbatches if L.zero == 3 else 1
                gather += gathers * c("all_gather", group, params * weight_bytes)
        if L.zero == 3:
            reduce *= self.microbatches  # FSDP reduce-scatters every micro-batch
        return reduce, gather

    def dp_exposed(self, reduce: float, gather: float, forward: float, backward: float) -> float:
        """Exposed seconds of a stage's data-parallel collectives, given the stage's
        forward and backward seconds per micro-batch that can hide them."""
        if self.layout.zero == 3:
            window = self.microbatches * (backward + forward)
            exposed = max(reduce + gather - window, 0.0)
        else:
            exposed = max(reduce - backward, 0.0) + max(gather - forward, 0.0)
        return max(exposed, self.cal.dp_exposed * (reduce + gather))

    def optimizer_seconds(self, local_params: float) -> float:
        return local_params * ADAM_BYTES_PER_PARAM / (self.gpu.hbm_bw * self.cal.hbm_efficiency)

    def _dp(self, stage: Stage, time: StageTime) -> tuple[float, float]:
        """(exposed seconds of gradient and parameter collectives, optimizer seconds)."""
        reduce = gather = local = 0.0
        for kind, n in stage.counts.items():
            seg = self.segment_dp[kind]
            reduce += n * seg.reduce
            gather += n * seg.gather
            local += n * seg.local_params
        exposed = self.dp_exposed(reduce, gather, time.forward, time.backward)
        return exposed, self.optimizer_seconds(local)

    @functools.cached_property
    def memory_model(self) -> MemoryModel:
        top_k = (self.spec["moe"] or {}).get("top_k", 1)
        return MemoryModel(
            self.segs,
            self.layout,
            self.precision,
            self.seq_len,
            self.spec["hidden"],
            self.microbatches,
            self.act_scale,
            top_k,
        )

    @functools.cached_property
    def stage_memories(self) -> list[StageMemory]:
        """Memory of one rank of every stage (calibration-free, computed once)."""
        return [self.stage_memory(s) for s in self.stages]

    def stage_memory(self, stage: Stage) -> StageMemory:
        return self.memory_model.stage(stage)

    # -- everything ------------------------------------------------------------------------
    def estimate(self, model_name: str, reserve_bytes: float = 0.0) -> Estimate:
        L = self.layout
        times = [self.stage_time(s) for s in self.stages]
        t_max = max(t.total for t in times)
        m = self.microbatches
        pipeline = m * t_max + (sum(t.total for t in times) - t_max) / L.vpp
        dp_opt = [self._dp(s, t) for s, t in zip(self.stages, times, strict=True)]
        dp_exposed = max(d for d, _ in dp_opt)
        optimizer = max(o for _, o in dp_opt)
        step = pipeline + dp_exposed + optimizer

        slowest = max(range(len(times)), key=lambda i: times[i].total)
        breakdown = {k: v * m for k, v in times[slowest].breakdown.items()}
        breakdown["bubble"] = pipeline - m * t_max
        breakdown["dp_comm"] = dp_exposed
        breakdown["optimizer"] = optimizer

        memories = self.stage_memories
        peak = max(memories, key=lambda mem: mem.total)
        hbm = self.gpu.hbm_bytes
        flops_per_seq = sum(
            s.totals.total("fwd_flops") + s.totals.total("bwd_flops") for s in self.stages
        )
        model_flops = flops_per_seq * self.global_batch
        gpus = L.dp * L.tp * L.cp * L.pp
        tflops = model_flops / step / gpus / 1e12
        return Estimate(
            model=model_name,
            cluster=self.cluster.name,
            gpus=gpus,
            layout=L,
            global_batch=self.global_batch,
            seq_len=self.seq_len,
            precision=self.precision,
            fits=peak.total + reserve_bytes <= hbm,
            step_time_s=step,
            tokens_per_s_per_gpu=self.global_batch * self.seq_len / step / gpus,
            model_tflops_per_gpu=tflops,
            mfu=tflops * 1e12 / self.gpu.bf16_flops,
            peak_memory_gib=peak.total / GiB,
            hbm_gib=hbm / GiB,
            breakdown_s=breakdown,
            memory_gib={k: v / GiB for k, v in peak.as_dict().items()},
            stage_memory_gib=[mem.total / GiB for mem in memories],
            microbatches=m,
            model_flops_per_step=model_flops,
        )


_SEGMENTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_COLLECTIVE_TIMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _CachedCollectives:
    """Collective seconds on one cluster, memoised across cost models: the solver builds
    thousands of models whose groups and message sizes repeat."""

    def __init__(self, cluster):
        from tera.topologies import collectives

        self.cluster = cluster
        self.module = collectives
        self.times = _COLLECTIVE_TIMES.setdefault(cluster, {})

    def __call__(self, name: str, group: range, nbytes: float) -> float:
        key = (name, group, nbytes)
        if key not in self.times:
            if name == "send_recv":
                seconds = self.module.send_recv(self.cluster, group[0], group[1], nbytes)
            else:
                seconds = getattr(self.module, name)(self.cluster, group, nbytes)
            self.times[key] = seconds
        return self.times[key]


def graph_segments(graph) -> Segments:
    """The graph's segments, computed once per graph (graphs are cached per trace)."""
    if graph not in _SEGMENTS:
        _SEGMENTS[graph] = segments(graph)
    return _SEGMENTS[graph]
