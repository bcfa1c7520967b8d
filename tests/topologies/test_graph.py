"""Cluster.graph(): structure, and agreement with span() on small clusters of every kind."""

from __future__ import annotations

import time

import pytest

from tera.topologies import from_dict, load

from .flowcheck import check_level, child_units


def make(
    network: dict,
    gpus: int,
    gpn: int = 8,
    nics: int = 8,
    gbps: float = 400,
    gpu: str = "h100_sxm",
    scaleup: dict | None = None,
):
    node = {"gpu": gpu, "gpus": gpn, "nics": {"count": nics, "gbps": gbps}}
    if scaleup:
        node["scaleup"] = scaleup
    return from_dict({"name": "t", "gpus": gpus, "node": node, "network": network})


SMALL = {
    "fat_tree_2": make(
        {"kind": "fat_tree", "levels": 2, "radix": 16, "oversubscription": 3}, 64, gpn=4, nics=4
    ),
    "fat_tree_3": make(
        {"kind": "fat_tree", "levels": 3, "radix": 8, "oversubscription": [2, 1.5]},
        64,
        gpn=2,
        nics=2,
    ),
    "fat_tree_shared_nic": make(
        {"kind": "fat_tree", "levels": 2, "radix": 8, "oversubscription": 2},
        32,
        gpn=4,
        nics=2,
        gbps=200,
    ),
    "rail": make(
        {"kind": "rail_optimized", "levels": 2, "radix": 16, "su_nodes": 4, "oversubscription": 2},
        64,
        gpn=4,
        nics=4,
    ),
    "rail_planes": make(
        {"kind": "rail_optimized", "levels": 2, "radix": 16, "su_nodes": 4, "planes": True},
        64,
        gpn=4,
        nics=4,
    ),
    "rail_3": make(
        {
            "kind": "rail_optimized",
            "levels": 3,
            "radix": 8,
            "su_nodes": 2,
            "oversubscription": [1, 2],
        },
        64,
        gpn=2,
        nics=2,
    ),
    "nvl72": make(
        {"kind": "nvl72", "radix": 64, "su_racks": 2, "oversubscription": 2},
        72 * 4,
        gpn=4,
        nics=4,
        gpu="gb200",
        scaleup={"domain": 72},
    ),
    "dragonfly": make(
        {
            "kind": "dragonfly",
            "routers_per_group": 4,
            "nodes_per_router": 2,
            "global_links_per_router": 1,
            "link_gbps": 200,
        },
        5 * 4 * 2 * 2,
        gpn=2,
        nics=2,
    ),
    "mesh": make({"kind": "fat_tree", "radix": 64}, 16, gpu="mi300x"),
}


@pytest.mark.parametrize("name", list(SMALL))
def test_graph_agrees_with_span(name):
    c = SMALL[name]
    # level 0: two GPUs of one domain, and a whole domain
    check_level(c, 0, [0], [1])
    dom = child_units(c, 0)[0]
    check_level(c, 0, dom[:1], dom[1:])
    for level in range(1, len(c.tiers) + 1):
        units = child_units(c, level - 1)
        parents = child_units(c, level)
        if len(parents[0]) == len(units[0]):
            continue
        per_parent = len(parents[0]) // len(units[0])
        if per_parent < 2 or len(units) < 2:
            continue
        a, b = units[0], units[min(per_parent, len(units)) - 1]
        # dragonfly global latency is the longest minimal route (network.py), not the shortest
        check_level(c, level, a, b, latency=not (name == "dragonfly" and level == 3))


def test_graph_nodes_and_edges():
    c = load("dgx-h100", gpus=64)
    g = c.graph()
    kinds = {}
    for _, d in g.nodes(data=True):
        kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
    assert kinds["gpu"] == 64 and kinds["nvswitch"] == 8 and kinds["nic"] == 64
    assert kinds["leaf"] == 2 and kinds["spine"] == 32 and "core" not in kinds  # one pod
    assert g.nodes["gpu:9"] == {"kind": "gpu", "rank": 9, "node": 1, "local": 1}
    for _, _, d in g.edges(data=True):
        assert d["bandwidth"] > 0 and d["latency"] >= 0
    assert c.graph() is g  # cached


def test_nvl72_graph_has_one_nvswitch_per_rack():
    c = load("gb200-nvl72", gpus=144)
    g = c.graph()
    assert sum(d["kind"] == "nvswitch" for _, d in g.nodes(data=True)) == 2
    assert g.has_edge("gpu:71", "nvswitch:0") and g.has_edge("gpu:72", "nvswitch:1")


def test_graph_of_16k_gpus_builds_in_seconds():
    c = load("dgx-h100", gpus=16384)
    t = time.perf_counter()
    g = c.graph()
    assert time.perf_counter() - t < 5
    assert sum(1 for _, d in g.nodes(data=True) if d["kind"] == "gpu") == 16384
