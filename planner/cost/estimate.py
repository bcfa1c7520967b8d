"""Step time, throughput, MFU and memory of a layout: the first-version cost model.

Per pipeline stage and micro-batch the model sums, forward and backward separately:
  compute  every operator node at max(FLOPs / matmul or attention rate, bytes / HBM rate),
           scaled to this rank's share (with sequence parallelism all work divides by tp,
           context parallelism divides the sequence by cp; balanced routing gives every
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
The pipeline runs m micro-batches: step = m * T_max + (sum_s T_s - T_max) / vpp, with T_s
a stage's forward+backward time per micro-batch (1F1B for vpp=1, Megatron's interleaved
schedule otherwise; uniform stages give the textbook bubble (pp-1)/vpp * T).
Data parallelism reduces gradients once per step (all-reduce for zero=0, reduce-scatter
then a parameter all-gather for zero>=1, per micro-batch gathers for zero=3), overlapped
with the last micro-batch's backward (and the next step's first forward for the gather);
what does not fit under it is exposed, and at least the calibrated fraction dp_exposed of
it always is. The optimizer step streams the local shard.

Rates and overlap fractions come from a Calibration (calibration.py); collective times do
not depend on it and are computed once per CostModel, so `recalibrated` is cheap.

Collectives are costed on the first group of each axis (groups of one axis have the same
shape under contiguous placement) over the cluster's topology.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field

from tera.planner.cost.calibration import ADAM_BYTES_PER_PARAM, CAUSAL_FRACTION, Calibration
from tera.planner.cost.memory import StageMemory, stage_memory, zero_shards
from tera.planner.cost.stages import Stage, split_stages
from tera.planner.layout import Layout

GiB = 2**30
MATMUL_KINDS = ("matmul", "expert")
PRECISIONS = ("bf16", "fp8", "fp32")


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
        from tera.topologies import collectives

        self.collectives = collectives
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
        self.groups = {
            axis: layout.mesh.groups(axis)[0]
            for axis in ("tp", "cp", "pp", "ep", "dp_cp", "edp_full", "dp_shard")
        }
        # the trace is bf16; fp32 training moves twice the bytes
        self.act_scale = self.weight_scale = 2.0 if precision == "fp32" else 1.0
        self.stages = split_stages(graph, layout.pp, layout.vpp)
        self.cal = calibration if calibration is not None else Calibration.load()
        self._comm: dict[tuple[str, int], float] = {}  # calibration-free collective seconds

    def recalibrated(self, calibration: Calibration) -> CostModel:
        """The same problem under other constants; shares the collective-time cache."""
        other = copy.copy(self)
        other.cal = calibration
        return other

    def _cached(self, key: str, stage: Stage, compute) -> float:
        if (key, stage.index) not in self._comm:
            self._comm[key, stage.index] = compute(stage)
        return self._comm[key, stage.index]

    # -- compute -----------------------------------------------------------------------
    def _rates(self) -> tuple[float, float, float]:
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

    def _compute(self, stage: Stage, direction: str) -> float:
        """Roofline time of the stage's operators for one micro-batch on this rank.
        Token work divides by tp*cp; weight traffic by tp, or by ep*etp for experts."""
        matmul_rate, attention_rate, hbm = self._rates()
        L = self.layout
        share = L.mbs / (L.tp * L.cp)
        seconds = 0.0
        expert_factor = self.cal.expert_gemm_factor(self.rows_per_expert())
        for kind, sums in stage.totals.by_kind.items():
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

    # -- communication on the critical path ----------------------------------------------
    def _activation_bytes(self) -> float:
        """One block input on this rank before sequence-parallel gathering."""
        L = self.layout
        return L.mbs * self.seq_len * self.spec["hidden"] * 2 * self.act_scale / (L.cp)

    def _tp(self, stage: Stage) -> float:
        """Seconds per micro-batch of tensor-parallel collectives, fwd+bwd, unhidden."""
        if self.layout.tp == 1:
            return 0.0
        c, group, size = self.collectives, self.groups["tp"], self._activation_bytes()
        pair = c.all_gather(self.cluster, group, size) + c.reduce_scatter(self.cluster, group, size)
        moe = self.spec["moe"]
        ffn_comm_moe = bool(moe and (moe["shared_experts"] or self.layout.etp > 1))
        per_direction = pair * (
            len(stage.layers) + stage.dense_layers + (stage.moe_layers if ffn_comm_moe else 0)
        )
        return 2 * per_direction  # forward and backward

    def _ep(self, stage: Stage) -> float:
        """Seconds per micro-batch of dispatch and combine all-to-alls, fwd+bwd, unhidden."""
        if self.layout.ep == 1 or not stage.moe_layers:
            return 0.0
        rows = self._activation_bytes() / self.layout.tp * self.spec["moe"]["top_k"]
        a2a = self.collectives.all_to_all(self.cluster, self.groups["ep"], rows)
        return 4 * a2a * stage.moe_layers  # dispatch+combine, fwd+bwd

    def _cp_ring(self, stage: Stage) -> float:
        """Seconds per micro-batch of ring-attention K/V exchange (before hiding)."""
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
        step = self.collectives.send_recv(self.cluster, group[0], group[1], chunk)
        return (self.layout.cp - 1) * step * len(stage.layers) * 3  # fwd K,V; bwd K,V,dK,dV

    def _pp(self, stage: Stage) -> float:
        if self.layout.pp == 1:
            return 0.0
        group = self.groups["pp"]
        size = self._activation_bytes() / self.layout.tp
        return 2 * self.collectives.send_recv(self.cluster, group[0], group[1], size)

    def stage_time(self, stage: Stage) -> StageTime:
        fwd, bwd = self._compute(stage, "fwd"), self._compute(stage, "bwd")
        recompute = 0.0
        if self.layout.recompute == "full":
            recompute = fwd
        elif self.layout.recompute == "selective":
            attn = stage.totals.by_kind.get("attention")
            if attn:
                _, attention_rate, _ = self._rates()
                share = self.layout.mbs / (self.layout.tp * self.layout.cp)
                recompute = attn["fwd_flops"] * share * CAUSAL_FRACTION / attention_rate
        attention_time = 0.0
        if "attention" in stage.totals.by_kind:
            _, attention_rate, _ = self._rates()
            share = self.layout.mbs / (self.layout.tp * self.layout.cp)
            attention_time = (
                3
                * stage.totals.by_kind["attention"]["fwd_flops"]
                * share
                * CAUSAL_FRACTION
                / attention_rate
            )
        ring = self._cached("cp", stage, self._cp_ring)
        parts = {
            "compute": fwd + bwd,
            "recompute": recompute,
            "tp_comm": self._cached("tp", stage, self._tp) * self.cal.tp_exposed,
            "ep_comm": self._cached("ep", stage, self._ep) * self.cal.ep_exposed * self.imbalance,
            "cp_comm": max(0.0, ring - attention_time),  # hidden under attention when shorter
            "pp_comm": self._cached("pp", stage, self._pp),
        }
        comm = parts["tp_comm"] + parts["ep_comm"] + parts["cp_comm"] + parts["pp_comm"]
        # Split communication between the directions in proportion to compute.
        fwd_share = fwd / (fwd + bwd) if fwd + bwd else 0.5
        return StageTime(fwd + comm * fwd_share, bwd + recompute + comm * (1 - fwd_share), parts)

    # -- data parallelism and optimizer -------------------------------------------------
    def _dp_collectives(self, stage: Stage) -> tuple[float, float]:
        """Seconds per step of gradient reduction and of parameter gathering."""
        L, c = self.layout, self.collectives
        dense = stage.totals.dense_per_rank(L.tp)
        expert = stage.totals.expert_params / (L.ep * L.etp)
        grad_bytes = 2 if self.precision != "fp32" else 4  # grads reduce in bf16 (Megatron's
        weight_bytes = 2 if self.precision != "fp32" else 4  # --grad-reduce-in-bf16 default)
        reduce = gather = 0.0
        for params, group in ((dense, self.groups["dp_cp"]), (expert, self.groups["edp_full"])):
            if len(group) == 1 or params == 0:
                continue
            if L.zero == 0:
                reduce += c.all_reduce(self.cluster, group, params * grad_bytes)
            else:
                reduce += c.reduce_scatter(self.cluster, group, params * grad_bytes)
                gathers = 2 * self.microbatches if L.zero == 3 else 1
                gather += gathers * c.all_gather(self.cluster, group, params * weight_bytes)
        if L.zero == 3:
            reduce *= self.microbatches  # FSDP reduce-scatters every micro-batch
        return reduce, gather

    def _dp(self, stage: Stage, last_backward: float, first_forward: float) -> tuple[float, float]:
        """(exposed seconds of gradient and parameter collectives, optimizer seconds)."""
        L = self.layout
        reduce = self._cached("dp_reduce", stage, lambda s: self._dp_collectives(s)[0])
        gather = self._cached("dp_gather", stage, lambda s: self._dp_collectives(s)[1])
        if L.zero == 3:
            window = self.microbatches * (last_backward + first_forward)
            exposed = max(reduce + gather - window, 0.0)
        else:
            exposed = max(reduce - last_backward, 0.0) + max(gather - first_forward, 0.0)
        exposed = max(exposed, self.cal.dp_exposed * (reduce + gather))
        dense = stage.totals.dense_per_rank(L.tp)
        expert = stage.totals.expert_params / (L.ep * L.etp)
        shards, expert_shards = zero_shards(L) if L.zero >= 1 else (1, 1)
        local = dense / shards + expert / expert_shards
        optimizer = local * ADAM_BYTES_PER_PARAM / (self.gpu.hbm_bw * self.cal.hbm_efficiency)
        return exposed, optimizer

    @functools.cached_property
    def stage_memories(self) -> list[StageMemory]:
        """Memory of one rank of every stage (calibration-free, computed once)."""
        return [self.stage_memory(s) for s in self.stages]

    def stage_memory(self, stage: Stage) -> StageMemory:
        top_k = (self.spec["moe"] or {}).get("top_k", 1)
        return stage_memory(
            stage,
            self.layout,
            self.precision,
            self.seq_len,
            self.spec["hidden"],
            self.microbatches,
            self.act_scale,
            top_k,
        )

    # -- everything ------------------------------------------------------------------------
    def estimate(self, model_name: str, reserve_bytes: float = 0.0) -> Estimate:
        L = self.layout
        times = [self.stage_time(s) for s in self.stages]
        t_max = max(t.total for t in times)
        m = self.microbatches
        pipeline = m * t_max + (sum(t.total for t in times) - t_max) / L.vpp
        dp_opt = [
            self._dp(s, t.backward, t.forward) for s, t in zip(self.stages, times, strict=True)
        ]
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
