"""Reference computations on Cluster.graph() that span() must agree with (tests only).

Level i >= 1 of span() describes traffic between child units (level i-1 units) inside one
unit of level i. Its bw_per_gpu must equal max-flow(child A -> child B) / min(|A|, |B|) on the
graph, with every GPU of both child units taking part; its latency the shortest-path latency
between a GPU of A and a GPU of B. Level 0 (scale-up) is checked on the subgraph without the
network (NCCL does not loop intra-node traffic through NICs), with only the group's GPUs.
"""

from __future__ import annotations

import networkx as nx

from tera.topologies import Cluster


def child_units(cluster: Cluster, level: int) -> list[list[int]]:
    """The GPU sets (ranks) of every unit of span level `level` (0: scale-up domains)."""
    size = cluster.scaleup_domain
    for tier in cluster.tiers[:level]:
        size = size * tier.fan_in if tier.fan_in is not None else cluster.num_gpus
    return [
        list(range(s, min(s + size, cluster.num_gpus))) for s in range(0, cluster.num_gpus, size)
    ]


def _graph(
    cluster: Cluster, a: list[int], b: list[int], scaleup_only: bool, group: int | None = None
):
    g = cluster.graph()
    if group is not None:  # dragonfly group level: traffic stays inside the group
        g = g.subgraph(
            n for n in g if not n.startswith("router:") or n.startswith(f"router:{group}.")
        )
    if scaleup_only:
        keep = {f"gpu:{r}" for r in (*a, *b)}
        g = g.subgraph(
            n
            for n, d in g.nodes(data=True)
            if n in keep or d["kind"] in ("nvswitch", "pcie_switch", "loopback")
        )
    return g


def flow_per_gpu(
    cluster: Cluster,
    a: list[int],
    b: list[int],
    scaleup_only: bool = False,
    group: int | None = None,
) -> float:
    g = _graph(cluster, a, b, scaleup_only, group)
    h = nx.DiGraph()
    for u, v, d in g.edges(data=True):
        h.add_edge(u, v, capacity=d["bandwidth"])
        h.add_edge(v, u, capacity=d["bandwidth"])
    for r in a:
        h.add_edge("S", f"gpu:{r}")  # no capacity attribute: unbounded
    for r in b:
        h.add_edge(f"gpu:{r}", "T")
    value = nx.maximum_flow_value(h, "S", "T")
    return value / min(len(a), len(b))


def path_latency(cluster: Cluster, a: int, b: int, scaleup_only: bool = False) -> float:
    g = _graph(cluster, [a], [b], scaleup_only)
    return nx.shortest_path_length(g, f"gpu:{a}", f"gpu:{b}", weight="latency")


def check_level(
    cluster: Cluster,
    level: int,
    a: list[int],
    b: list[int],
    rel: float = 1e-9,
    latency: bool = True,
):
    """Assert span(a + b) ends at `level` and matches the graph there."""
    levels = cluster.span(a + b)
    assert len(levels) == level + 1, (levels, level)
    top = levels[-1]
    group = None
    if cluster.network.kind == "dragonfly" and top.name == "group":
        net = cluster.network
        group = a[0] // cluster.gpus_per_node // (net.nodes_per_router * net.routers_per_group)
    got = flow_per_gpu(cluster, a, b, scaleup_only=level == 0, group=group)
    assert abs(got - top.bw_per_gpu) <= rel * top.bw_per_gpu, (level, got, top)
    if not latency:
        return
    lat = path_latency(cluster, a[0], b[0], scaleup_only=level == 0)
    assert abs(lat - top.latency) <= 1e-12, (level, lat, top)
