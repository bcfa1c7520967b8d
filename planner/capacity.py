"""Capacity and cost planning: `tera-plan estimate`.

How long a training run takes, what it costs, the energy it draws and the CO2 it emits, with
the days made honest by goodput under failures; and the reverse question, the fewest GPUs
that meet a deadline.

Throughput. The step time of one layout comes from the cost model (`tera.planner.evaluate`
with --layout) or from the search (the fastest layout on the GPUs, under a time limit).
  ideal time   = tokens / (global_batch * seq_len / step_time)
  GPU-hours    = GPUs * effective time (the cluster is held while it recovers from failures)
  cost         = GPU-hours * price per GPU-hour; default DEFAULT_PRICE_PER_GPU_HOUR of
                 tera.planner.solve.search (hardware-facts.yaml
                 power_cost.price_usd_per_gpu_hour.planner_default_h100.central)

Goodput under failures (first-order checkpoint/restart model, hardware-facts.yaml
reliability.checkpoint_formulas.waste_first_order_R and .young):
  M   mean time between job interruptions = GPU-hours per interruption / GPUs. Default
      50,700 GPU-hours per unexpected interruption: Llama 3 405B's published rate,
      reliability.llama3_405b.derived.gpu_hours_per_unexpected_interruption (419
      unexpected interruptions in 54 days on 16,384 H100).
  C   checkpoint write time = checkpoint bytes per GPU * GPUs per node / the node's write
      bandwidth. Bytes per GPU: the parameters and optimizer state the GPU holds (the cost
      model's memory breakdown; every GPU writes what it holds, no deduplication across
      data-parallel replicas, so an upper bound). Bandwidth default 40 GB/s per node: the only
      storage rate in the reference data, the DGX SuperPOD H100 storage fabric's GDS read rate
      "at over 40 GBps" per node (hardware-facts.md section 2, [S32] V2); writes are assumed
      to run at that rate (a parameter: --checkpoint-gbps-per-node).
  R   restart time: default 10 minutes, the restart time of Daly's worked examples
      (hardware-facts.md section 5.3, [S45] V); a parameter: --restart-minutes.
  tau checkpoint interval by Young: tau = sqrt(2 * C * M).
  Each interval of tau spends C writing a checkpoint; each failure loses on average half an
  interval of work and the restart: expected lost work per failure = tau / 2 + R. So
      waste   = C / tau + (tau / 2 + R) / M
      goodput = 1 - waste,   effective time = ideal time / goodput.
  The first-order model holds for C, R << M; a waste of 1 or more is an error.

The reverse question (--days D): search(objective="gpus") finds the fewest GPUs whose STEP
time meets a deadline, but the deadline must hold for the effective time, which is longer by
1 / goodput, and the goodput itself depends on the GPU count (M shrinks as GPUs grow). So we
iterate: search with the step-time deadline D * g (g = 1 first), compute the goodput g' of
the result, and if ideal / g' exceeds D search again with D * g'; stop when the effective
time fits (at most MAX_DEADLINE_ROUNDS searches). Each round only tightens the deadline, so
the GPU count never decreases.

Energy (stated model; the constants are hardware-facts.yaml values):
  GPU power      = TDP * busy, busy = (compute + recompute) / step time from the cost model's
                   step breakdown; idle draw is taken as 0, so this is a lower bound on the
                   GPU share (at most TDP). TDP: gpus[].tdp_w (H100 SXM 700 W).
  node overhead  = (node max power - GPUs per node * TDP) / GPUs per node, per GPU;
                   power_cost.node_power_kw_max (DGX H100 10.2 kW, DGX A100 6.5 kW,
                   DGX B200 14.3 kW), or --node-power-kw.
  wall power     = (GPU power + node overhead) * PUE; default PUE 1.56,
                   power_cost.pue.uptime_industry_avg_2024.
  energy         = wall power * GPUs * effective time.
  CO2            = energy * grid intensity (--grid-gco2-per-kwh). The reference data has no
                   grid intensity, so there is no default: without it CO2 is not reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tera.planner.errors import InfeasibleError, InputError
from tera.planner.solve.search import DEFAULT_PRICE_PER_GPU_HOUR

GB = 1e9
GiB = 2**30
HOUR = 3600.0
DAY = 86400.0

# hardware-facts.yaml reliability.llama3_405b.derived.gpu_hours_per_unexpected_interruption
GPU_HOURS_PER_INTERRUPTION = 50700.0
# hardware-facts.md section 2 (DGX SuperPOD H100 storage fabric, GDS read "at over 40 GBps"
# per node) [S32] V2; assumed for writes.
CHECKPOINT_GBPS_PER_NODE = 40.0
# hardware-facts.md section 5.3: Daly's worked examples use restart R = 10 min [S45] V.
RESTART_MINUTES = 10.0
# hardware-facts.yaml power_cost.pue.uptime_industry_avg_2024
DEFAULT_PUE = 1.56
# hardware-facts.yaml power_cost.node_power_kw_max, keyed by the cluster's nodes.* source.
NODE_POWER_KW_MAX = {"dgx_h100": 10.2, "dgx_a100": 6.5, "dgx_b200": 14.3}
MAX_DEADLINE_ROUNDS = 6
PRICE_SOURCE = "hardware-facts.yaml power_cost.price_usd_per_gpu_hour.planner_default_h100.central"

# The planning table's models. No preset is near 10B or 100B dense, so those two are defined
# here: Llama-style (GQA with 128-wide heads, SwiGLU FFN of 3.5 x hidden, RoPE, untied
# embeddings, 131072-token vocabulary); tera counts 9.85B and 98.5B parameters. The 1T MoE is
# the kimi-k2 preset (1.04T total published, 32.6B active).
TABLE_MODELS = {
    "dense-10b": dict(layers=32, hidden=4608, kv_heads=4),
    "dense-100b": dict(layers=72, hidden=10240, kv_heads=8),
    "kimi-k2": None,
}


class CapacityError(InputError):
    """Bad capacity input; the message names the field and the fix."""


def table_spec(name: str):
    """The ModelSpec of a planning-table model (a preset name for the MoE)."""
    from tera.models import ModelSpec, load_spec

    shape = TABLE_MODELS[name]
    if shape is None:
        return load_spec(name)
    hidden = shape["hidden"]
    return ModelSpec.from_dict(
        dict(
            name=name,
            layers=shape["layers"],
            hidden=hidden,
            vocab=131072,
            tie_embeddings=False,
            position="rope",
            max_seq_len=8192,
            attention=dict(
                kind="gqa", heads=hidden // 128, kv_heads=shape["kv_heads"], head_dim=128
            ),
            ffn=dict(kind="swiglu", hidden=int(hidden * 3.5)),
            moe=None,
        )
    )


@dataclass(frozen=True)
class Assumptions:
    """Every constant of the estimate; the defaults and their sources are in the docstring."""

    price_per_gpu_hour: float = DEFAULT_PRICE_PER_GPU_HOUR
    pue: float = DEFAULT_PUE
    grid_gco2_per_kwh: float | None = None
    gpu_hours_per_interruption: float = GPU_HOURS_PER_INTERRUPTION
    checkpoint_gbps_per_node: float = CHECKPOINT_GBPS_PER_NODE
    restart_minutes: float = RESTART_MINUTES
    node_power_kw: float | None = None  # None: power_cost.node_power_kw_max of the node

    def check(self) -> None:
        for name in (
            "price_per_gpu_hour",
            "gpu_hours_per_interruption",
            "checkpoint_gbps_per_node",
        ):
            if not getattr(self, name) > 0:
                raise CapacityError(name, f"must be positive, got {getattr(self, name)}", "fix it")
        if not self.pue >= 1:
            raise CapacityError("pue", f"must be at least 1, got {self.pue}", "fix it")
        if not self.restart_minutes >= 0:
            raise CapacityError("restart_minutes", "must be at least 0", "fix it")
        if self.grid_gco2_per_kwh is not None and not self.grid_gco2_per_kwh >= 0:
            raise CapacityError("grid_gco2_per_kwh", "must be at least 0", "fix it")
        if self.node_power_kw is not None and not self.node_power_kw > 0:
            raise CapacityError("node_power_kw", "must be positive", "fix it")


def young_interval(checkpoint_s: float, mtbf_s: float) -> float:
    """Young's checkpoint interval sqrt(2 * C * M), seconds."""
    return math.sqrt(2.0 * checkpoint_s * mtbf_s)


@dataclass(frozen=True)
class Goodput:
    mtbf_s: float  # M
    checkpoint_s: float  # C
    restart_s: float  # R
    interval_s: float  # tau
    fraction: float  # 1 - C/tau - (tau/2 + R)/M

    def to_dict(self) -> dict:
        return {
            "mtbf_hours": self.mtbf_s / HOUR,
            "checkpoint_write_s": self.checkpoint_s,
            "restart_s": self.restart_s,
            "checkpoint_interval_s": self.interval_s,
            "lost_work_per_failure_s": self.interval_s / 2 + self.restart_s,
            "fraction": self.fraction,
        }


def goodput(gpus: int, checkpoint_s: float, restart_s: float, gpu_hours_per_interruption: float):
    """The goodput of `gpus` GPUs: M = GPU-hours per interruption / GPUs, tau by Young and
    waste = C / tau + (tau / 2 + R) / M (see the module docstring)."""
    mtbf_s = gpu_hours_per_interruption / gpus * HOUR
    interval = young_interval(checkpoint_s, mtbf_s)
    waste = (checkpoint_s / interval if interval > 0 else 0.0) + (interval / 2 + restart_s) / mtbf_s
    if waste >= 1:
        raise CapacityError(
            "gpus",
            f"{gpus} GPUs fail every {mtbf_s / HOUR:.2f} h, faster than checkpoint and restart "
            f"recover (waste {waste:.0%})",
            "use fewer GPUs, a faster checkpoint or a shorter restart",
        )
    return Goodput(mtbf_s, checkpoint_s, restart_s, interval, 1.0 - waste)


def checkpoint_seconds(bytes_per_gpu: float, gpus_per_node: int, gbps_per_node: float) -> float:
    """Seconds to write a checkpoint: a node writes its GPUs' bytes at `gbps_per_node` GB/s."""
    return bytes_per_gpu * gpus_per_node / (gbps_per_node * GB)


def node_power_kw(cluster, override: float | None) -> tuple[float, str]:
    """The node's max power and its source."""
    if override is not None:
        return override, "--node-power-kw"
    for source in cluster.sources:
        key = source.removeprefix("nodes.")
        if source.startswith("nodes.") and key in NODE_POWER_KW_MAX:
            return NODE_POWER_KW_MAX[key], f"hardware-facts.yaml power_cost.node_power_kw_max.{key}"
    raise CapacityError(
        "node_power_kw",
        f"the reference data has no node power for cluster {cluster.name}",
        "give --node-power-kw",
    )


@dataclass(frozen=True)
class Capacity:
    """What `tera-plan estimate` reports; `to_dict` is its --json object."""

    model: str
    cluster: str
    gpus: int
    layout: str
    fits: bool
    tokens: float
    global_batch: int
    seq_len: int
    step_time_s: float
    tokens_per_s: float
    mfu: float
    peak_memory_gib: float
    goodput: Goodput
    gpu_w: float  # per GPU, at its predicted busy fraction
    overhead_w: float  # per GPU, the node's non-GPU share
    assumptions: Assumptions
    sources: dict

    @property
    def ideal_s(self) -> float:
        return self.tokens / self.tokens_per_s

    @property
    def effective_s(self) -> float:
        return self.ideal_s / self.goodput.fraction

    @property
    def gpu_hours(self) -> float:
        return self.gpus * self.effective_s / HOUR

    @property
    def cost_usd(self) -> float:
        return self.gpu_hours * self.assumptions.price_per_gpu_hour

    @property
    def wall_w_per_gpu(self) -> float:
        return (self.gpu_w + self.overhead_w) * self.assumptions.pue

    @property
    def energy_mwh(self) -> float:
        return self.wall_w_per_gpu * self.gpu_hours / 1e6

    @property
    def co2_t(self) -> float | None:
        g = self.assumptions.grid_gco2_per_kwh
        return None if g is None else self.energy_mwh * 1e3 * g / 1e6

    def to_dict(self) -> dict:
        a = self.assumptions
        return {
            "model": self.model,
            "cluster": self.cluster,
            "gpus": self.gpus,
            "layout": self.layout,
            "fits": self.fits,
            "tokens": self.tokens,
            "global_batch": self.global_batch,
            "seq_len": self.seq_len,
            "step_time_s": self.step_time_s,
            "tokens_per_s": self.tokens_per_s,
            "mfu": self.mfu,
            "peak_memory_gib": self.peak_memory_gib,
            "ideal_days": self.ideal_s / DAY,
            "goodput": self.goodput.to_dict(),
            "effective_days": self.effective_s / DAY,
            "gpu_hours": self.gpu_hours,
            "price_per_gpu_hour": a.price_per_gpu_hour,
            "cost_usd": self.cost_usd,
            "gpu_power_w": self.gpu_w,
            "node_overhead_w_per_gpu": self.overhead_w,
            "pue": a.pue,
            "wall_power_w_per_gpu": self.wall_w_per_gpu,
            "energy_mwh": self.energy_mwh,
            "grid_gco2_per_kwh": a.grid_gco2_per_kwh,
            "co2_t": self.co2_t,
            "sources": self.sources,
        }


def capacity_of(spec, cluster, layout, est, tokens, global_batch, seq_len, assumptions):
    """The Capacity of one costed layout (`est`: a tera.planner.cost.Estimate)."""
    held = (est.memory_gib.get("params", 0.0) + est.memory_gib.get("optimizer", 0.0)) * GiB
    ckpt = checkpoint_seconds(held, cluster.gpus_per_node, assumptions.checkpoint_gbps_per_node)
    good = goodput(
        cluster.num_gpus,
        ckpt,
        assumptions.restart_minutes * 60,
        assumptions.gpu_hours_per_interruption,
    )
    tdp = cluster.gpu.tdp_w
    if tdp is None:
        raise CapacityError("gpu", f"{cluster.gpu.id} has no TDP in the catalog", "pick a GPU")
    node_kw, node_source = node_power_kw(cluster, assumptions.node_power_kw)
    overhead = max(node_kw * 1e3 - cluster.gpus_per_node * tdp, 0.0) / cluster.gpus_per_node
    b = est.breakdown_s
    busy = min((b.get("compute", 0.0) + b.get("recompute", 0.0)) / est.step_time_s, 1.0)
    return Capacity(
        model=spec.name,
        cluster=cluster.name,
        gpus=cluster.num_gpus,
        layout=layout.brief(),
        fits=est.fits,
        tokens=tokens,
        global_batch=global_batch,
        seq_len=seq_len,
        step_time_s=est.step_time_s,
        tokens_per_s=global_batch * seq_len / est.step_time_s,
        mfu=est.mfu,
        peak_memory_gib=est.peak_memory_gib,
        goodput=good,
        gpu_w=tdp * busy,
        overhead_w=overhead,
        assumptions=assumptions,
        sources={
            "price_per_gpu_hour": PRICE_SOURCE,
            "interruptions": "hardware-facts.yaml "
            "reliability.llama3_405b.derived.gpu_hours_per_unexpected_interruption",
            "checkpoint_bandwidth": "hardware-facts.md section 2 (storage GDS 40 GB/s per node)",
            "restart": "hardware-facts.md section 5.3 (Daly's examples, R = 10 min)",
            "interval": "hardware-facts.yaml reliability.checkpoint_formulas.young",
            "waste": "hardware-facts.yaml reliability.checkpoint_formulas.waste_first_order_R",
            "gpu_tdp": f"catalog {cluster.gpu.id}.tdp_w",
            "node_power": node_source,
            "pue": "hardware-facts.yaml power_cost.pue.uptime_industry_avg_2024",
            "grid": "--grid-gco2-per-kwh (no reference value)",
        },
    )


def estimate(
    model,
    cluster,
    tokens: float,
    global_batch: int,
    seq_len: int,
    gpus: int | None = None,
    days: float | None = None,
    layout=None,
    precision: str = "bf16",
    assumptions: Assumptions | None = None,
    time_limit: float = 20.0,
    progress=None,
) -> Capacity:
    """Estimate a run of `tokens` tokens on `gpus` GPUs (with `layout`, else the fastest
    layout the search finds within `time_limit` seconds), or on the fewest GPUs (up to
    `gpus`, default the cluster preset's size) that finish within `days` effective days."""
    from tera.planner.cost import CostModel
    from tera.planner.inputs import load_problem
    from tera.planner.layout import Layout
    from tera.planner.solve import search
    from tera.planner.trace import trace

    assumptions = assumptions or Assumptions()
    assumptions.check()
    if not tokens > 0:
        raise CapacityError("tokens", f"must be positive, got {tokens}", "give e.g. 15T")
    if days is not None and not days > 0:
        raise CapacityError("days", f"must be positive, got {days}", "give the deadline")
    if days is None and gpus is None:
        raise CapacityError("gpus", "give --gpus or --days", "say how many GPUs or the deadline")
    spec, full = load_problem(model, cluster, gpus, precision, global_batch, seq_len, 1.0)

    if days is None:
        if layout is not None:
            parsed = layout if isinstance(layout, Layout) else Layout.parse(layout)
            resolved = parsed.resolve(spec, full.num_gpus, global_batch, seq_len)
            graph = trace(spec, seq_len)
            est = CostModel(graph, full, resolved, global_batch, precision).estimate(spec.name)
        else:
            result = search(
                spec, full, global_batch, seq_len, precision=precision,
                time_limit=time_limit, progress=progress,
            )  # fmt: skip
            resolved, est = result.best.layout, result.best.estimate
        return capacity_of(spec, full, resolved, est, tokens, global_batch, seq_len, assumptions)

    if layout is not None:
        raise CapacityError("layout", "--days searches the layout", "drop --layout or give --gpus")
    fraction = 1.0
    for _ in range(MAX_DEADLINE_ROUNDS):
        result = search(
            spec, full, global_batch, seq_len, precision=precision, time_limit=time_limit,
            objective="gpus", tokens=tokens, deadline_days=days * fraction, progress=progress,
        )  # fmt: skip
        best = result.best
        cluster_n = result.clusters[best.config.gpus]
        cap = capacity_of(
            spec, cluster_n, best.layout, best.estimate, tokens, global_batch, seq_len, assumptions
        )
        if cap.effective_s <= days * DAY * (1 + 1e-9):
            return cap
        # ideal <= days * fraction held but ideal / goodput did not: goodput < fraction.
        fraction = cap.goodput.fraction
    raise InfeasibleError(
        f"no GPU count up to {full.num_gpus} meets {days} effective days after "
        f"{MAX_DEADLINE_ROUNDS} rounds",
        "allow more GPUs (--gpus), more days or fewer tokens",
    )
