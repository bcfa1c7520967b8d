"""The layout search: CP-SAT against exhaustive enumeration, plans against evaluate."""

import dataclasses
import itertools
import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tera.models import load_spec
from tera.planner import evaluate
from tera.planner.layout import LayoutError
from tera.planner.solve import SearchError, search
from tera.planner.solve.enumerate import candidates, compositions, enumerate_space
from tera.planner.solve.objective import Objective
from tera.planner.solve.search import NoLayout, Searcher, Stop
from tera.planner.solve.space import Space, parse_pins
from tera.planner.solve.tables import MODES, stages_of
from tera.topologies import from_dict, load

TINY = load_spec("tiny-moe")


def small_cluster(gpus: int, hbm_gb: float):
    """dgx-h100 shrunk to `gpus` GPUs with `hbm_gb` of memory each, so memory binds."""
    data = load("dgx-h100", gpus=8).to_dict()
    data["gpus"] = gpus
    data["node"]["gpu"]["hbm_gb"] = hbm_gb
    return from_dict(data)


def variant(layers: int, dense: int, experts: int, tied: bool):
    moe = dataclasses.replace(TINY.moe, experts=experts, first_dense_layers=dense)
    return dataclasses.replace(TINY, layers=layers, moe=moe, tie_embeddings=tied)


def searcher(spec, cluster, batch, seq, pins=None, objective="step_time", fewer=False):
    """A Searcher on `cluster`, and with `fewer` also on half and a quarter of its GPUs
    (the objectives that may use fewer GPUs)."""
    counts = {cluster.num_gpus}
    if fewer:
        counts |= {n for n in (cluster.num_gpus // 2, cluster.num_gpus // 4) if n >= 1}
    hbm_gb = cluster.gpu.hbm_bytes / 1e9
    clusters = {n: cluster if n == cluster.num_gpus else small_cluster(n, hbm_gb) for n in counts}
    return Searcher(spec, clusters, batch, seq, "bf16", pins or {}, objective, 0.0, 1.0, None)


def test_compositions_are_every_ordered_split():
    assert sorted(compositions(4, 2)) == [(1, 3), (2, 2), (3, 1)]
    assert all(sum(c) == 7 and len(c) == 3 for c in compositions(7, 3))
    assert len(list(compositions(9, 4))) == math.comb(8, 3)


def test_every_configuration_of_the_space_resolves():
    space = Space(TINY, (16,), 64, 256, 8, {})
    configs = list(space.configs())
    assert len(configs) > 100
    for config in configs:
        space.resolve(config)  # raises if the space holds an impossible layout
    assert {c.zero for c in configs} == {0, 2, 3}  # zero=1 is dominated by zero=2
    assert any(c.vpp > 1 for c in configs) and all(c.dp_replicate == 1 for c in configs)
    hsdp = Space(TINY, (16,), 64, 256, 8, parse_pins("zero=3,dp_replicate=2"))
    assert {(c.zero, c.dp_replicate) for c in hsdp.configs()} == {(3, 2)}
    # the second rank order only where it changes the groups
    assert {c.order for c in configs} == {"tp-cp-dp-pp", "tp-cp-pp-dp"}
    assert all(c.pp > 1 and c.dp > 1 for c in configs if c.order == "tp-cp-pp-dp")


def test_pins_restrict_the_space_and_unknown_pins_are_refused():
    space = Space(TINY, (16,), 64, 256, 8, parse_pins("tp=2,ep=4"))
    assert {(c.tp, c.ep) for c in space.configs()} == {(2, 4)}
    with pytest.raises(LayoutError, match="cannot be pinned"):
        parse_pins("recompute=1")
    with pytest.raises(LayoutError, match="positive integer"):
        parse_pins("tp=two")
    assert parse_pins("order=tp-cp-pp-dp") == {"order": "tp-cp-pp-dp"}
    with pytest.raises(LayoutError, match="rank order"):
        parse_pins("order=dp-tp")


def test_integer_tables_agree_with_the_cost_model():
    """tables.step_ns is the float cost model rounded: same feasibility, same time."""
    spec, cluster = variant(5, 1, 8, True), small_cluster(8, 0.03)
    s = searcher(spec, cluster, 32, 128)
    rng = random.Random(0)
    configs = list(s.space.configs())
    checked = 0
    for config in rng.sample(configs, 60):
        partition = rng.choice(list(compositions(5, config.pp * config.vpp)))
        recompute = tuple(rng.choice(MODES) for _ in range(config.pp))
        step = s.tables(config).step_ns(stages_of(s.segs, config, partition, recompute))
        layout = s.space.resolve(config, partition, ":".join(recompute))
        estimate = s.cost_model(config, layout).estimate(spec.name)
        if step is None:
            continue  # rounding memory up may refuse a layout that fits to the byte
        checked += 1
        assert estimate.fits
        terms = 20 * (spec.layers + 4) * (estimate.microbatches + 2)  # ns of rounding
        assert abs(step * 1e-9 - estimate.step_time_s) <= terms * 1e-9
    assert checked > 20


problems = st.fixed_dictionaries(
    {
        "layers": st.integers(2, 4),
        "dense": st.integers(0, 1),
        "experts": st.sampled_from([4, 8]),
        "tied": st.booleans(),
        "gpus": st.sampled_from([2, 4, 8]),
        "hbm_gb": st.sampled_from([0.008, 0.015, 0.03, 1.0]),
        "batch": st.sampled_from([8, 16]),
        "seq": st.sampled_from([64, 128]),
        "pins": st.sampled_from(["", "cp=1", "cp=1,mbs=1", "tp=1", "zero=3"]),
        "objective": st.sampled_from(
            ["step_time", "step_time", "cost", ("gpus", 10**5), ("gpus", 10**6), ("gpus", 10**9)]
        ),
    }
)


@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems)
def test_cp_sat_optimum_equals_exhaustive_enumeration(p):
    spec = variant(p["layers"], p["dense"], p["experts"], p["tied"])
    cluster = small_cluster(p["gpus"], p["hbm_gb"])
    objective = p["objective"]
    if isinstance(objective, tuple):  # the fewest GPUs whose step is within the limit
        objective = Objective(*objective)
    pins = parse_pins(p["pins"])
    fewer = p["objective"] != "step_time"
    s = searcher(spec, cluster, p["batch"], p["seq"], pins, objective, fewer)
    brute = enumerate_space(s)
    if s.objective.kind != "gpus":  # the witness search agrees on whether anything fits
        witness, decided = s.first_fit(Stop(math.inf), workers=1)
        assert decided and (witness is None) == (brute.objective_ns is None)
        assert witness is None or witness.estimate.fits
    try:
        result = s.run(top=1, time_limit=None, workers=1, progress=None)
    except NoLayout:
        assert brute.objective_ns is None  # nothing fits, by enumeration too
        return
    best = result.best
    assert result.certificate.status == "OPTIMAL" and result.certificate.gap == 0
    assert best.objective_ns == brute.objective_ns
    # the plan satisfies every constraint when re-evaluated on its own
    again = evaluate(spec, s.clusters[best.config.gpus], best.layout, p["batch"], p["seq"])
    assert again.fits
    stages = stages_of(s.segs, best.config, best.layout.partition, best.layout.stage_recompute)
    step = s.tables(best.config).step_ns(stages)
    assert s.objective.value(best.config, step) == best.objective_ns
    assert again.step_time_s == pytest.approx(best.estimate.step_time_s)


def test_top_k_plans_are_distinct_ranked_and_fit():
    cluster = small_cluster(8, 0.03)
    result = search(TINY, cluster, 32, 128, top=4, workers=1)
    plans = result.plans
    assert [p.rank for p in plans] == [1, 2, 3, 4]
    assert len({p.config for p in plans}) == 4
    values = [p.objective_ns for p in plans]
    assert values == sorted(values)
    assert all(p.estimate.fits for p in plans)
    assert result.certificate.objective == pytest.approx(values[0] * 1e-9)
    data = result.to_dict()
    assert {"status", "objective", "bound", "gap", "seconds", "plans"} <= set(data)
    assert data["plans"][1]["rank"] == 2 and "breakdown_s" in data["plans"][1]


def test_runner_up_loses_to_the_best_on_a_full_space():
    """Brute force over the same space confirms the second plan is the second best
    configuration (no configuration other than the best beats it)."""
    spec, cluster = variant(3, 1, 4, False), small_cluster(4, 0.015)
    s = searcher(spec, cluster, 8, 64, parse_pins("cp=1"))
    result = s.run(top=2, time_limit=None, workers=1, progress=None)
    first, second = result.plans
    best_per_config = {}
    for config in s.space.configs():
        t = s.tables(config)
        for partition in compositions(3, config.pp * config.vpp):
            for recompute in itertools.product(MODES, repeat=config.pp):
                step = t.step_ns(stages_of(s.segs, config, partition, recompute))
                if step is not None:
                    best_per_config[config] = min(step, best_per_config.get(config, step))
    ranked = sorted(best_per_config.values())
    assert (first.objective_ns, second.objective_ns) == tuple(ranked[:2])


def test_memory_pressure_changes_the_plan_and_costs_time():
    roomy = search(TINY, small_cluster(8, 1.0), 32, 128, workers=1).best
    hbm_gb = 0.8 * roomy.estimate.peak_memory_gib * 2**30 / 1e9  # the roomy plan no longer fits
    tight = search(TINY, small_cluster(8, hbm_gb), 32, 128, workers=1).best
    assert tight.estimate.fits and tight.estimate.peak_memory_gib * 2**30 <= hbm_gb * 1e9
    assert tight.layout != roomy.layout
    assert tight.estimate.step_time_s >= roomy.estimate.step_time_s


def test_pins_are_obeyed():
    result = search(TINY, small_cluster(8, 1.0), 32, 128, fix="tp=2,pp=2", workers=1)
    assert (result.best.layout.tp, result.best.layout.pp) == (2, 2)


def test_cost_objective_may_use_fewer_gpus_and_reports_dollars():
    result = search(TINY, small_cluster(16, 1.0), 16, 128, objective="cost", workers=1)
    best = result.best
    assert best.config.gpus <= 16
    tokens = 16 * 128
    dollars = best.estimate.step_time_s * best.config.gpus * 2.5 / 3600 / tokens * 1e6
    assert result.certificate.objective == pytest.approx(dollars, rel=1e-6)
    assert result.certificate.objective_kind == "cost"


def test_a_time_limit_still_returns_a_certificate():
    result = search(TINY, small_cluster(8, 0.03), 32, 128, time_limit=30, workers=1)
    c = result.certificate
    assert c.status in ("OPTIMAL", "FEASIBLE") and c.gap >= 0 and c.bound <= c.objective
    assert 0 < c.seconds < 30


def test_bad_arguments_are_refused():
    with pytest.raises(LayoutError, match="objective"):
        search(TINY, small_cluster(8, 1.0), 32, 128, objective="speed")
    with pytest.raises(LayoutError, match="time_limit"):
        search(TINY, small_cluster(8, 1.0), 32, 128, time_limit=0)
    with pytest.raises(LayoutError, match="reserve_gib"):
        search(TINY, small_cluster(8, 1.0), 32, 128, reserve_gib=-1)
    with pytest.raises(LayoutError, match="price_per_gpu_hour"):
        search(TINY, small_cluster(8, 1.0), 32, 128, objective="cost", price_per_gpu_hour=0)


def test_candidate_count_matches_enumeration():
    spec, cluster = variant(3, 1, 4, False), small_cluster(4, 1.0)
    s = searcher(spec, cluster, 8, 64, parse_pins("cp=1,mbs=1"))
    total = sum(candidates(c, spec.layers) for c in s.space.configs())
    assert enumerate_space(s).candidates == total


@pytest.mark.parametrize("hbm_gb", [0.008, 0.012, 1.0])
def test_bounds_never_exceed_the_best_candidate_of_a_configuration(hbm_gb):
    """Both bounds are below the enumerated optimum of every configuration, and the
    memory bound refuses only configurations where nothing fits."""
    spec, cluster = variant(4, 1, 8, True), small_cluster(8, hbm_gb)
    s = searcher(spec, cluster, 16, 128)
    tight = 0
    for config in s.space.configs():
        t = s.tables(config)
        best = None
        for partition in compositions(4, config.pp * config.vpp):
            for recompute in itertools.product(MODES, repeat=config.pp):
                step = t.step_ns(stages_of(s.segs, config, partition, recompute))
                if step is not None and (best is None or step < best):
                    best = step
        quick, memory = s.bounds.quick(config), s.bounds.memory(config)
        if best is None:
            continue
        assert quick is not None and memory is not None, config
        assert quick <= memory <= best, config
        tight += memory > quick
    if hbm_gb < 0.01:
        assert tight > 0  # memory pressure makes the memory bound bite


def test_the_memory_reserve_is_kept_free():
    cluster = small_cluster(8, 1.0)
    roomy = search(TINY, cluster, 32, 128, workers=1).best.estimate
    hbm = cluster.gpu.hbm_bytes
    reserve_gib = (hbm - 0.8 * roomy.peak_memory_gib * 2**30) / 2**30
    kept = search(TINY, cluster, 32, 128, reserve_gib=reserve_gib, workers=1).best.estimate
    assert (kept.peak_memory_gib + reserve_gib) * 2**30 <= hbm
    assert kept.peak_memory_gib < roomy.peak_memory_gib


def test_fewest_gpus_that_meet_a_deadline():
    """The deadline objective picks the smallest GPU count whose fastest plan trains the
    tokens in time, and the fastest plan on that count."""
    batch, seq = 256, 128  # large enough that 16 GPUs step faster than 8
    fastest = {
        n: search(TINY, small_cluster(n, 1.0), batch, seq, workers=1).best.estimate.step_time_s
        for n in (8, 16)
    }
    assert fastest[16] < fastest[8]
    steps = 1000
    tokens = steps * batch * seq

    def days(step_s: float) -> float:
        return step_s * steps / 86400

    loose = search(
        TINY, small_cluster(16, 1.0), batch, seq, objective="gpus", tokens=tokens,
        deadline_days=days(fastest[8]) * 1.01, workers=1,
    )  # fmt: skip
    assert loose.best.config.gpus == 8
    assert loose.best.estimate.step_time_s == pytest.approx(fastest[8])
    assert loose.certificate.objective == 8 and loose.certificate.status == "OPTIMAL"
    between = days((fastest[8] + fastest[16]) / 2)
    tight = search(
        TINY, small_cluster(16, 1.0), batch, seq, objective="gpus", tokens=tokens,
        deadline_days=between, workers=1,
    )  # fmt: skip
    assert tight.best.config.gpus == 16
    assert tight.best.estimate.step_time_s * steps <= between * 86400
    with pytest.raises(SearchError, match="deadline"):
        search(
            TINY, small_cluster(16, 1.0), batch, seq, objective="gpus", tokens=tokens,
            deadline_days=days(fastest[16]) * 0.99, workers=1,
        )  # fmt: skip
    with pytest.raises(LayoutError, match="deadline_days"):
        search(TINY, small_cluster(16, 1.0), batch, seq, objective="gpus", tokens=tokens)
