"""Integer cost tables of one configuration, read from the cost model, and their meaning.

The CP-SAT model (model.py) needs integer coefficients. `ConfigTables.build` reads, for
one Config, every per-segment figure of the cost model (planner/cost: segment times,
data-parallel buckets, memory) and rounds it once: times to nanoseconds (nearest),
memory to KiB (up, so that a plan the tables accept also fits in the float model) and
the HBM budget to KiB (down). `ConfigTables.step_ns` is the objective those tables
define for a partition and per-stage recompute; it is the reference the CP-SAT model
encodes and the function exhaustive enumeration minimises, and it agrees with
`CostModel.estimate` up to the rounding (tests/planner/test_solve.py checks both).

Objective of a candidate (all integers, per step):
  T_s  = F_s + B_s, with F_s = sum_k n_sk f_k + pp_f and B_s = sum_k n_sk (b_k + r_k[mode_s]) + pp_b
  P    = ceil(((m*vpp - 1) * max_s T_s + sum_s T_s) / vpp)        (pipeline)
  D    = max_s max(c_s, R_s + G_s - m (F_s + B_s))      for zero = 3
         max_s max(c_s, max(R_s - B_s, 0) + max(G_s - F_s, 0))   otherwise
         with R_s, G_s, c_s = sum_k n_sk (reduce_k, gather_k, exposed floor_k)
  O    = max_s sum_k n_sk opt_k
  step = P + D + O
Memory of stage s, multiplied by vpp to stay integral, must not exceed vpp * budget:
  vpp (sum_k n_sk static_k + base + moe_buffer [moe on s] + max_k working_k [full]
       + max_k gathered_k [zero = 3]) + inflight_s * sum_k n_sk saved_k[mode_s]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tera.planner.cost.estimate import CostModel
from tera.planner.cost.memory import in_flight_chunks
from tera.planner.cost.stages import BLOCK_KINDS, SEGMENT_KINDS, Segments, Stage, split_stages
from tera.planner.solve.space import Config

NS = 1e-9
KIB = 1024
MODES = ("none", "selective", "full")


def ns(seconds: float) -> int:
    return round(seconds / NS)


def kib_up(nbytes: float) -> int:
    return math.ceil(nbytes / KIB - 1e-9)


@dataclass(frozen=True)
class ConfigTables:
    """Integer coefficients of one configuration (see the module docstring)."""

    config: Config
    microbatches: int
    forward: dict[str, int]  # kind -> ns per micro-batch
    backward: dict[str, int]
    recompute: dict[str, dict[str, int]]  # kind -> mode -> ns added to the backward
    pp_forward: int
    pp_backward: int
    reduce: dict[str, int]  # kind -> ns per step
    gather: dict[str, int]
    exposed_floor: dict[str, int]  # kind -> ns: dp_exposed * (reduce + gather)
    optimizer: dict[str, int]  # kind -> ns
    static: dict[str, int]  # kind -> KiB of weights, grads and optimizer state
    saved: dict[str, dict[str, int]]  # kind -> mode -> KiB per micro-batch
    working: dict[str, int]  # kind -> KiB re-materialised under full recompute
    gathered: dict[str, int]  # kind -> KiB gathered under zero=3 (0 otherwise)
    base_buffers: int  # KiB every stage holds (tensor-parallel gather buffer)
    moe_buffers: int  # KiB a stage with MoE blocks adds (dispatch buffers)
    inflight: tuple[int, ...]  # chunks in flight per stage
    budget: int  # KiB of HBM per GPU less the reserve

    @classmethod
    def build(cls, config: Config, cost: CostModel, reserve_bytes: float) -> ConfigTables:
        """The tables of `config` from its cost model (built on config's layout)."""
        times, dp, memory = cost.segment_times, cost.segment_dp, cost.memory_model
        pp = cost.pp_time()
        gathered = {}
        for kind in SEGMENT_KINDS:
            seg = memory.segment[kind]
            gathered[kind] = (
                kib_up(memory.w_bytes * (seg.dense + seg.expert)) if config.zero == 3 else 0
            )
        base = memory.buffers([])
        return cls(
            config=config,
            microbatches=cost.microbatches,
            forward={k: ns(t.forward) for k, t in times.items()},
            backward={k: ns(t.backward) for k, t in times.items()},
            recompute={k: {m: ns(t.recompute[m]) for m in MODES} for k, t in times.items()},
            pp_forward=ns(pp / 2),
            pp_backward=ns(pp / 2),
            reduce={k: ns(d.reduce) for k, d in dp.items()},
            gather={k: ns(d.gather) for k, d in dp.items()},
            exposed_floor=exposed_floors(cost),
            optimizer={k: ns(cost.optimizer_seconds(d.local_params)) for k, d in dp.items()},
            static={
                k: kib_up(sum(memory.static_bytes(seg.dense, seg.expert)))
                for k, seg in memory.segment.items()
            },
            saved={
                k: {m: kib_up(seg.saved[m]) for m in MODES} for k, seg in memory.segment.items()
            },
            working={k: kib_up(seg.working) for k, seg in memory.segment.items()},
            gathered=gathered,
            base_buffers=kib_up(base),
            moe_buffers=kib_up(memory.buffers(["moe"]) - base) if config.ep > 1 else 0,
            inflight=tuple(
                in_flight_chunks(s, config.pp, config.vpp, cost.microbatches)
                for s in range(config.pp)
            ),
            budget=math.floor((cost.gpu.hbm_bytes - reserve_bytes) / KIB),
        )

    # -- the reference semantics -----------------------------------------------------------
    def stage_memory(self, counts: dict[str, int], mode: str, stage: int) -> int:
        """vpp times the KiB one rank of this stage holds (see the module docstring)."""
        vpp = self.config.vpp
        present = [k for k, n in counts.items() if n]
        held = sum(n * self.static[k] for k, n in counts.items()) + self.base_buffers
        if counts["moe"]:
            held += self.moe_buffers
        if mode == "full":
            held += max((self.working[k] for k in present), default=0)
        held += max((self.gathered[k] for k in present), default=0)
        saved = sum(n * self.saved[k][mode] for k, n in counts.items())
        return vpp * held + self.inflight[stage] * saved

    def step_ns(self, stages: list[Stage]) -> int | None:
        """Integer step time of these stages (a partition with per-stage recompute), or
        None when a stage does not fit in the budget."""
        m, vpp, zero = self.microbatches, self.config.vpp, self.config.zero
        totals, dp, optimizer = [], [], []
        for stage in stages:
            counts, mode = stage.counts, stage.recompute
            if self.stage_memory(counts, mode, stage.index) > vpp * self.budget:
                return None
            f = self.pp_forward + sum(n * self.forward[k] for k, n in counts.items())
            b = self.pp_backward + sum(
                n * (self.backward[k] + self.recompute[k][mode]) for k, n in counts.items()
            )
            r = sum(n * self.reduce[k] for k, n in counts.items())
            g = sum(n * self.gather[k] for k, n in counts.items())
            floor = sum(n * self.exposed_floor[k] for k, n in counts.items())
            if zero == 3:
                exposed = max(floor, r + g - m * (f + b), 0)
            else:
                exposed = max(floor, max(r - b, 0) + max(g - f, 0))
            totals.append(f + b)
            dp.append(exposed)
            optimizer.append(sum(n * self.optimizer[k] for k, n in counts.items()))
        pipeline = -(-((m * vpp - 1) * max(totals) + sum(totals)) // vpp)
        return pipeline + max(dp) + max(optimizer)


def exposed_floors(cost: CostModel) -> dict[str, int]:
    """ns per segment kind that data parallelism always leaves exposed (dp_exposed of its
    collectives): the floor of D in the objective."""
    return {k: ns(cost.cal.dp_exposed * (d.reduce + d.gather)) for k, d in cost.segment_dp.items()}


def stages_of(segs: Segments, config: Config, partition, recompute: tuple[str, ...]):
    """The stages of a config under a partition and per-stage recompute modes."""
    layout = config.layout(tuple(partition), ":".join(recompute))
    return split_stages(segs, layout)


assert set(BLOCK_KINDS) <= set(SEGMENT_KINDS)
