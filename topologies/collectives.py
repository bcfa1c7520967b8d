"""Collective costs: seconds for a collective over a group of ranks of a Cluster.

Byte convention (nccl-tests' S, hardware-facts meta.busbw_factors [S1][S2]):
all_reduce S = buffer per rank; all_gather S = the gathered output (recvcount*n);
reduce_scatter S = the full input; all_to_all S = bytes each rank sends, its own share
included; broadcast S = the buffer; send_recv S = bytes sent.

Model: hierarchical alpha-beta with NCCL's algorithm choice. For each algorithm and protocol
NCCL would allow, time = latency + bytes / bandwidth, and the cheapest wins, as NCCL's tuner
picks the minimum of its own model (src/graph/tuning.cc [S3]).

Bandwidths (bytes/s per GPU per direction), built from Cluster.span(ranks):
- scale-up: NCCL's NVLink model, links x nccl_model.per_link_uni_gbs (H100 18 x 20.6 =
  370.8 GB/s; measured ring busbw 365-370); PCIe x16 at PCIE_EFFICIENCY of line rate; an
  NVL72 rack is one scale-up domain.
- scale-out: each GPU's share of its node's NICs at NIC_EFFICIENCY, divided by the
  oversubscription of every switch tier the group crosses (Level.bw_per_gpu).
- "agg": the bandwidth a ring gets across a boundary = fewest group ranks in a child unit x
  the per-GPU rate of that level (a ring crosses each node boundary once per channel).

Algorithms:
- Ring (all): busbw = min(scale-up rate, agg); AR moves 2(n-1)/n S, AG/RS (n-1)/n S,
  broadcast S. Latency base + (nsteps - nInter) intraLat + nInter interLat [S3].
- Tree (all-reduce across domains): algbw = TREE_EFFICIENCY x min(scale-up, agg) / 2 (the
  intra-node chain and the double binary tree move 2S per GPU / node). Like NCCL's own model
  this ignores the 2-node tree advantage (hardware-facts busbw_caveats).
  Latency base + 2((ppn-1) intraLat + log2(nNodes) interLat).
- NVLS (all-reduce inside one NVSwitch domain, Hopper/Blackwell, >= NVLS_MIN_GPUS ranks):
  algbw = scale-up x NVLS_EFFICIENCY x n/(n+1) (sjeaugey's NVLS relation [S57]); latency the
  NVLS hwLat (25 us). Reproduces 420/440/460/480 GB/s busbw at 5/6/7/8 H100s [S9].
- PAT (all-gather / reduce-scatter, one rank per domain): PAT_EFFICIENCY, PAT latency.
- all_to_all: NCCL's p2p; per level, the bytes that must leave the sender's child unit over
  that level's rate x ALLTOALL_EFFICIENCY, levels in parallel; scale-out at most one NIC per
  GPU ("alltoall cannot aggregate NICs" [S11]).
- send_recv: one ring step (NCCL's tuner has no p2p model).
Protocols: LL (x0.5, capped at 141 GB/s on one Hopper node), LL128 (x0.92), Simple (x1).

Not modelled: SHARP / CollNet, NVLSTree (NVLS + tree across nodes), NVLS all-gather /
reduce-scatter (their bus rate is the NVLS wire rate, below ring's), channel counts, NCCL's
reduced channel count for mid-size messages. Every constant is in the block below, with the
hardware-facts.yaml key it comes from; they are the same for every cluster.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise

from tera.topologies.cluster import Cluster, Level
from tera.topologies.network import LATENCY_LOOPBACK

US = 1e-6
GB = 1e9
PROTOCOLS = ("LL", "LL128", "Simple")

# ---- constants: hardware-facts.yaml nccl_model (NCCL tuning.cc @5067397 [S3] V) ---------
BASE_LATENCY_US = {  # nccl_model.base_latency_us, [LL, LL128, Simple]
    "tree": (6.8, 14.0, 8.4),
    "ring": (6.6, 14.0, 8.4),
    "nvls": (0.0, 0.0, 0.0),
    "pat": (8.0, 8.0, 8.0),
}
HW_LATENCY_US = {  # nccl_model.hw_latency_us, per step, [LL, LL128, Simple]
    "nvlink": {
        "tree": (0.6, 1.25, 4.0),
        "ring": (0.6, 1.9, 3.4),
        "nvls": (0, 0, 25),
        "pat": (0, 0, 4.0),
    },
    "pci": {
        "tree": (1.0, 1.9, 4.0),
        "ring": (1.0, 2.5, 5.7),
        "nvls": (0, 0, 0),
        "pat": (0, 0, 4.0),
    },
    "net": {
        "tree": (5.0, 8.5, 14),
        "ring": (2.7, 4.0, 14.0),
        "nvls": (0, 0, 18),
        "pat": (0, 0, 14),
    },
}
NET_POST_OVERHEAD_US = {"intel": 1.0, "amd": 2.0}  # nccl_model.net_post_overhead_us
NET_POST_SIMPLE_MULTIPLIER = 3  # nccl_model.net_post_overhead_us.simple_multiplier
PROTOCOL_EFFICIENCY = {"LL": 0.5, "LL128": 0.92, "Simple": 1.0}  # efficiency.ring_ll, ring_ll128
LL_MAX_BW_HOPPER_SINGLE_NODE = 141.0 * GB  # nccl_model.ll_max_bw_gbs_hopper_single_node
TREE_EFFICIENCY = 0.92  # nccl_model.efficiency.tree_allreduce
NVLS_EFFICIENCY = {"hopper": 0.85, "blackwell": 0.74}  # nccl_model.efficiency.nvls
PAT_EFFICIENCY = 0.75  # nccl_model.efficiency.pat
# NVLS is picked only at >= 5 GPUs (alpha_beta_defaults.h100_nvswitch_8.nvls_min_gpus;
# nccl_model.observed_selection_h200_nccl_2_27_7). The >= 2 MiB threshold observed there
# falls out of the latency terms (NVLS 25 us vs ring LL 15 us) and needs no constant.
NVLS_MIN_GPUS = 5
# NCCL's network model: 12.0 GB/s per 100 Gb/s (12.5 GB/s line), nccl_model.per_link_uni_gbs
# .net_default_100g -> 0.96; measured 46-48 GB/s per NDR 400G NIC, 24 per HDR 200G [S7][S15].
NIC_EFFICIENCY = 12.0 / 12.5
# NCCL's PCIe model: pci_gen3_x16 12.0 GB/s of a 16 GB/s Gen3 x16 line (D: Gen4 x16 is
# 64 GB/s bidir = 32 uni, gpus.a100_sxm_80gb.pcie; Gen3 is half) -> 24 / 48 GB/s at Gen4 /
# Gen5 as on NVIDIA's slide [S22].
PCIE_EFFICIENCY = 12.0 / 16.0
# All-to-all reaches 320 GB/s busbw on 8 H100 where ring reaches 365:
# alpha_beta_defaults.h100_nvswitch_8.alltoall_busbw_gbs / ring_busbw_gbs.
ALLTOALL_EFFICIENCY = 320.0 / 365.0
# Scale-up links without an NCCL constant (AMD xGMI, inline GPUs): ASSUMPTION, the SM90
# NVLink ratio nccl_model.per_link_uni_gbs.sm90_nvlink 20.6 / 25 GB/s line per link
# (gpus.h100_sxm5.scaleup 450 / 18).
DEFAULT_LINK_EFFICIENCY = 20.6 / 25.0
# ------------------------------------------------------------------------------------------

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "send_recv")
BUSBW_FACTOR = {  # meta.busbw_factors [S1][S2]
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
    "reduce": lambda n: 1.0,
    "send_recv": lambda n: 1.0,
}
_ALIASES = {
    "alltoall": "all_to_all",
    "sendrecv": "send_recv",
    "allreduce": "all_reduce",
    "allgather": "all_gather",
    "reducescatter": "reduce_scatter",
}


@dataclass(frozen=True)
class Choice:
    """The cheapest algorithm/protocol NCCL would run, and its time in seconds."""

    seconds: float
    algo: str
    protocol: str


def bus_bandwidth(kind: str, n: int, nbytes: float, seconds: float) -> float:
    """nccl-tests bus bandwidth in bytes/s: (nbytes / seconds) x busbw factor(n)."""
    kind = _ALIASES.get(kind, kind)
    if kind not in BUSBW_FACTOR:
        raise ValueError(f"unknown collective {kind!r}; use one of {', '.join(BUSBW_FACTOR)}")
    return nbytes / seconds * BUSBW_FACTOR[kind](n)


class _Group:
    """What the cost model needs to know about a group of ranks on a cluster."""

    def __init__(self, cluster: Cluster, ranks: Iterable[int]):
        self.c = cluster
        self.ranks = sorted(set(ranks))
        self.n = len(self.ranks)
        self.levels: list[Level] = cluster.span(self.ranks)
        top = self.levels[0]
        self.domains = top.units
        self.ppn = top.ranks_per_unit
        self.intra = self._scaleup_rate(top) if self.ppn > 1 else math.inf
        self.agg = math.inf  # ring bandwidth across the boundaries the group crosses
        for child, level in pairwise(self.levels):
            self.agg = min(self.agg, child.min_ranks_per_unit * self.net_rate(level))
        self.ring = min(self.intra, self.agg)
        kind = cluster.scaleup_kind
        self.intra_hw = "pci" if kind == "pcie" else "nvlink"
        self.loopback = kind == "loopback"

    def _scaleup_rate(self, level: Level) -> float:
        c, gpu = self.c, self.c.gpu
        if c.scaleup_kind == "pcie":
            return level.bw_per_gpu * PCIE_EFFICIENCY
        if c.scaleup_kind == "loopback":
            return level.bw_per_gpu  # measured, already an achieved rate
        if gpu.nccl_link_bw:
            return level.bw_per_gpu * gpu.nccl_link_bw / (c.scaleup_bw / c.scaleup_links)
        return level.bw_per_gpu * DEFAULT_LINK_EFFICIENCY

    def net_rate(self, level: Level, one_nic: bool = False) -> float:
        bw = min(level.bw_per_gpu, self.c.nic_bw) if one_nic else level.bw_per_gpu
        return bw if self.c.nic_kind == "loopback" else bw * NIC_EFFICIENCY

    # ---- latency pieces (seconds) ----
    def hw(self, where: str, algo: str, p: str) -> float:
        if self.loopback:
            return LATENCY_LOOPBACK / 2  # per step; a 2-rank all_reduce is ~2 steps
        hw = self.intra_hw if where == "intra" else "net"
        return HW_LATENCY_US[hw][algo][PROTOCOLS.index(p)] * US

    def base(self, algo: str, p: str) -> float:
        return 0.0 if self.loopback else BASE_LATENCY_US[algo][PROTOCOLS.index(p)] * US

    def ring_latency(self, p: str, nsteps: int, ninter: int) -> float:
        intra = self.hw("intra", "ring", p)
        if self.domains > 1 and not self.loopback:  # network post overhead, tuning.cc
            post = NET_POST_OVERHEAD_US.get(self.c.cpu, NET_POST_OVERHEAD_US["intel"]) * US
            intra = max(intra, post * (NET_POST_SIMPLE_MULTIPLIER if p == "Simple" else 1))
        return (
            self.base("ring", p) + (nsteps - ninter) * intra + ninter * self.hw("inter", "ring", p)
        )

    def rate(self, bw: float, p: str) -> float:
        bw = bw * PROTOCOL_EFFICIENCY[p]
        if p == "LL" and self.domains == 1 and self.c.gpu.arch == "hopper":
            bw = min(bw, LL_MAX_BW_HOPPER_SINGLE_NODE)
        return bw


def _candidates(kind: str, g: _Group, S: float) -> dict[tuple[str, str], float]:
    n, nd = g.n, g.domains
    out: dict[tuple[str, str], float] = {}
    if kind == "all_reduce":
        for p in PROTOCOLS:
            out["ring", p] = g.ring_latency(p, 2 * (n - 1), 2 * (nd - 1)) + 2 * (
                n - 1
            ) / n * S / g.rate(g.ring, p)
        if nd > 1:
            for p in PROTOCOLS:
                lat = g.base("tree", p) + 2 * (
                    (g.ppn - 1) * g.hw("intra", "tree", p)
                    + math.log2(nd) * g.hw("inter", "tree", p)
                )
                out["tree", p] = lat + S / g.rate(TREE_EFFICIENCY * g.ring / 2, p)
        eff = NVLS_EFFICIENCY.get(g.c.gpu.arch)
        if nd == 1 and n >= NVLS_MIN_GPUS and g.c.scaleup_kind == "switch" and eff:
            algbw = g.intra * eff * n / (n + 1)
            out["nvls", "Simple"] = g.hw("intra", "nvls", "Simple") + S / algbw
    elif kind in ("all_gather", "reduce_scatter", "broadcast"):
        moved = S if kind == "broadcast" else (n - 1) / n * S
        for p in PROTOCOLS:
            out["ring", p] = g.ring_latency(p, n - 1, nd - 1) + moved / g.rate(g.ring, p)
        if kind != "broadcast" and nd > 1 and g.ppn == 1:
            lat = (
                BASE_LATENCY_US["pat"][2]
                + math.log2(nd) * HW_LATENCY_US["net"]["pat"][2] / 3.5
                + 2.8 * n
            ) * US
            out["pat", "Simple"] = lat + moved / (g.agg * PAT_EFFICIENCY)
    elif kind == "all_to_all":
        worst = 0.0
        if g.ppn > 1:  # to peers inside the sender's scale-up domain
            worst = (g.ppn - 1) / n * S / (g.intra * ALLTOALL_EFFICIENCY)
        for child, level in pairwise(g.levels):
            out_bytes = (n - child.min_ranks_per_unit) / n * S
            worst = max(worst, out_bytes / (g.net_rate(level, one_nic=True) * ALLTOALL_EFFICIENCY))
        where = "inter" if nd > 1 else "intra"
        out["p2p", "Simple"] = g.base("ring", "Simple") + g.hw(where, "ring", "Simple") + worst
    else:
        raise ValueError(f"unknown collective {kind!r}; use one of {', '.join(KINDS)}")
    return out


def best(
    kind: str,
    cluster: Cluster,
    ranks: Iterable[int],
    nbytes: float,
    algo: str | None = None,
    protocol: str | None = None,
) -> Choice:
    """The cheapest (algorithm, protocol) for `kind` over `ranks`; `algo` / `protocol`
    restrict the choice like NCCL_ALGO / NCCL_PROTO. A group of one rank costs 0."""
    kind = _ALIASES.get(kind, kind)
    g = _Group(cluster, ranks)
    if g.n <= 1 or nbytes <= 0:
        return Choice(0.0, "none", "none")
    options = _candidates(kind, g, float(nbytes))
    picked = {
        k: t
        for k, t in options.items()
        if (algo is None or k[0] == algo.lower()) and (protocol is None or k[1] == protocol)
    }
    if not picked:
        allowed = ", ".join(f"{a}/{p}" for a, p in options)
        raise ValueError(
            f"{kind} over {g.n} ranks ({g.domains} domains) cannot use "
            f"{algo or 'any'}/{protocol or 'any'}; NCCL allows {allowed}"
        )
    (a, p), t = min(picked.items(), key=lambda kv: kv[1])
    return Choice(t, a, p)


def all_reduce(cluster: Cluster, ranks: Iterable[int], nbytes: float, **kw) -> float:
    """Seconds to all-reduce `nbytes` per rank over `ranks`."""
    return best("all_reduce", cluster, ranks, nbytes, **kw).seconds


def all_gather(cluster: Cluster, ranks: Iterable[int], nbytes: float, **kw) -> float:
    """Seconds to all-gather; `nbytes` is the gathered output (recvcount x n)."""
    return best("all_gather", cluster, ranks, nbytes, **kw).seconds


def reduce_scatter(cluster: Cluster, ranks: Iterable[int], nbytes: float, **kw) -> float:
    """Seconds to reduce-scatter; `nbytes` is the full input of one rank."""
    return best("reduce_scatter", cluster, ranks, nbytes, **kw).seconds


def all_to_all(cluster: Cluster, ranks: Iterable[int], nbytes: float, **kw) -> float:
    """Seconds for an all-to-all; `nbytes` is what each rank sends, its own share included."""
    return best("all_to_all", cluster, ranks, nbytes, **kw).seconds


def broadcast(cluster: Cluster, ranks: Iterable[int], nbytes: float, **kw) -> float:
    """Seconds to broadcast `nbytes` from one rank to the group (ring/chain)."""
    return best("broadcast", cluster, ranks, nbytes, **kw).seconds


def send_recv(
    cluster: Cluster, src: int, dst: int, nbytes: float, protocol: str | None = None
) -> float:
    """Seconds to send `nbytes` from rank `src` to rank `dst`, costed as one ring step."""
    if src == dst or nbytes <= 0:
        return 0.0
    g = _Group(cluster, (src, dst))
    if g.domains == 1:
        bw, where = g.intra, "intra"
    else:
        bw, where = g.net_rate(g.levels[-1]), "inter"
    protos = PROTOCOLS if protocol is None else (protocol,)
    return min(g.base("ring", p) + g.hw(where, "ring", p) + nbytes / g.rate(bw, p) for p in protos)
