"""The CP-SAT model of one configuration: its partition, per-stage recompute and memory.

Given the integer tables of a configuration (tables.py), one CpModel chooses the blocks of
each virtual chunk and the recompute mode of each stage.

Variables
  n_c            blocks in chunk c (1 .. layers), sum over c = layers
  De_c           dense blocks among the first (n_0 + ... + n_c) blocks: an element
                 constraint on the model's prefix count, so any dense/MoE pattern is exact
  dense_s, moe_s blocks of each kind on stage s (sums over the chunks c = s mod pp)
  r_sm           recompute mode m of stage s, exactly one per stage
  U_skm          = count of kind k on stage s if r_sm else 0: the products of a count and
                 a mode, linearised exactly by two reified equalities (OnlyEnforceIf)
  has_sk, z_sk   has_sk >= [count_sk > 0] and z_sk >= r_s,full + has_sk - 1: presence
                 flags for the max terms of memory (only ever pushed up by feasibility)
  Tmax, P, D, O  max stage time, pipeline time, exposed data-parallel time and optimizer
                 time, all in ns

Constraints
  Tmax >= T_s for every stage; vpp*P >= (m*vpp - 1)*Tmax + sum_s T_s: the pipeline
  formula with its max over stages decomposed into lower bounds, exact at the optimum
  because the objective pushes Tmax and P down; D >= each linear piece of the exposed
  data-parallel time of every stage (a max of maxes of linear terms is the smallest
  value above all pieces); O >= the optimizer time of every stage; memory of every
  stage <= the budget, once for each choice of the max terms (max(a, b) + c <= cap is
  a + c <= cap and b + c <= cap).
Objective: minimise P + D + O, the step time (objective.py turns it into the value the
search ranks by: GPU-seconds for cost, GPUs first for a deadline). Every coefficient is
an integer from the tables, so the optimum equals tables.step_ns minimised over the same
candidates: the model is exact, not a relaxation. The search (search.py) adds
"objective < cutoff" to refute configurations that cannot enter the top K.
"""

from __future__ import annotations

from dataclasses import dataclass

from ortools.sat.python import cp_model

from tera.planner.cost.stages import Segments
from tera.planner.solve.tables import MODES, ConfigTables

BLOCKS = ("dense", "moe")


@dataclass
class Shape:
    """The partition and recompute variables of a (pp, vpp) pipeline."""

    pp: int
    vpp: int
    sizes: list  # n_c
    counts: list[dict]  # per stage: kind -> IntVar
    fixed: list[dict]  # per stage: embedding/head/tied_head -> 0 or 1
    modes: list[dict]  # per stage: mode -> BoolVar
    products: list[dict]  # per stage: (kind, mode) -> IntVar
    has: list[dict]  # per stage: kind -> BoolVar
    full_has: list[dict]  # per stage: kind -> BoolVar


class Formulation:
    """The CP-SAT model of one configuration (see the module docstring)."""

    def __init__(self, segs: Segments, tables: ConfigTables):
        self.segs = segs
        self.model = cp_model.CpModel()
        self.tables = tables
        horizon = self._step_bound(tables)
        self.tmax = self.model.new_int_var(0, horizon, "Tmax")
        self.pipeline = self.model.new_int_var(0, horizon, "P")
        self.dp = self.model.new_int_var(0, horizon, "D")
        self.optimizer = self.model.new_int_var(0, horizon, "O")
        self.objective = self.pipeline + self.dp + self.optimizer
        self.model.minimize(self.objective)
        self.shape = self._shape(tables.config.pp, tables.config.vpp)
        self._add_config(tables)

    # -- bounds ----------------------------------------------------------------------------
    def _step_bound(self, t: ConfigTables) -> int:
        """A step time no candidate of `t` exceeds (every block on one stage, full
        recompute, nothing hidden): the horizon of the time variables."""
        whole = self.segs.layers + 2
        worst = max(t.forward[k] + t.backward[k] + max(t.recompute[k].values()) for k in t.forward)
        stage = whole * worst + t.pp_forward + t.pp_backward
        dp = whole * max(t.reduce[k] + t.gather[k] + t.exposed_floor[k] for k in t.reduce)
        optimizer = whole * max(t.optimizer.values())
        return (t.microbatches + 1) * stage + dp + optimizer + 1

    # -- partition and recompute variables ---------------------------------------------------
    def _shape(self, pp: int, vpp: int) -> Shape:
        m, segs, layers = self.model, self.segs, self.segs.layers
        chunks = pp * vpp
        tag = f"pp{pp}v{vpp}"
        sizes = [m.new_int_var(1, layers - chunks + 1, f"{tag}n{c}") for c in range(chunks)]
        m.add(sum(sizes) == layers)
        prefix = [segs.dense_before(x) for x in range(layers + 1)]
        dense_upto, end = [], 0
        for c in range(chunks):
            end = end + sizes[c]
            if c == chunks - 1:
                dense_upto.append(prefix[layers])
                continue
            d = m.new_int_var(0, prefix[layers], f"{tag}De{c}")
            m.add_element(end, prefix, d)
            dense_upto.append(d)
        counts, fixed, modes, products, has, full_has = [], [], [], [], [], []
        for s in range(pp):
            own = range(s, chunks, pp)
            dense_expr = sum(dense_upto[c] - (dense_upto[c - 1] if c else 0) for c in own)
            blocks = sum(sizes[c] for c in own)
            dense = m.new_int_var(0, layers, f"{tag}s{s}dense")
            moe = m.new_int_var(0, layers, f"{tag}s{s}moe")
            m.add(dense == dense_expr)
            m.add(moe == blocks - dense_expr)
            count = {"dense": dense, "moe": moe}
            fixed.append(segs.held(s, pp))
            mode = {r: m.new_bool_var(f"{tag}s{s}{r}") for r in MODES}
            m.add_exactly_one(mode.values())
            product = {}
            for kind in BLOCKS:
                for r in MODES:
                    u = m.new_int_var(0, layers, f"{tag}s{s}{kind}{r}")
                    m.add(u == count[kind]).only_enforce_if(mode[r])
                    m.add(u == 0).only_enforce_if(mode[r].Not())
                    product[kind, r] = u
            present = {}
            full_present = {}
            for kind in BLOCKS:
                flag = m.new_bool_var(f"{tag}s{s}has{kind}")
                m.add(count[kind] <= layers * flag)
                present[kind] = flag
                z = m.new_bool_var(f"{tag}s{s}full{kind}")
                m.add(z >= mode["full"] + flag - 1)
                full_present[kind] = z
            counts.append(count)
            modes.append(mode)
            products.append(product)
            has.append(present)
            full_has.append(full_present)
        return Shape(pp, vpp, sizes, counts, fixed, modes, products, has, full_has)

    # -- the configuration's constraints ------------------------------------------------------
    def _add_config(self, t: ConfigTables) -> None:
        c = t.config
        shape = self.shape
        m, vpp, mb = self.model, c.vpp, t.microbatches
        totals = []
        for s in range(c.pp):
            count, fixed, prod = shape.counts[s], shape.fixed[s], shape.products[s]

            def linear(table: dict[str, int], count=count, fixed=fixed):
                blocks = sum(table[k] * count[k] for k in BLOCKS)
                return blocks + sum(table[k] * n for k, n in fixed.items())

            forward = t.pp_forward + linear(t.forward)
            backward = t.pp_backward + linear(t.backward)
            backward += sum(t.recompute[k][r] * prod[k, r] for k in BLOCKS for r in MODES)
            total = forward + backward
            totals.append(total)
            m.add(self.tmax >= total)

            reduce, gather = linear(t.reduce), linear(t.gather)
            floor = linear(t.exposed_floor)
            m.add(self.dp >= floor)
            if c.zero == 3:
                m.add(self.dp >= reduce + gather - mb * total)
            else:
                m.add(self.dp >= reduce - backward + gather - forward)
                m.add(self.dp >= reduce - backward)
                m.add(self.dp >= gather - forward)
            m.add(self.optimizer >= linear(t.optimizer))
            self._memory(t, shape, s, linear)
        m.add(vpp * self.pipeline >= (mb * vpp - 1) * self.tmax + sum(totals))

    def _memory(self, t: ConfigTables, shape: Shape, s: int, linear) -> None:
        vpp, prod, has = t.config.vpp, shape.products[s], shape.has[s]
        fixed = shape.fixed[s]
        held = linear(t.static) + t.base_buffers + t.moe_buffers * has["moe"]
        saved = sum(t.saved[k][r] * prod[k, r] for k in BLOCKS for r in MODES)
        saved += sum(t.saved[k]["none"] * n for k, n in fixed.items())
        base = vpp * held + t.inflight[s] * saved
        working = [0] + [vpp * t.working[k] * shape.full_has[s][k] for k in BLOCKS]
        present_fixed = [t.gathered[k] for k, n in fixed.items() if n]
        gathered = [vpp * max(present_fixed, default=0)]
        gathered += [vpp * t.gathered[k] * has[k] for k in BLOCKS if t.gathered[k]]
        for w in working:
            for g in gathered:
                self.model.add(base + w + g <= vpp * t.budget)

    def hint(self, partition: tuple[int, ...], recompute: tuple[str, ...]) -> None:
        """Start CP-SAT's search from this partition and per-stage recompute."""
        for n, size in zip(self.shape.sizes, partition, strict=True):
            self.model.add_hint(n, size)
        for mode, chosen in zip(self.shape.modes, recompute, strict=True):
            for r, flag in mode.items():
                self.model.add_hint(flag, r == chosen)

    # -- reading a solution -------------------------------------------------------------------
    def chosen(self, solver: cp_model.CpSolver) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """(partition, per-stage recompute) of the solution."""
        partition = tuple(solver.value(n) for n in self.shape.sizes)
        recompute = tuple(
            next(r for r in MODES if solver.boolean_value(mode[r])) for mode in self.shape.modes
        )
        return partition, recompute
