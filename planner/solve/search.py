"""`search`: the best layouts of a model on a cluster, with a certificate of optimality.

The space (space.py) is large: a trillion-parameter model on 16,384 GPUs has some 10^5
configurations of degrees, each with C(layers-1, pp*vpp-1) partitions and 3^pp recompute
assignments. The search is a branch and bound over configurations with CP-SAT solving
each one's coupled partition, recompute and memory problem (model.py) exactly:

1. Every configuration gets a cheap lower bound on its step time (bounds.py: all work
   spread perfectly over the stages, the mean optimizer step); one whose static memory
   cannot fit on pp GPUs is dropped.
2. Configurations are taken from a priority queue in bound order. The first time one
   comes out, the floor of its exposed data-parallel time is added (dropping it if it
   then cannot beat the K-th best plan so far), then its memory-aware bound (the
   recompute and imbalance its memory forces), and it goes back in; the second time,
   CP-SAT solves its partition and recompute (model.py) with "objective < the K-th best"
   as a constraint, for at most SHORT_SOLVE units of work; solves cut short are retried
   at the end for LONG_SOLVE units if they can still win.
3. The search stops when the next bound is at least the K-th best objective: every
   configuration left is proven no better.

The certificate's bound is the smallest bound not beaten (of a configuration not reached
or a solve cut short), so `status = OPTIMAL` means proven optimal under the cost model
over the whole space. A time limit or Ctrl-C stops the search, the running solve
included, and returns the best plan found with its bound and gap (or SearchError when
none was found yet). The time limit counts from the call to `search`, tracing included.

Determinism: CP-SAT runs on one worker (by default) and each solve's budget is CP-SAT's
deterministic time, a count of work, not seconds; ties between configurations break by
their key. So the same inputs give the same plans, bytes included, whatever the load of
the machine, unless the time limit or Ctrl-C cuts the search short.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ortools.sat.python import cp_model

from tera.planner.cost.calibration import Calibration
from tera.planner.cost.estimate import CostModel, Estimate, graph_segments
from tera.planner.errors import InfeasibleError
from tera.planner.layout import Layout, LayoutError, even_partition
from tera.planner.solve.bounds import Bounds
from tera.planner.solve.model import Formulation
from tera.planner.solve.objective import OBJECTIVES, Objective, gpu_counts, step_limit_ns
from tera.planner.solve.space import Config, Space
from tera.planner.solve.tables import MODES, ConfigTables, exposed_floors, stages_of

# A configuration's CP-SAT solve gets SHORT_SOLVE in bound order, so that one hard
# configuration cannot stall the search, and those cut short that can still win get
# LONG_SOLVE at the end; what is still open then counts in the certificate. Both are
# CP-SAT deterministic time (max_deterministic_time: work units that track seconds on a
# typical core), so where a solve stops does not depend on the machine's load.
SHORT_SOLVE = 2.0
LONG_SOLVE = 20.0
DEFAULT_PRICE_PER_GPU_HOUR = (
    2.5  # hardware-facts power_cost.price_usd_per_gpu_hour.planner_default_h100.central
)


# progress(message, fraction): what the search is doing and how far (0..1, None when it
# cannot tell); the CLI draws it as a bar. A plan entering the top K starts with PLAN_FOUND.
Progress = Callable[[str, float | None], None]
PLAN_FOUND = "plan:"


def _silent(message: str, fraction: float | None = None) -> None:
    pass


class SearchError(InfeasibleError):
    """No layout fits; the message says the smallest change that would make one."""


@dataclass(frozen=True)
class Certificate:
    status: str  # OPTIMAL | FEASIBLE
    objective: float  # seconds per step, or dollars per million tokens for cost
    objective_kind: str
    bound: float
    gap: float  # (objective - bound) / objective
    seconds: float

    def to_dict(self) -> dict:
        return {
            "status": self.status,
            "objective": self.objective,
            "objective_kind": self.objective_kind,
            "bound": self.bound,
            "gap": self.gap,
            "seconds": self.seconds,
        }


@dataclass
class RankedPlan:
    rank: int
    config: Config
    layout: Layout  # resolved, with partition and per-stage recompute
    objective_ns: int  # tables.step_ns (times the GPUs for cost)
    estimate: Estimate

    def to_dict(self) -> dict:
        return {"rank": self.rank, **self.estimate.to_dict()}


@dataclass
class SearchResult:
    plans: list[RankedPlan]
    certificate: Certificate
    space_size: int  # configurations in the space
    solved: int  # configurations CP-SAT solved (the rest were bounded out)
    spec: object = None
    clusters: dict = field(default_factory=dict)  # gpus -> Cluster

    @property
    def best(self) -> RankedPlan:
        return self.plans[0]

    def alternatives(self) -> list[dict]:
        """The ranked plans in the plan file's form (plan.ALTERNATIVE_KEYS), best first."""
        return [
            {
                "rank": p.rank,
                "gpus": p.config.gpus,
                "layout_string": str(p.layout),
                "step_time_s": p.estimate.step_time_s,
                "tokens_per_s_per_gpu": p.estimate.tokens_per_s_per_gpu,
                "mfu": p.estimate.mfu,
                "peak_memory_gib": p.estimate.peak_memory_gib,
                "fits": p.estimate.fits,
            }
            for p in self.plans
        ]

    def to_plan(self, rank: int = 1):
        """The plan file of the `rank`-th plan (1: the best), with the certificate (less
        the solver's wall time, which a plan does not hold) and the alternatives."""
        from tera.planner.plan import CERTIFICATE_KEYS, Plan

        chosen = self.plans[rank - 1]
        certificate = self.certificate.to_dict()
        e = chosen.estimate
        return Plan.build(
            self.spec,
            self.clusters[chosen.config.gpus],
            chosen.layout,
            e.global_batch,
            e.seq_len,
            e.precision,
            e.to_dict(),
            {key: certificate[key] for key in CERTIFICATE_KEYS},
            self.alternatives(),
        )

    def to_dict(self) -> dict:
        return {
            **self.certificate.to_dict(),
            "space_configurations": self.space_size,
            "solved_configurations": self.solved,
            "plans": [p.to_dict() for p in self.plans],
        }


class Stop:
    """Stops the search: Ctrl-C (SIGINT, while the search holds the handler) or the
    deadline. A running CP-SAT solve is stopped too: `solve` runs it in a thread and
    polls, so an interrupt takes effect within POLL_SECONDS, not when the solve ends."""

    POLL_SECONDS = 0.05

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.requested = False

    def __call__(self, signum, frame) -> None:
        self.requested = True

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def expired(self) -> bool:
        return self.requested or self.left() <= 0

    def solve(self, model: cp_model.CpModel, limit: float, workers: int, first: bool = False):
        """(status, solver) of `model` given at most `limit` units of deterministic time
        and what is left of the deadline in seconds; `first`: stop at the first solution
        (a feasibility question)."""
        solver = cp_model.CpSolver()
        solver.parameters.num_workers = workers
        # CP-SAT's own SIGINT handler would outlive the solve; ours stops the search.
        solver.parameters.catch_sigint_signal = False
        solver.parameters.max_deterministic_time = limit
        solver.parameters.max_time_in_seconds = max(0.01, self.left())
        solver.parameters.stop_after_first_solution = first
        outcome = {}
        thread = threading.Thread(target=lambda: outcome.update(status=solver.solve(model)))
        thread.start()
        while thread.is_alive():
            thread.join(self.POLL_SECONDS)  # the main thread runs the SIGINT handler here
            if self.requested:
                solver.stop_search()
        return outcome["status"], solver


class Searcher:
    """One search problem: model, clusters per GPU count, batch and cost settings."""

    def __init__(
        self,
        spec,
        clusters: dict,
        global_batch: int,
        seq_len: int,
        precision: str,
        pins: dict,
        objective: Objective | str,
        reserve_bytes: float,
        imbalance: float,
        calibration: Calibration | None,
        price_per_gpu_hour: float = DEFAULT_PRICE_PER_GPU_HOUR,
        graph=None,
    ):
        """`graph`: the model traced at `seq_len`, when the caller has it already."""
        from tera.planner.trace import trace

        self.price = price_per_gpu_hour
        self.spec, self.clusters = spec, clusters
        self.global_batch, self.seq_len, self.precision = global_batch, seq_len, precision
        if isinstance(objective, str):
            objective = Objective(objective)
        self.objective, self.reserve = objective, reserve_bytes
        self.imbalance = imbalance
        self.cal = calibration or Calibration.load()
        self.graph = graph if graph is not None else trace(spec, seq_len)
        self.segs = graph_segments(self.graph)
        any_cluster = next(iter(clusters.values()))
        self.space = Space(
            spec, tuple(sorted(clusters)), global_batch, seq_len, any_cluster.scaleup_domain, pins
        )
        self._tables: dict[Config, ConfigTables] = {}
        self._floors: dict[Config, dict[str, int]] = {}
        self.bounds = Bounds(self)

    @property
    def pins(self) -> dict:
        """The keys the user pinned (held by the space, which obeys them)."""
        return self.space.pins

    # -- cost model access -----------------------------------------------------------------
    def cost_model(self, config: Config, layout: Layout | None = None) -> CostModel:
        layout = layout or self.space.resolve(config)
        return CostModel(
            self.graph,
            self.clusters[config.gpus],
            layout,
            self.global_batch,
            self.precision,
            self.imbalance,
            self.cal,
        )

    def tables(self, config: Config) -> ConfigTables:
        if config not in self._tables:
            self._tables[config] = ConfigTables.build(config, self.cost_model(config), self.reserve)
        return self._tables[config]

    # -- branch and bound ---------------------------------------------------------------
    def run(
        self,
        top: int,
        time_limit: float | None,
        workers: int,
        progress: Progress | None,
        start: float | None = None,
    ) -> SearchResult:
        """The `top` best plans, or SearchError. `start` (time.monotonic()) is when the
        caller began, so that `time_limit` covers the tracing too."""
        start = time.monotonic() if start is None else start
        stop = Stop(start + (time_limit if time_limit else math.inf))
        report = progress or _silent
        previous = signal.signal(signal.SIGINT, stop)
        try:
            configs = list(self.space.configs())
            queue = []
            fitting = 0
            for i, config in enumerate(configs):
                if i % 256 == 0:
                    if stop.expired():
                        raise _stopped(time_limit)
                    report(f"bounding {len(configs):,} configurations", i / len(configs))
                bound = self.bounds.quick(config)
                if bound is None:
                    continue
                fitting += 1
                value = self.objective.value(config, bound)
                if value is not None:
                    queue.append((value, False, config))
            if not queue:
                raise NoLayout(bool(configs), bool(fitting))
            heapq.heapify(queue)
            report(f"{len(configs):,} configurations, {len(queue):,} may fit", None)
            found, solved, open_bound = self._branch_and_bound(queue, top, stop, workers, report)
        finally:
            signal.signal(signal.SIGINT, previous)
        if not found:
            if stop.expired():
                raise _stopped(time_limit)
            raise NoLayout(True, bool(fitting))
        plans = [self._plan(i + 1, *f) for i, f in enumerate(found)]
        best = found[0][2]
        bound = min(open_bound, best)
        certificate = Certificate(
            status="OPTIMAL" if open_bound >= best else "FEASIBLE",
            objective=self._in_units(best),
            objective_kind=self.objective.kind,
            bound=self._in_units(bound),
            gap=(best - bound) / best if best else 0.0,
            seconds=time.monotonic() - start,
        )
        return SearchResult(plans, certificate, len(configs), solved, self.spec, self.clusters)

    def _branch_and_bound(self, queue, top, stop, workers, report):
        """Solve configurations in bound order until the smallest bound left cannot beat
        the top-th plan. A configuration first popped with its quick bound gets its
        memory bound and goes back in the queue if that is larger. Returns the plans
        [(config, (partition, recompute), objective)], the configurations CP-SAT solved,
        and a bound on everything not proven (inf if none)."""
        found: list = []
        unresolved: list = []  # (bound, config) of solves cut short
        open_bound = math.inf
        solved = 0
        popped = 0
        while queue:
            bound, tightened, config = queue[0]
            cutoff = found[-1][2] if len(found) == top else None
            if cutoff is not None and bound >= cutoff:
                break  # every configuration left has a bound at least the cutoff
            popped += 1
            if popped % 64 == 0:
                self._report_proof(report, bound, cutoff)
            if stop.expired():
                open_bound = min(open_bound, bound)
                break
            heapq.heappop(queue)
            if not tightened:
                floor = self._dp_floor(config)
                value = self.objective.value(config, self.bounds.quick(config) + floor)
                if value is None or cutoff is not None and value >= cutoff:
                    continue  # cutoffs only fall, so it can never return
                tighter = self.bounds.memory(config)
                if tighter is not None:
                    value = self.objective.value(config, tighter + floor)
                    if value is not None:
                        heapq.heappush(queue, (value, True, config))
                continue
            solved += 1
            result, proven_bound = self._solve_one(config, cutoff, stop, workers, SHORT_SOLVE)
            if proven_bound is not None:
                unresolved.append((proven_bound, config))
            self._keep(found, result, top, solved, report)
        # Solves cut short get a longer second try, best bound first, while they can win.
        for proven_bound, config in sorted(unresolved):
            cutoff = found[-1][2] if len(found) == top else None
            if cutoff is not None and proven_bound >= cutoff:
                continue
            if stop.expired():
                open_bound = min(open_bound, proven_bound)
                continue
            result, again = self._solve_one(config, cutoff, stop, workers, LONG_SOLVE)
            if again is not None:
                open_bound = min(open_bound, again)
            self._keep(found, result, top, solved, report)
        return found, solved, open_bound

    def _starting_point(self, config: Config) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """A hint for CP-SAT: the even partition, each stage in the lightest recompute
        mode that fits it (full where none does)."""
        t = self.tables(config)
        partition = even_partition(self.segs.layers, config.pp * config.vpp)
        stages = stages_of(self.segs, config, partition, ("none",) * config.pp)
        modes = tuple(
            next(
                (
                    r
                    for r in MODES
                    if t.stage_memory(st.counts, r, st.index) <= config.vpp * t.budget
                ),
                "full",
            )
            for st in stages
        )
        return partition, modes

    def _keep(self, found: list, result, top: int, solved: int, report) -> None:
        """Put a solved configuration's plan among the top plans if it belongs there."""
        if result is None:
            return
        config = result[0]
        if any(f[0] == config and f[2] <= result[2] for f in found):
            return  # a retried configuration that did no better
        found[:] = [f for f in found if f[0] != config]
        found.append(result)
        found.sort(key=lambda f: (f[2], f[0]))
        del found[top:]
        if result in found:
            value = self._in_units(result[2])
            report(f"{PLAN_FOUND} {config.key()}  {value:.4g} ({solved} solved)", None)

    def _report_proof(self, report: Progress, bound: int, cutoff: int | None) -> None:
        """How far the proof is: the smallest open bound over the value to beat."""
        if cutoff is None:
            report(f"solving: bound {self._in_units(bound):.4g}, no plan yet", None)
        else:
            best, low = self._in_units(cutoff), self._in_units(bound)
            report(f"proving: best {best:.4g}, bound {low:.4g}", min(1.0, bound / cutoff))

    def _dp_floor(self, config: Config) -> int:
        """A bound on the exposed data-parallel time (max_s D_s >= the mean of the
        stages' floors), from the configuration's data-parallel collectives."""
        # the floor depends neither on vpp nor, but through FSDP's per-micro-batch
        # collectives, on the micro-batch size
        key = dataclasses.replace(config, vpp=1, mbs=config.mbs if config.zero == 3 else 1)
        if key not in self._floors:
            self._floors[key] = exposed_floors(self.cost_model(config))
        floors = self._floors[key]
        floor = sum(n * floors[k] for k, n in self.segs.whole_model(config.pp).items())
        return floor // config.pp

    def _solve_one(
        self, config: Config, cutoff: int | None, stop: Stop, workers: int, limit: float
    ):
        """The best partition and recompute of one configuration, if it beats `cutoff`:
        ((config, (partition, recompute), objective) or None, a bound not proven beaten
        or None when the solve was conclusive)."""
        form = Formulation(self.segs, self.tables(config))
        form.hint(*self._starting_point(config))
        step_cutoff = self.objective.step_cutoff(config, cutoff)
        if step_cutoff is not None:
            form.model.add(form.objective < step_cutoff)
        status, solver = stop.solve(form.model, limit, workers)
        if status == cp_model.INFEASIBLE:
            return None, None
        if status == cp_model.UNKNOWN:
            bound = max(self.bounds.memory(config), math.floor(solver.best_objective_bound))
            return None, self.objective.value(config, bound)  # None: misses the deadline
        partition, recompute = form.chosen(solver)
        value = self.objective.value(config, round(solver.objective_value))
        unproven = None
        if status != cp_model.OPTIMAL:
            unproven = self.objective.value(config, math.floor(solver.best_objective_bound))
        return (config, (partition, recompute), value), unproven

    # -- results ---------------------------------------------------------------------------
    def _in_units(self, value: float) -> float:
        return self.objective.in_units(value, self.global_batch * self.seq_len, self.price)

    def _plan(self, rank: int, config: Config, choice, value: int) -> RankedPlan:
        partition, recompute = choice
        layout = self.space.resolve(config, partition, ":".join(recompute))
        estimate = self.cost_model(config, layout).estimate(self.spec.name, self.reserve)
        return RankedPlan(rank, config, layout, value, estimate)

    def first_fit(self, stop: Stop, workers: int) -> tuple[RankedPlan | None, bool]:
        """Any layout that fits, fewest GPUs first (then by quick bound): the witness an
        explanation of infeasibility needs. (plan or None, decided): decided is False when
        a solve or the deadline cut the question short, so None does not prove that no
        layout fits."""
        candidates = []
        for config in self.space.configs():
            bound = self.bounds.quick(config)
            if bound is not None:
                candidates.append((config.gpus, bound, config))
        candidates.sort()
        decided = True
        for _, _, config in candidates:
            if stop.expired():
                return None, False
            if self.bounds.memory(config) is None:
                continue  # proven: not even full recompute hosts its blocks
            form = Formulation(self.segs, self.tables(config))
            form.hint(*self._starting_point(config))
            status, solver = stop.solve(form.model, SHORT_SOLVE, workers, first=True)
            if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
                value = self.objective.value(config, round(solver.objective_value)) or 0
                return self._plan(1, config, form.chosen(solver), value), True
            decided = decided and status == cp_model.INFEASIBLE
        return None, decided

    def sibling(
        self,
        clusters: dict | None = None,
        seq_len: int | None = None,
        pins: dict | None = None,
        objective: Objective | None = None,
    ):
        """The same problem on other clusters, another sequence length, other pins or
        another objective (sharing the traced graph when the sequence is the same)."""
        seq = self.seq_len if seq_len is None else seq_len
        return Searcher(
            self.spec,
            self.clusters if clusters is None else clusters,
            self.global_batch,
            seq,
            self.precision,
            self.pins if pins is None else pins,
            self.objective if objective is None else objective,
            self.reserve,
            self.imbalance,
            self.cal,
            self.price,
            graph=self.graph if seq == self.seq_len else None,
        )


class NoLayout(Exception):  # noqa: N818 (a signal between modules, not an error type)
    """Searcher.run found no layout: `divides` whether any configuration divides the
    problem, `fits` whether any may fit in memory. search() turns it into SearchError."""

    def __init__(self, divides: bool, fits: bool):
        super().__init__()
        self.divides, self.fits = divides, fits


def _stopped(time_limit: float | None) -> SearchError:
    if time_limit:
        return SearchError(
            f"no layout found within the {time_limit:g} s time limit",
            "allow more time (--time-limit)",
        )
    return SearchError("interrupted before any layout was found", "let the search run longer")


def search(
    model,
    cluster,
    global_batch: int,
    seq_len: int,
    gpus: int | None = None,
    precision: str = "bf16",
    fix: str | dict | None = None,
    top: int = 1,
    time_limit: float | None = None,
    objective: str = "step_time",
    price_per_gpu_hour: float = DEFAULT_PRICE_PER_GPU_HOUR,
    reserve_gib: float = 0.0,
    imbalance: float = 1.0,
    calibration: Calibration | None = None,
    workers: int = 1,
    progress: Progress | None = None,
    tokens: float | None = None,
    deadline_days: float | None = None,
) -> SearchResult:
    """Find the `top` best layouts. `model` is a ModelSpec, preset or YAML path; `cluster`
    a Cluster, preset or YAML path (sized to `gpus`, the most GPUs the search may use).

    objective="step_time" minimises the step time on `gpus` GPUs. "cost" minimises
    dollars per token at `price_per_gpu_hour` and "gpus" the GPUs that train `tokens`
    tokens within `deadline_days` days (then the step time on that many); both may use
    fewer GPUs than `gpus` (objective.gpu_counts lists which)."""
    from tera.planner.inputs import load_problem
    from tera.planner.solve.space import parse_pins

    start = time.monotonic()
    spec, full = load_problem(model, cluster, gpus, precision, global_batch, seq_len, imbalance)
    if objective not in OBJECTIVES:
        raise LayoutError("objective", f"unknown {objective!r}", f"use {'|'.join(OBJECTIVES)}")
    if not isinstance(top, int) or top < 1:
        raise LayoutError("top", f"must be a positive integer, got {top!r}", "fix it")
    if time_limit is not None and time_limit <= 0:
        raise LayoutError("time_limit", f"must be positive, got {time_limit}", "fix it")
    if price_per_gpu_hour <= 0:
        raise LayoutError(
            "price_per_gpu_hour", f"must be positive, got {price_per_gpu_hour}", "fix it"
        )
    hbm_gib = full.gpu.hbm_bytes / 2**30
    if not 0 <= reserve_gib < hbm_gib:
        raise LayoutError(
            "reserve_gib",
            f"must be at least 0 and below the GPU's {hbm_gib:.1f} GiB, got {reserve_gib}",
            "keep back less",
        )
    goal = None if objective == "gpus" else Objective(objective)
    if objective == "gpus":
        for name, value in (("tokens", tokens), ("deadline_days", deadline_days)):
            if value is None or value <= 0:
                raise LayoutError(
                    name, f"must be positive for objective gpus, got {value}", "give it"
                )
        goal = Objective("gpus", step_limit_ns(tokens, deadline_days, global_batch * seq_len))
    pins = parse_pins(fix) if not isinstance(fix, dict) else dict(fix)
    counts = gpu_counts(full.num_gpus, full.scaleup_domain, full.gpus_per_node, objective)
    clusters = {n: full if n == full.num_gpus else full.resized(n) for n in counts}
    searcher = Searcher(
        spec,
        clusters,
        global_batch,
        seq_len,
        precision,
        pins,
        goal,
        reserve_gib * 2**30,
        imbalance,
        calibration,
        price_per_gpu_hour,
    )
    try:
        return searcher.run(top, time_limit, workers, progress, start)
    except NoLayout as reason:
        from tera.planner.solve.infeasible import explain

        (progress or _silent)("no layout fits: looking for the nearest change that fits", None)
        raise explain(searcher, reason, workers, tokens) from None
