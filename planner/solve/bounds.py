"""Lower bounds on the step time of a configuration, for the search to skip configurations.

Two bounds, both in the integer units of tables.py (ns), both valid for every partition
and recompute assignment of the configuration:

`quick`   the pipeline formula with all blocks' forward and backward (no recompute)
          spread perfectly over the stages (max_s T_s >= sum_s T_s / pp), plus the
          optimizer step of the mean stage (max_s O_s >= sum_s O_s / pp). Cheap: it reads
          per-degree figures memoised across configurations.
`memory`  `quick` with the slowest stage at least what whole blocks allow: the least T
          for which the stages, each in one recompute mode r, host every block with
          k_s <= cap_s,r (memory) and fixed_s + k_s * (block + rec_r) <= T (time), fixed_s
          the stage's embedding, head and pipeline transfers; plus the least recompute
          work that memory forces, from a relaxation in which
          blocks are fluid: stage s has a budget B_s (its share of HBM less what it holds
          whatever the partition: embedding or head, buffers), a block in mode r costs
          vpp*static + inflight_s*saved_r of it and rec_r of time, and modes may mix within
          a stage. The least recompute time to host k blocks on a stage is then the lower
          convex hull of (0, 0), (cap_none, 0), (cap_sel, rec_sel*cap_sel) and
          (cap_full, rec_full*cap_full), with cap_r = B_s / (vpp*static + inflight_s*saved_r),
          and spreading the blocks over the stages at least cost is a greedy fill of the
          hulls' pieces by slope (each hull is convex). Blocks of one kind are bounded with
          the other kind dropped (its memory and time only add), and the larger of the
          two bounds holds. None when even full recompute cannot host the blocks.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np

from tera.planner.cost.memory import (
    in_flight_chunks,
    sharded_params,
    static_bytes,
    zero_shards,
)
from tera.planner.cost.stages import BLOCK_KINDS
from tera.planner.ranks import DEFAULT_ORDER
from tera.planner.solve.space import Config
from tera.planner.solve.tables import MODES, ns


class Bounds:
    """Bounds for the configurations of one Searcher (see the module docstring)."""

    def __init__(self, searcher):
        self.s = searcher
        self.segs = searcher.segs
        self.counts = {k: self.segs.block_kinds.count(k) for k in BLOCK_KINDS}
        self._inner: dict[tuple, object] = {}
        self._pp: dict[tuple, int] = {}
        self._statics: dict[tuple, float] = {}
        self._cap_cache: dict[tuple, dict[str, int]] = {}
        self._optimizer: dict[tuple, int | None] = {}
        self._works: dict[tuple, int] = {}

    def _model(self, c: Config):
        """A cost model with c's inner degrees (segment times and memory depend on
        nothing else, but for pp where the order spreads expert groups over stages),
        memoised."""
        key = (
            c.gpus,
            c.tp,
            c.cp,
            c.ep,
            c.etp,
            c.mbs,
            c.order,
            c.pp if c.order != DEFAULT_ORDER else 0,
        )
        if key not in self._inner:
            self._inner[key] = self.s.cost_model(c)
        return self._inner[key]

    def _pp_work(self, c: Config) -> int:
        key = (c.gpus, c.tp, c.cp, c.mbs, c.pp, c.order)
        if key not in self._pp:
            self._pp[key] = 2 * ns(self.s.cost_model(c).pp_time() / 2)
        return self._pp[key]

    def _static(self, c: Config, kind: str) -> float:
        """Weights, gradients and optimizer bytes of one segment of `kind` per rank."""
        key = (c.gpus, c.tp, c.cp, c.pp, c.ep, c.etp, c.zero, c.dp_replicate, kind)
        if key not in self._statics:
            seg = self._model(c).memory_model.segment[kind]
            shards = zero_shards(c)
            self._statics[key] = sum(
                static_bytes(seg.dense, seg.expert, c.zero, shards, self.s.precision)
            )
        return self._statics[key]

    def quick(self, c: Config) -> int | None:
        """The cheap bound, or None when the static memory alone cannot fit."""
        optimizer = self._static_and_optimizer(c)
        if optimizer is None:
            return None
        return self._pipeline(c, self._work(c)) + optimizer

    def _static_and_optimizer(self, c: Config) -> int | None:
        """The mean stage's optimizer ns, or None when the static memory cannot fit on pp
        GPUs; memoised (it does not depend on vpp or the micro-batch)."""
        key = (c.gpus, c.tp, c.cp, c.pp, c.ep, c.etp, c.zero, c.dp_replicate)
        if key in self._optimizer:
            return self._optimizer[key]
        model = self._model(c)
        kinds = self.segs.whole_model(c.pp)
        static = sum(n * self._static(c, k) for k, n in kinds.items())
        optimizer = None
        if static / c.pp <= self._budget(c):
            seg, shards = model.memory_model.segment, zero_shards(c)
            local = sum(
                n * sharded_params(seg[k].dense, seg[k].expert, c.zero, shards, 1)
                for k, n in kinds.items()
            )
            slack = self.segs.layers + len(kinds)  # per-segment rounding of the tables, ns
            optimizer = max(ns(model.optimizer_seconds(local / c.pp)) - slack, 0)
        self._optimizer[key] = optimizer
        return optimizer

    def memory(self, c: Config) -> int | None:
        """The bound with memory-forced recompute, or None when nothing can host the
        blocks."""
        quick = self.quick(c)
        if quick is None:
            return None
        extra = 0.0
        for kind, n in self.counts.items():
            if n:
                needed = self._least_recompute(c, kind, n)
                if needed is None:
                    return None
                extra = max(extra, needed)
        # the recompute adds to the work the pipeline spreads, and whole blocks may not
        # balance the stages as well as fluid work: re-derive the pipeline term
        times = self._model(c).segment_times
        work = self._work(c)
        fixed = [self._pp_work(c)] * c.pp
        fixed[0] += ns(times["embedding"].forward) + ns(times["embedding"].backward)
        fixed[-1] += ns(times["head"].forward) + ns(times["head"].backward)
        slowest = 0
        for kind, n in self.counts.items():
            if n:
                stage = self._slowest_stage(c, kind, n, fixed)
                if stage is None:
                    return None
                slowest = max(slowest, stage)
        added = self._pipeline(c, work + math.floor(extra), slowest) - self._pipeline(c, work)
        return quick + added

    def _work(self, c: Config) -> int:
        """ns of every segment's forward and backward per micro-batch, no recompute."""
        key = (c.gpus, c.tp, c.cp, c.ep, c.etp, c.mbs, c.order, c.pp)
        if key not in self._works:
            times = self._model(c).segment_times
            kinds = self.segs.whole_model(c.pp)
            work = sum(n * (ns(times[k].forward) + ns(times[k].backward)) for k, n in kinds.items())
            self._works[key] = work + c.pp * self._pp_work(c)
        return self._works[key]

    def _pipeline(self, c: Config, work: int, slowest: int = 0) -> int:
        """The pipeline term for total stage work `work` and a slowest stage of at least
        `slowest` (and at least the mean)."""
        m = self.s.global_batch // (c.dp * c.mbs)
        per_stage = max(-(-work // c.pp), slowest)
        return -(-((m * c.vpp - 1) * per_stage + work) // c.vpp)

    def _budget(self, c: Config) -> float:
        return self.s.clusters[c.gpus].gpu.hbm_bytes - self.s.reserve

    def _least_recompute(self, c: Config, kind: str, blocks: int) -> float | None:
        """ns of recompute that hosting `blocks` blocks of `kind` needs at least."""
        rec = self._model(c).segment_times[kind].recompute
        slopes = tuple(ns(rec[r]) for r in MODES)
        pieces = []
        for caps in self._caps(c, kind).tolist():
            pieces += _hull_pieces(tuple(caps), slopes)
        pieces.sort()
        need, cost = float(blocks), 0.0
        for slope, length in pieces:
            take = min(length, need)
            cost += slope * take
            need -= take
            if need <= 1e-9:
                return cost
        return None

    def _slowest_stage(self, c: Config, kind: str, blocks: int, fixed: list[int]) -> int | None:
        """The least T such that the stages can host `blocks` whole blocks of `kind`
        (the other kind dropped) with every stage in one recompute mode, within its
        memory, and no stage slower than T (fixed: each stage's time without blocks)."""
        model = self._model(c)
        times = model.segment_times[kind]
        block = [ns(times.forward) + ns(times.backward) + ns(times.recompute[r]) for r in MODES]
        caps = self._caps(c, kind)  # stage x mode, modes in MODES order
        if caps.max(axis=1).sum() < blocks:
            return None
        # t_s(k) = fixed_s + k * (the fastest block time among modes that fit k blocks)
        # increases with k, so the least T hosting `blocks` blocks is the blocks-th
        # smallest t_s(k) over all stages s and k >= 1 (and at least every fixed_s).
        k = np.arange(1, blocks + 1)
        fastest = np.full((c.pp, blocks), np.inf)
        for r in range(len(MODES)):
            fits = k[None, :] <= caps[:, r : r + 1]
            fastest = np.where(fits, np.minimum(fastest, block[r]), fastest)
        times = np.asarray(fixed, dtype=float)[:, None] + k[None, :] * fastest
        kth = np.partition(times.ravel(), blocks - 1)[blocks - 1]
        return max(max(fixed), int(kth))

    def _caps(self, c: Config, kind: str) -> np.ndarray:
        """Blocks of `kind` each stage can hold in each recompute mode (stage x mode,
        modes in MODES order), counting what the stage holds whatever its partition
        (embedding or head, buffers, gathered and working blocks)."""
        key = (c, kind)
        if key not in self._cap_cache:
            self._cap_cache[key] = self._count_caps(c, kind)
        return self._cap_cache[key]

    def _count_caps(self, c: Config, kind: str) -> np.ndarray:
        model = self._model(c)
        memory, seg = model.memory_model, model.memory_model.segment
        m = self.s.global_batch // (c.dp * c.mbs)
        inflight = np.array([in_flight_chunks(s, c.pp, c.vpp, m) for s in range(c.pp)])
        # what a stage holds besides blocks: only the first and the last differ
        held_fixed, held_saved = np.empty(c.pp), np.empty(c.pp)
        for stage in {0, c.pp // 2, c.pp - 1}:
            held = [k for k, n in self.segs.held(stage, c.pp).items() if n]
            fixed = memory.buffers([*held, kind]) + sum(self._static(c, k) for k in held)
            saved = sum(seg[k].saved["none"] for k in held)
            rows = slice(stage, stage + 1) if stage in (0, c.pp - 1) else slice(1, c.pp - 1)
            held_fixed[rows], held_saved[rows] = fixed, saved
        budget = c.vpp * (self._budget(c) - held_fixed) - inflight * held_saved
        block = seg[kind]
        working = np.array([c.vpp * block.working if r == "full" else 0.0 for r in MODES])
        saved = np.array([block.saved[r] for r in MODES])
        left = budget[:, None] - working[None, :]  # stage x mode
        per_block = c.vpp * self._static(c, kind) + inflight[:, None] * saved[None, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            count = np.where(per_block > 0, np.floor(left / per_block), 10**9)
        return np.maximum(count, 0).astype(np.int64)


@functools.lru_cache(maxsize=1 << 16)
def _hull_pieces(caps: tuple[int, ...], slopes: tuple[int, ...]) -> tuple[tuple[float, float], ...]:
    """(slope, length) of the lower convex hull of the origin and the points
    (caps[r], slopes[r] * caps[r]): a stage holding as many blocks as fit in one mode, for
    each mode. The hull bounds the stage's recompute ns for any number of blocks, modes
    mixed. Memoised: stages of many configurations share their caps."""
    lowest: dict[float, float] = {0.0: 0.0}
    for x, slope in zip(caps, slopes, strict=True):
        lowest[x] = min(slope * x, lowest.get(x, slope * x))
    points = sorted(lowest.items())
    hull: list[tuple[float, float]] = []
    for p in points:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):
                hull.pop()  # hull[-1] lies on or above the segment hull[-2] -> p
            else:
                break
        hull.append(p)
    return tuple(
        ((y2 - y1) / (x2 - x1), x2 - x1)
        for (x1, y1), (x2, y2) in itertools.pairwise(hull)
        if x2 > x1
    )
