"""Cluster.graph(): the cluster as an undirected networkx Graph.

Nodes (attribute `kind`): gpu ("gpu:<rank>", also `rank`, `node`, `local`), nvswitch /
pcie_switch / loopback ("nvswitch:<domain>", one per node or NVL72 rack), nic
("nic:<node>.<i>"), leaf, spine, core, router (dragonfly). Edges carry `bandwidth` (bytes/s
per direction) and `latency` (s); parallel cables between two switches are one edge with
their summed bandwidth.

Invariants (checked by tests against Cluster.span):
- a GPU's scale-up edges sum to its scale-up line rate; its NIC edges sum to its NIC share;
- a switch's uplinks carry (bandwidth attached below) / oversubscription, spread evenly;
- a path GPU -> NIC -> leaf -> NIC -> GPU has latency tiers[0].latency, and each tier
  above adds what network.hop_latencies says.
Switch tiers that nothing would cross (a single leaf, a single pod) are not built.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING

from tera.topologies.network import (
    LATENCY_LOOPBACK,
    LATENCY_NVLINK,
    dragonfly_links_per_pair,
    hop_latencies,
)

if TYPE_CHECKING:
    import networkx as nx

    from tera.topologies.cluster import Cluster

_SWITCH_KIND = {"switch": "nvswitch", "pcie": "pcie_switch", "loopback": "loopback"}


def build_graph(c: Cluster) -> nx.Graph:
    import networkx as nx

    nodes: list[tuple[str, dict]] = []
    edges: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])

    def edge(u: str, v: str, bw: float, lat: float) -> None:
        e = edges[(u, v)]
        e[0] += bw
        e[1] = lat

    n, gpn, dom = c.num_gpus, c.gpus_per_node, c.scaleup_domain
    su_lat = LATENCY_LOOPBACK if c.scaleup_kind == "loopback" else LATENCY_NVLINK
    for r in range(n):
        nodes.append((f"gpu:{r}", {"kind": "gpu", "rank": r, "node": r // gpn, "local": r % gpn}))

    # scale-up: one switch per domain, or a full mesh of peer links
    if c.scaleup_kind == "mesh":
        per_peer = c.scaleup_bw / c.scaleup_links
        for d in range(c.num_domains):
            members = range(d * dom, min(n, (d + 1) * dom))
            for i in members:
                for j in members:
                    if i < j:
                        edge(f"gpu:{i}", f"gpu:{j}", per_peer, su_lat)
    else:
        kind = _SWITCH_KIND[c.scaleup_kind]
        for d in range(c.num_domains):
            nodes.append((f"{kind}:{d}", {"kind": kind, "domain": d}))
        for r in range(n):
            edge(f"gpu:{r}", f"{kind}:{r // dom}", c.scaleup_bw, su_lat / 2)

    # NICs: a GPU owns nic_count/gpn NICs, or shares one with gpn/nic_count GPUs
    leaf_lat, spine_lat, core_lat = hop_latencies(c.nic_kind)
    nic_leaf = _nic_to_switch(c)
    leaf_cap: dict[str, float] = defaultdict(float)
    nic_count, nic_bw = c.nic_count, c.nic_bw
    seen_nics: set[str] = set()
    for r in range(n):
        node, local = divmod(r, gpn)
        if nic_count >= gpn:
            k = nic_count // gpn
            links = [(local * k + i, nic_bw) for i in range(k)]
        else:
            share = gpn // nic_count
            links = [(local // share, nic_bw / share)]
        for i, bw in links:
            nic = f"nic:{node}.{i}"
            edge(f"gpu:{r}", nic, bw, 0.0)
            if nic not in seen_nics:
                seen_nics.add(nic)
                nodes.append((nic, {"kind": "nic", "node": node, "index": i}))
                sw = nic_leaf(node, i)
                edge(nic, sw, nic_bw, leaf_lat / 2)
                leaf_cap[sw] += nic_bw
    kind0 = "router" if c.network.kind == "dragonfly" else "leaf"
    nodes.extend((sw, {"kind": kind0}) for sw in leaf_cap)

    if c.network.kind == "dragonfly":
        _dragonfly(c, nodes, edge, spine_lat - leaf_lat, core_lat - spine_lat)
    else:
        _tree(c, nodes, edge, leaf_cap, (spine_lat - leaf_lat) / 2, (core_lat - spine_lat) / 2)

    g = nx.Graph(name=c.name)
    g.add_nodes_from(nodes)
    g.add_edges_from(
        (u, v, {"bandwidth": bw, "latency": lat}) for (u, v), (bw, lat) in edges.items()
    )
    return g


def _nic_to_switch(c: Cluster):
    """(node, nic index) -> name of the leaf (or dragonfly router) the NIC plugs into."""
    net, t0 = c.network, c.tiers[0]
    nodes_per_domain = c.scaleup_domain // c.gpus_per_node
    if net.kind == "fat_tree":
        return lambda node, i: f"leaf:{node // nodes_per_domain // t0.fan_in}"
    if net.kind == "rail_optimized":
        return lambda node, i: f"leaf:{node // t0.fan_in}.{i}"
    if net.kind == "dragonfly":
        a = net.routers_per_group
        return lambda node, i: f"router:{node // t0.fan_in // a}.{node // t0.fan_in % a}"
    # nvl72: NIC position p in its rack; the SU's leaves each take a block of positions
    positions = c.nic_count * nodes_per_domain
    leaves = math.ceil(positions * t0.fan_in / (net.radix // 2))

    def nvl72(node: int, i: int) -> str:
        rack, slot = divmod(node, nodes_per_domain)
        p = slot * c.nic_count + i
        return f"leaf:{rack // t0.fan_in}.{p * leaves // positions}"

    return nvl72


def _tree(c: Cluster, nodes, edge, leaf_cap, spine_hop: float, core_hop: float) -> None:
    """Spines (and cores) above the leaves of a fat-tree, rail-optimized or NVL72 fabric."""
    net, tiers = c.network, c.tiers
    if len(leaf_cap) <= 1:
        return
    o = net.oversubscription
    spines_per_group = net.radix // 2

    def leaf_pod(leaf: str) -> tuple[int, int | None]:
        """(pod, plane) of a leaf; the pod is 0 for 2-level fabrics."""
        parts = leaf.split(":")[1].split(".")
        unit = int(parts[0])  # fat_tree: leaf index; rail / nvl72: scalable unit
        plane = int(parts[1]) if net.kind == "rail_optimized" and net.planes else None
        if net.levels == 2:
            return 0, plane
        return unit // tiers[1].fan_in, plane

    spine_cap: dict[str, float] = defaultdict(float)
    pods: set[int] = set()
    for leaf, cap in leaf_cap.items():
        pod, plane = leaf_pod(leaf)
        pods.add(pod)
        prefix = f"spine:{pod}" if plane is None else f"spine:{pod}.{plane}"
        up = cap / o[0] / spines_per_group
        for j in range(spines_per_group):
            spine = f"{prefix}.{j}"
            edge(leaf, spine, up, spine_hop)
            spine_cap[spine] += up
    nodes.extend((s, {"kind": "spine"}) for s in spine_cap)
    if net.levels < 3 or len(pods) <= 1:
        return
    cores_per_group = net.radix // 2
    cores: set[str] = set()
    for spine, cap in spine_cap.items():
        j = spine.rsplit(".", 1)[1]
        up = cap / o[1] / cores_per_group
        for k in range(cores_per_group):
            core = f"core:{j}.{k}"
            cores.add(core)
            edge(spine, core, up, core_hop)
    nodes.extend((s, {"kind": "core"}) for s in sorted(cores))


def _dragonfly(c: Cluster, nodes, edge, local_lat: float, global_lat: float) -> None:
    """All routers of every touched group, local links all-to-all inside a group, and
    `dragonfly_links_per_pair` global links between every pair of groups."""
    net = c.network
    a, h = net.routers_per_group, net.global_links_per_router
    link = net.link_gbps * 1e9 / 8 if net.link_gbps else c.nic_bw
    groups = math.ceil(c.num_nodes / (net.nodes_per_router * a))
    present = {name for name, attrs in nodes if attrs.get("kind") == "router"}
    for g in range(groups):
        for x in range(a):
            if f"router:{g}.{x}" not in present:
                nodes.append((f"router:{g}.{x}", {"kind": "router"}))
            for y in range(x + 1, a):
                edge(f"router:{g}.{x}", f"router:{g}.{y}", link, local_lat)
    per_pair = dragonfly_links_per_pair(net, groups)

    def port(g: int, peer: int, t: int) -> str:
        k = (peer - (peer > g)) * per_pair + t  # index of this link among g's global links
        return f"router:{g}.{k // h}"

    for g1 in range(groups):
        for g2 in range(g1 + 1, groups):
            for t in range(per_pair):
                edge(port(g1, g2, t), port(g2, g1, t), link, global_lat)
