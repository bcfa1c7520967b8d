"""Scale-out networks: the `network:` block of a cluster YAML and its switch tiers.

A network is reduced to a list of `Tier`s above the scale-up domain (a DGX node, an NVL72
rack). Tier i groups `fan_in` units of tier i-1 (tier 0 groups scale-up domains) and carries
`bw_per_gpu`: bytes/s per direction that each GPU of a child unit gets into the rest of the
parent unit when every GPU of the child unit sends at once. That concurrency is the planner's
case (all parallel groups of a job communicate together) and makes the number independent
of which ranks form a group.

Invariants:
- bw_per_gpu never increases going up; latency never decreases.
- Uplinks are provisioned in proportion to what hangs below a switch: uplink capacity =
  downlink capacity / oversubscription, so bw_per_gpu(tier i) = NIC share / (o_1 ... o_i).
- graph.py builds exactly these capacities; tests compare max-flow with the tiers.
- Dragonfly: routers hold `nodes_per_router` nodes, groups are all-to-all router cliques
  joined by global links. The `group` tier counts routes inside the group (direct link plus
  one intermediate router: (routers - 1) links out of a router); `global` counts all global
  links of a group (direct plus one intermediate group, Valiant routing). Partly filled
  groups are costed as full ones (graph.py builds every router of a touched group).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tera.topologies.errors import ClusterError
from tera.topologies.schema import Reader

NETWORK_KINDS = ("fat_tree", "rail_optimized", "nvl72", "dragonfly")
NIC_KINDS = ("ib", "roce", "efa", "loopback")

US = 1e-6
# One-way latency of a 64-byte message, hardware-facts.yaml
# fabrics.deepseek_mpft.latency_us_R (label R: recalled, unverified) [S58].
LATENCY_NVLINK = 3.33 * US  # latency_us_R.nvlink
_LEAF_SPINE = {  # (same leaf, cross leaf)
    "ib": (2.8 * US, 3.7 * US),  # latency_us_R.ib_same_leaf, ib_cross_leaf
    "roce": (3.6 * US, 5.6 * US),  # latency_us_R.roce_same_leaf, roce_cross_leaf
    "efa": (2.8 * US, 3.7 * US),  # no EFA figure in hardware-facts: IB values (assumption)
}
# local-cpu: an 8-byte gloo all_reduce between 2 processes over loopback took 334-448 us
# (measured 2026-11-21, see catalog.yaml); 390 us stands for every loopback hop.
LATENCY_LOOPBACK = 390 * US


def hop_latencies(nic_kind: str) -> tuple[float, float, float]:
    """(same leaf, cross leaf, cross spine) one-way latency in seconds. The core figure is
    derived (D): one more switch pair costs what leaf->spine->leaf added over the leaf."""
    if nic_kind == "loopback":
        return (LATENCY_LOOPBACK,) * 3
    leaf, spine = _LEAF_SPINE[nic_kind]
    return leaf, spine, spine + (spine - leaf)


@dataclass(frozen=True)
class Tier:
    """One switch tier above the scale-up domain (see module docstring)."""

    name: str
    fan_in: int | None  # child units per unit; None: unbounded (the top of the fabric)
    bw_per_gpu: float
    latency: float


@dataclass(frozen=True)
class Network:
    """The `network:` block. `oversubscription[i]` is down:up at switch level i+1 counted
    from the leaves (a scalar in YAML applies to the leaves only)."""

    kind: str
    levels: int = 2
    radix: int = 64
    oversubscription: tuple[float, ...] = (1.0,)
    su_nodes: int | None = None  # rail_optimized: nodes per scalable unit (default radix/2)
    su_racks: int | None = None  # nvl72: racks per scalable unit
    planes: bool = False  # rail_optimized: every rail its own fabric (DeepSeek MPFT)
    routers_per_group: int | None = None  # dragonfly
    nodes_per_router: int | None = None  # dragonfly
    global_links_per_router: int | None = None  # dragonfly
    link_gbps: float | None = None  # dragonfly router-to-router links; None: the NIC rate

    @classmethod
    def from_mapping(cls, data: Any) -> Network:
        r = Reader(data, "network")
        kind = r.choice("kind", NETWORK_KINDS)
        if kind == "dragonfly":
            net = cls(
                kind=kind,
                levels=3,
                radix=0,
                oversubscription=(),
                routers_per_group=r.positive_int("routers_per_group", hint="e.g. 16"),
                nodes_per_router=r.positive_int("nodes_per_router", hint="e.g. 4"),
                global_links_per_router=r.positive_int("global_links_per_router", hint="e.g. 8"),
                link_gbps=r.positive("link_gbps", default=None),
            )
            r.done()
            return net
        levels_default = 2
        levels = r.positive_int("levels", default=levels_default)
        allowed = (2,) if kind == "nvl72" else (2, 3)
        if levels not in allowed:
            raise ClusterError(
                "network.levels",
                f"{kind} supports {' or '.join(map(str, allowed))} switch levels, got {levels}",
                f"use levels: {allowed[-1]}",
            )
        radix = r.positive_int("radix", default=64)
        if radix < 4 or radix % 2:
            raise ClusterError(
                "network.radix", f"must be an even number >= 4, got {radix}", "use e.g. 64"
            )
        over = _oversubscription(r.raw("oversubscription", False, 1), levels)
        su_nodes = su_racks = None
        planes = False
        if kind == "rail_optimized":
            su_nodes = r.positive_int("su_nodes", default=radix // 2)
            planes = r.boolean("planes", False)
            if planes and levels != 2:
                raise ClusterError(
                    "network.planes",
                    "multi-plane fabrics are modelled with 2 levels",
                    "use levels: 2",
                )
            if su_nodes + math.ceil(su_nodes / over[0]) > radix:
                raise ClusterError(
                    "network.su_nodes",
                    f"{su_nodes} nodes per rail leaf plus their uplinks exceed radix {radix}",
                    f"use su_nodes <= {radix // 2} or a larger radix",
                )
        if kind == "nvl72":
            su_racks = r.positive_int("su_racks", default=8)
        r.done()
        return cls(kind, levels, radix, over, su_nodes, su_racks, planes)

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "dragonfly":
            out = {
                "kind": self.kind,
                "routers_per_group": self.routers_per_group,
                "nodes_per_router": self.nodes_per_router,
                "global_links_per_router": self.global_links_per_router,
            }
            if self.link_gbps is not None:
                out["link_gbps"] = self.link_gbps
            return out
        out: dict[str, Any] = {
            "kind": self.kind,
            "levels": self.levels,
            "radix": self.radix,
            "oversubscription": list(self.oversubscription),
        }
        if self.kind == "rail_optimized":
            out.update(su_nodes=self.su_nodes, planes=self.planes)
        if self.kind == "nvl72":
            out["su_racks"] = self.su_racks
        return out

    def describe(self) -> str:
        ratios = "/".join(f"{_num(o)}:1" for o in self.oversubscription)
        if len(set(self.oversubscription)) == 1:
            ratios = f"{_num(self.oversubscription[0])}:1"
        if self.kind == "fat_tree":
            return f"fat-tree {self.levels} levels {ratios}"
        if self.kind == "rail_optimized":
            planes = ", one plane per rail" if self.planes else ""
            return (
                f"rail-optimized {self.levels} levels {ratios} (SU {self.su_nodes} nodes{planes})"
            )
        if self.kind == "nvl72":
            return (
                f"NVLink racks, {self.levels}-level scale-out {ratios} (SU {self.su_racks} racks)"
            )
        return (
            f"dragonfly (groups of {self.routers_per_group} routers x {self.nodes_per_router} "
            f"nodes, {self.global_links_per_router} global links per router)"
        )

    def tiers(
        self,
        *,
        num_domains: int,
        nodes_per_domain: int,
        gpus_per_node: int,
        nic_count: int,
        nic_bw: float,
        nic_kind: str,
    ) -> tuple[Tier, ...]:
        """The switch tiers for a cluster of `num_domains` scale-up domains; raises
        ClusterError when the fabric cannot hold them or a switch cannot take its ports."""
        share = nic_count * nic_bw / gpus_per_node  # per-GPU NIC share, bytes/s
        leaf_lat, spine_lat, core_lat = hop_latencies(nic_kind)
        nics_per_domain = nic_count * nodes_per_domain
        o = self.oversubscription
        if self.kind == "dragonfly":
            return self._dragonfly_tiers(
                num_domains,
                nodes_per_domain,
                gpus_per_node,
                share,
                nic_bw,
                leaf_lat,
                spine_lat,
                core_lat,
            )
        if self.kind in ("rail_optimized",) and nodes_per_domain != 1:
            raise ClusterError(
                "network.kind",
                f"{self.kind} needs the scale-up domain to be one node",
                "set node.scaleup.domain to node.gpus or use kind: nvl72",
            )
        ports = self.radix // 2
        if self.kind == "fat_tree":
            per_leaf = ports // nics_per_domain
            if per_leaf == 0:
                raise ClusterError(
                    "network.radix",
                    f"a leaf's {ports} down ports cannot take the {nics_per_domain} NICs of one "
                    "scale-up domain",
                    "use a larger radix, or kind: nvl72 for rack-scale NVLink domains",
                )
            fans = [per_leaf, self.radix] if self.levels == 2 else [per_leaf, ports, self.radix]
        elif self.kind == "rail_optimized":
            rails = nic_count
            su = self.su_nodes or ports
            if self.levels == 2:
                fans = [su, self.radix if self.planes else self.radix // rails]
            else:
                fans = [su, ports // rails, self.radix]
            if 0 in fans:
                raise ClusterError(
                    "network.radix",
                    f"{rails} rails do not fit a spine of radix {self.radix}",
                    "use a larger radix or planes: true",
                )
        else:  # nvl72: leaf layer spans a scalable unit of racks, spines above it
            fans = [self.su_racks or 8, None]
        names = ("leaf", "spine", "core")
        lats = (leaf_lat, spine_lat, core_lat)
        tiers, bw = [], share
        for i, fan in enumerate(fans):
            if i > 0:
                bw = bw / o[i - 1]
            tiers.append(Tier(names[i], fan, bw, lats[i]))
        _check_capacity(self, tiers, num_domains, nodes_per_domain * gpus_per_node)
        return tuple(tiers)

    def _dragonfly_tiers(
        self,
        num_domains,
        nodes_per_domain,
        gpus_per_node,
        share,
        nic_bw,
        leaf_lat,
        spine_lat,
        core_lat,
    ) -> tuple[Tier, ...]:
        if nodes_per_domain != 1:
            raise ClusterError(
                "network.kind",
                "dragonfly needs the scale-up domain to be one node",
                "set node.scaleup.domain to node.gpus",
            )
        a, p, h = self.routers_per_group, self.nodes_per_router, self.global_links_per_router
        link = self.link_gbps * 1e9 / 8 if self.link_gbps else nic_bw
        gpus_router = p * gpus_per_node
        local = min(share, (a - 1) * link / gpus_router) if a > 1 else share
        groups = math.ceil(num_domains / (a * p))
        per_pair = (a * h) // (groups - 1) if groups > 1 else 0
        glob = (
            min(local, per_pair * (groups - 1) * link / (a * gpus_router)) if groups > 1 else local
        )
        hop = spine_lat - leaf_lat
        tiers = (
            Tier("leaf", p, share, leaf_lat),
            Tier("group", a, local, spine_lat),
            Tier("global", a * h + 1, glob, spine_lat + hop + (core_lat - spine_lat)),
        )
        _check_capacity(self, list(tiers), num_domains, gpus_per_node)
        return tiers


def dragonfly_links_per_pair(net: Network, groups: int) -> int:
    """Global links between each pair of groups (graph.py builds exactly these)."""
    return (
        (net.routers_per_group * net.global_links_per_router) // (groups - 1) if groups > 1 else 0
    )


def _check_capacity(net: Network, tiers: list[Tier], num_domains: int, domain_gpus: int) -> None:
    capacity = 1
    for tier in tiers:
        if tier.fan_in is None:
            return
        capacity *= tier.fan_in
    if num_domains > capacity:
        fix = "use levels: 3 or a larger radix" if net.levels == 2 else "use a larger radix"
        if net.kind == "dragonfly":
            fix = "add global_links_per_router or routers_per_group"
        raise ClusterError(
            "gpus",
            f"{num_domains * domain_gpus} GPUs exceed what this {net.describe()} holds "
            f"({capacity * domain_gpus})",
            fix,
        )


def _oversubscription(value: Any, levels: int) -> tuple[float, ...]:
    values = value if isinstance(value, list) else [value]
    if isinstance(value, list) and len(values) != levels - 1:
        raise ClusterError(
            "network.oversubscription",
            f"{len(values)} ratios for {levels} switch levels",
            f"give {levels - 1} (one per level above the leaves) or one number for the leaves",
        )
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ClusterError(
                "network.oversubscription",
                f"must be a number (down:up ratio), got {v!r}",
                "write 1 for non-blocking, 3 for 3:1",
            )
        if not (math.isfinite(v) and v >= 1):
            raise ClusterError(
                "network.oversubscription",
                f"must be >= 1, got {_num(v)}",
                "use 1 for non-blocking",
            )
        out.append(float(v))
    return tuple(out + [1.0] * (levels - 1 - len(out)))


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)
