"""Property tests on random fat-trees and random groups of ranks (hypothesis)."""

from __future__ import annotations

import copy
from itertools import pairwise

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tera.topologies import collectives, from_dict

from .flowcheck import check_level, child_units

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast")
SETTINGS = settings(
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def fat_trees(draw, max_nodes: int = 64):
    """A cluster description: random levels, radix, oversubscription, node shape and size."""
    levels = draw(st.sampled_from([2, 3]))
    gpn = draw(st.sampled_from([1, 2, 4, 8]))
    nics = draw(st.sampled_from([n for n in (1, 2, 4, 8) if gpn % n == 0 or n % gpn == 0]))
    radix = draw(st.sampled_from([r for r in (4, 8, 16, 32) if r // 2 >= nics]))
    over = [draw(st.sampled_from([1, 1.5, 2, 3, 4, 7])) for _ in range(levels - 1)]
    per_leaf = (radix // 2) // nics
    capacity = per_leaf * radix if levels == 2 else per_leaf * (radix // 2) * radix
    nodes = draw(st.integers(1, min(capacity, max_nodes)))
    gpu = draw(st.sampled_from(["h100_sxm", "a100_80gb", "b200", "mi300x"]))
    if gpu == "mi300x":
        gpn = min(gpn, 8)
    return {
        "name": "prop",
        "gpus": nodes * gpn,
        "node": {
            "gpu": gpu,
            "gpus": gpn,
            "nics": {"count": nics, "gbps": draw(st.sampled_from([100, 200, 400]))},
        },
        "network": {"kind": "fat_tree", "levels": levels, "radix": radix, "oversubscription": over},
    }


@st.composite
def cluster_and_group(draw, max_nodes: int = 64):
    data = draw(fat_trees(max_nodes))
    n = data["gpus"]
    group = draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=min(n, 48)))
    return data, sorted(group)


def lower_bound(kind: str, c, ranks: list[int], S: float) -> float:
    """Bytes that must leave (or enter) the most constrained GPU or unit, over the line rate
    it has: per GPU over all its links; per child unit over its ranks' share of the level."""
    levels = c.span(ranks)
    n = len(ranks)
    if n == 1:
        return 0.0
    egress = (levels[0].bw_per_gpu if levels[0].ranks_per_unit > 1 else 0.0) + (
        c.scaleout_bw_per_gpu if len(levels) > 1 else 0.0
    )
    per_gpu = S if kind in ("all_reduce", "broadcast") else (n - 1) / n * S
    bound = per_gpu / egress
    for child, level in pairwise(levels):
        if kind == "all_reduce":  # every element crosses the cut at least once each way
            cut, r = S, child.min_ranks_per_unit
        elif kind == "broadcast":  # some unit without the root receives S
            cut, r = S, child.ranks_per_unit
        else:
            r = child.min_ranks_per_unit
            cut = (n - r) / n * S
        bound = max(bound, cut / (r * level.bw_per_gpu))
    return bound


@SETTINGS
@given(cluster_and_group(), st.sampled_from(KINDS), st.integers(1, 2**34))
def test_never_cheaper_than_bandwidth_bound(cg, kind, nbytes):
    data, ranks = cg
    c = from_dict(data)
    t = collectives.best(kind, c, ranks, nbytes).seconds
    assert t >= lower_bound(kind, c, ranks, nbytes) * (1 - 1e-12)
    if len(ranks) == 1:
        assert t == 0.0


@SETTINGS
@given(
    cluster_and_group(),
    st.sampled_from(KINDS),
    st.integers(1, 2**34),
    st.lists(st.sampled_from([1, 1.5, 2, 4]), min_size=2, max_size=2),
)
def test_more_oversubscription_is_never_faster(cg, kind, nbytes, factors):
    data, ranks = cg
    worse = copy.deepcopy(data)
    over = worse["network"]["oversubscription"]
    worse["network"]["oversubscription"] = [
        o * f for o, f in zip(over, factors[: len(over)], strict=True)
    ]
    fast, slow = from_dict(data), from_dict(worse)
    t_fast = collectives.best(kind, fast, ranks, nbytes).seconds
    t_slow = collectives.best(kind, slow, ranks, nbytes).seconds
    assert t_slow >= t_fast * (1 - 1e-12)
    for a, b in zip(fast.span(ranks), slow.span(ranks), strict=True):
        assert b.bw_per_gpu <= a.bw_per_gpu


@SETTINGS
@given(cluster_and_group(max_nodes=256))
def test_span_levels_are_monotone(cg):
    data, ranks = cg
    c = from_dict(data)
    levels = c.span(ranks)
    assert levels[0].scaleup and not any(lv.scaleup for lv in levels[1:])
    assert levels[-1].units == 1 and all(lv.units > 1 for lv in levels[:-1])
    assert levels[-1].ranks_per_unit == len(ranks)
    for lo, hi in pairwise(levels):
        assert hi.units <= lo.units and hi.ranks_per_unit >= lo.ranks_per_unit
        assert hi.min_ranks_per_unit >= lo.min_ranks_per_unit
    for lv in levels:
        assert lv.min_ranks_per_unit * lv.units <= len(ranks) <= lv.ranks_per_unit * lv.units
    net = levels[1:]
    for lo, hi in pairwise(net):
        assert hi.bw_per_gpu <= lo.bw_per_gpu and hi.latency >= lo.latency


@settings(deadline=None, max_examples=30, suppress_health_check=[HealthCheck.too_slow])
@given(cluster_and_group(max_nodes=16))
def test_graph_bottleneck_agrees_with_span(cg):
    data, ranks = cg
    c = from_dict(data)
    levels = c.span(ranks)
    top = len(levels) - 1
    if top == 0:
        if len(ranks) > 1:
            check_level(c, 0, ranks[:1], ranks[1:2])
        return
    # two child units the group touches, whole, inside the same top-level unit
    units = child_units(c, top - 1)
    touched = sorted({next(i for i, u in enumerate(units) if r in u) for r in ranks})
    check_level(c, top, units[touched[0]], units[touched[-1]])
