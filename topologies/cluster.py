"""Clusters: the cluster YAML of DESIGN.md as a frozen `Cluster`, presets, and span queries.

A cluster is `num_gpus` GPUs in nodes of `gpus_per_node`; nodes sit in scale-up domains of
`scaleup_domain` GPUs (the node itself for DGX/HGX, a rack of 18 trays x 4 GPUs for NVL72);
domains hang off a scale-out network (network.py). Rank r lives on node r // gpus_per_node,
local GPU r % gpus_per_node (contiguous placement).

Invariants:
- Construction validates everything; a bad description raises ClusterError naming the field.
- Units: bytes/s per direction, seconds. `scaleup_bw` and NIC rates are line rates; the
  efficiencies NCCL achieves on them live in collectives.py, not here.
- `span()` is arithmetic, O(len(ranks)); `graph()` builds the same capacities as a networkx
  graph (tests check that max-flow on the graph agrees with span()).
- `Cluster.from_dict(c.to_dict()) == c`, and `digest()` is stable across processes.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tera.topologies.catalog import GPU, SCALEUP_KINDS, get_gpu
from tera.topologies.errors import ClusterError
from tera.topologies.network import (
    LATENCY_LOOPBACK,
    LATENCY_NVLINK,
    NIC_KINDS,
    Network,
    Tier,
)
from tera.topologies.schema import Reader

PRESET_DIR = Path(__file__).parent / "presets"
CPU_VENDORS = ("intel", "amd", "arm")
GB = 1e9


@dataclass(frozen=True)
class Level:
    """How a group of ranks spans one level of the hierarchy.

    `units`: distinct units of this level the group touches (scale-up domains for the first
    level, then leaf domains, pods, ...); `ranks_per_unit` / `min_ranks_per_unit`: the most /
    fewest group ranks in one touched unit. `bw_per_gpu`: line-rate bytes/s per direction
    that each GPU gets for traffic between the child units inside one unit of this level
    (inside a scale-up domain: GPU to GPU), after oversubscription and NIC sharing.
    `latency`: one-way latency in seconds of a message crossing this level.
    span() lists levels innermost first and stops at the first level with units == 1.
    """

    name: str
    units: int
    ranks_per_unit: int
    bw_per_gpu: float
    latency: float
    min_ranks_per_unit: int
    scaleup: bool = False


@dataclass(frozen=True)
class Cluster:
    """A validated cluster description; cheap to build (the graph is built on demand)."""

    name: str
    gpu: GPU
    gpus_per_node: int
    num_gpus: int
    scaleup_domain: int  # GPUs per scale-up (NVLink) domain; a multiple of gpus_per_node
    scaleup_bw: float  # line rate per GPU per direction, bytes/s (mesh: sum over peers)
    scaleup_kind: str  # switch | mesh | pcie | loopback
    scaleup_links: int
    nic_count: int  # NICs per node
    nic_gbps: float  # line rate of one NIC, Gb/s
    nic_kind: str  # ib | roce | efa | loopback
    network: Network
    cpu: str = "intel"
    description: str = ""
    sources: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if self.num_gpus > self.gpus_per_node and self.num_gpus % self.gpus_per_node:
            lo = self.num_gpus // self.gpus_per_node * self.gpus_per_node
            raise ClusterError(
                "gpus",
                f"{self.num_gpus} is not a multiple of gpus_per_node {self.gpus_per_node}",
                f"use {lo} or {lo + self.gpus_per_node}",
            )
        if self.scaleup_domain % self.gpus_per_node:
            raise ClusterError(
                "node.scaleup.domain",
                f"{self.scaleup_domain} GPUs is not a whole number of {self.gpus_per_node}-GPU "
                "nodes",
                f"use a multiple of {self.gpus_per_node}",
            )
        n, g = self.nic_count, self.gpus_per_node
        if n % g and g % n:
            raise ClusterError(
                "node.nics.count",
                f"{n} NICs cannot be shared evenly by {g} GPUs",
                f"use a divisor or a multiple of {g}",
            )
        if self.scaleup_kind == "mesh" and self.scaleup_domain - 1 > self.scaleup_links:
            raise ClusterError(
                "node.scaleup.links",
                f"a full mesh of {self.scaleup_domain} GPUs needs {self.scaleup_domain - 1} "
                f"peer links per GPU, got {self.scaleup_links}",
                "use kind: switch or a smaller domain",
            )
        _ = self.tiers  # validates that the network can hold the cluster

    # ---- sizes -----------------------------------------------------------------------
    @property
    def num_nodes(self) -> int:
        return -(-self.num_gpus // self.gpus_per_node)

    @property
    def num_domains(self) -> int:
        return -(-self.num_gpus // self.scaleup_domain)

    @property
    def nic_bw(self) -> float:
        """Line rate of one NIC in bytes/s per direction."""
        return self.nic_gbps * GB / 8

    @property
    def scaleout_bw_per_gpu(self) -> float:
        """Per-GPU share of the node's NICs, bytes/s per direction (line rate)."""
        return self.nic_count * self.nic_bw / self.gpus_per_node

    @functools.cached_property
    def tiers(self) -> tuple[Tier, ...]:
        return self.network.tiers(
            num_domains=self.num_domains,
            nodes_per_domain=self.scaleup_domain // self.gpus_per_node,
            gpus_per_node=self.gpus_per_node,
            nic_count=self.nic_count,
            nic_bw=self.nic_bw,
            nic_kind=self.nic_kind,
        )

    # ---- placement and span ------------------------------------------------------------
    def node_of(self, rank: int) -> tuple[int, int]:
        """(node, local GPU) of a rank: contiguous placement."""
        self._check_rank(rank)
        return divmod(rank, self.gpus_per_node)

    def domain_of(self, rank: int) -> int:
        self._check_rank(rank)
        return rank // self.scaleup_domain

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.num_gpus:
            raise ValueError(f"rank {rank} outside 0..{self.num_gpus - 1} of {self.name}")

    @property
    def scaleup_name(self) -> str:
        """Name of the scale-up level: nvlink, xgmi, pcie or loopback."""
        if self.scaleup_kind in ("switch", "mesh"):
            return "xgmi" if "xgmi" in self.gpu.scaleup_tech else "nvlink"
        return self.scaleup_kind

    def scaleup_bw_for(self, ranks_in_domain: int) -> float:
        """Per-GPU line rate among `ranks_in_domain` GPUs of one domain: a mesh gives each
        GPU one link per peer in the group; a switch gives the full port."""
        if self.scaleup_kind != "mesh":
            return self.scaleup_bw
        per_peer = self.scaleup_bw / self.scaleup_links
        return per_peer * max(1, min(self.scaleup_links, ranks_in_domain - 1))

    def span(self, ranks: Iterable[int]) -> list[Level]:
        """The levels a group of ranks spans, innermost first (see Level). O(len(ranks))."""
        ranks = set(ranks)
        if not ranks:
            raise ValueError("span() of an empty group")
        for r in (min(ranks), max(ranks)):
            self._check_rank(r)
        counts = Counter(r // self.scaleup_domain for r in ranks)
        lo = min(counts.values())
        levels = [
            Level(
                self.scaleup_name,
                len(counts),
                max(counts.values()),
                self.scaleup_bw_for(lo),
                # PCIe and xGMI have no latency figure in hardware-facts: NVLink's (assumption)
                LATENCY_LOOPBACK if self.scaleup_kind == "loopback" else LATENCY_NVLINK,
                lo,
                scaleup=True,
            )
        ]
        for tier in self.tiers:  # counts: units of the previous level -> ranks
            if len(counts) == 1:
                break
            units: Counter[int] = Counter()
            for u, c in counts.items():
                units[u // tier.fan_in if tier.fan_in is not None else 0] += c
            counts = units
            levels.append(
                Level(
                    tier.name,
                    len(counts),
                    max(counts.values()),
                    tier.bw_per_gpu,
                    tier.latency,
                    min(counts.values()),
                )
            )
        return levels

    # ---- graph ------------------------------------------------------------------------
    @functools.cached_property
    def _graph(self):
        from tera.topologies.graph import build_graph

        return build_graph(self)

    def graph(self):
        """networkx.Graph of GPUs, NVSwitches, NICs and switches (built once, cached).
        Node attribute `kind`; edge attributes `bandwidth` (bytes/s per direction) and
        `latency` (s)."""
        return self._graph

    # ---- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Canonical description with the GPU inline; from_dict(to_dict()) == self."""
        return {
            "name": self.name,
            "description": self.description,
            "gpus": self.num_gpus,
            "node": {
                "gpu": self.gpu.to_dict(),
                "gpus": self.gpus_per_node,
                "scaleup": {
                    "domain": self.scaleup_domain,
                    "uni_gbs": round(self.scaleup_bw / GB, 9),
                    "kind": self.scaleup_kind,
                    "links": self.scaleup_links,
                },
                "nics": {"count": self.nic_count, "gbps": self.nic_gbps, "kind": self.nic_kind},
                "cpu": self.cpu,
            },
            "network": self.network.to_dict(),
        }

    def digest(self) -> str:
        """sha256 of the canonical JSON of to_dict() (sources and description excluded)."""
        data = self.to_dict()
        data.pop("description")
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def describe(self) -> str:
        """One line, e.g. 'dgx-h100: 2048 x H100 SXM (256 nodes x 8), NVLink 450 GB/s, 8x400
        Gb/s IB per node, fat-tree 3 levels 1:1'."""
        su = f"{self.scaleup_name if self.scaleup_name != 'nvlink' else 'NVLink'}"
        if self.scaleup_domain > self.gpus_per_node:
            su += f" domain {self.scaleup_domain}"
        nics = f"{self.nic_count}x{_num(self.nic_gbps)} Gb/s {self.nic_kind.upper()}"
        if self.nic_kind == "loopback":
            nics = f"loopback {_num(self.nic_gbps)} Gb/s"
        return (
            f"{self.name}: {self.num_gpus} x {self.gpu.short} ({self.num_nodes} "
            f"node{'s' if self.num_nodes > 1 else ''} x "
            f"{self.gpus_per_node}), {su} {_num(round(self.scaleup_bw / GB, 3))} GB/s, "
            f"{nics} per node, {self.network.describe()}"
        )

    def resized(self, gpus: int) -> Cluster:
        """The same cluster with `gpus` GPUs (a multiple of gpus_per_node, or fewer than one
        node, which then is one partial node). A 2-level fat-tree or rail-optimized fabric
        too small for `gpus` grows a non-blocking third level, as DGX SuperPODs do beyond
        8 scalable units (hardware-facts fabrics.dgx_superpod_b200)."""
        if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus <= 0:
            raise ClusterError("gpus", f"must be a positive integer, got {gpus!r}", "use e.g. 64")
        try:
            return replace(self, num_gpus=gpus)
        except ClusterError as exc:
            net = self.network
            grow = net.kind in ("fat_tree", "rail_optimized") and net.levels == 2
            if exc.field != "gpus" or not grow or net.planes or gpus % self.gpus_per_node:
                raise
            bigger = replace(net, levels=3, oversubscription=(*net.oversubscription, 1.0))
            return replace(self, num_gpus=gpus, network=bigger)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(
        cls, data: Any, *, name: str | None = None, sources: tuple[str, ...] = ()
    ) -> Cluster:
        r = Reader(data, "")
        cname = r.str("name", required=name is None) or name
        if not cname.isprintable():  # messages quote the name: it must stay on one line
            raise ClusterError("name", f"{cname!r} is not one line of text", "rename it")
        description = r.str("description", required=False) or ""
        srcs = tuple(str(s) for s in (r.list("sources", required=False) or sources))
        num_gpus = r.positive_int("gpus", hint="add `gpus: <total GPUs>`, e.g. 64")
        node = Reader(r.mapping("node"), "node")
        gpu_value = node.raw("gpu", hint="add `gpu: h100_sxm` or an inline mapping")
        if isinstance(gpu_value, dict):
            gpu = GPU.from_mapping(gpu_value, "node.gpu")
        elif isinstance(gpu_value, str):
            gpu = get_gpu(gpu_value)
        else:
            raise ClusterError(
                "node.gpu",
                f"must be a catalog id or a mapping, got {gpu_value!r}",
                "write e.g. `gpu: h100_sxm`",
            )
        gpn = node.positive_int("gpus", hint="add `gpus: <GPUs per node>`, e.g. 8")
        su = Reader(node.mapping("scaleup", required=False) or {}, "node.scaleup")
        domain = su.positive_int("domain", default=gpn)
        su_kind = su.choice("kind", SCALEUP_KINDS, default=gpu.scaleup_kind)
        links = su.positive_int("links", default=gpu.scaleup_links)
        uni = su.positive(
            "uni_gbs",
            default=(gpu.scaleup_uni_bw / GB) or None,
            hint="give the per-GPU scale-up line rate in GB/s per direction",
        )
        if uni is None:
            raise ClusterError(
                "node.scaleup.uni_gbs",
                f"missing and GPU {gpu.id!r} has no scale-up rate",
                "give the per-GPU scale-up line rate in GB/s per direction, e.g. 450",
            )
        su.done()
        nics = Reader(node.mapping("nics"), "node.nics")
        nic_count = nics.positive_int("count", hint="add `count: <NICs per node>`, e.g. 8")
        nic_gbps = nics.positive("gbps", hint="use the NIC line rate in Gb/s such as 400")
        nic_kind = nics.choice("kind", NIC_KINDS, default="ib")
        nics.done()
        cpu = node.choice("cpu", CPU_VENDORS, default="intel")
        node.done()
        network = Network.from_mapping(r.mapping("network"))
        r.done()
        return cls(
            name=cname,
            gpu=gpu,
            gpus_per_node=gpn,
            num_gpus=num_gpus,
            scaleup_domain=domain,
            scaleup_bw=uni * GB,
            scaleup_kind=su_kind,
            scaleup_links=links,
            nic_count=nic_count,
            nic_gbps=nic_gbps,
            nic_kind=nic_kind,
            network=network,
            cpu=cpu,
            description=description,
            sources=srcs,
        )


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


def preset_names() -> list[str]:
    """Names of the built-in cluster presets (topologies/presets/*.yaml)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load(name_or_path: str | Path, gpus: int | None = None) -> Cluster:
    """A preset name or a YAML path -> Cluster; `gpus` resizes it (see Cluster.resized)."""
    path = Path(name_or_path)
    text_path = None
    if str(name_or_path) in preset_names():
        text_path = PRESET_DIR / f"{name_or_path}.yaml"
    elif path.suffix in (".yaml", ".yml") or _exists(path):
        if not _exists(path):
            raise ClusterError("cluster", f"no such file {str(path)!r}", "check the path")
        text_path = path
    else:
        import difflib

        names = preset_names()
        close = difflib.get_close_matches(str(name_or_path), names, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ClusterError(
            "cluster",
            f"unknown preset {str(name_or_path)!r}",
            f"{hint}use one of {', '.join(names)} or a path to a YAML file",
        )
    cluster = Cluster.from_dict(_read_yaml(text_path), name=text_path.stem)
    return cluster if gpus is None else cluster.resized(gpus)


def from_dict(data: dict[str, Any]) -> Cluster:
    """Build a Cluster from an already-parsed mapping (same schema as the YAML)."""
    return Cluster.from_dict(data)


def _exists(path: Path) -> bool:
    """Whether `path` names something on disk; False for a name the OS refuses (too long,
    a NUL byte), which then reads as an unknown preset."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _read_yaml(path: Path) -> Any:
    """The YAML document in `path`; a file that cannot be read (a directory, no
    permission), is not UTF-8, does not parse or nests deeper than the parser recurses is
    a ClusterError."""
    import yaml

    name = path.name if path.name.isprintable() else repr(path.name)  # one line, always
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ClusterError(
            "cluster", f"cannot read {str(path)!r}: {reason}", "check the path"
        ) from None
    except UnicodeDecodeError as exc:
        raise ClusterError(
            "yaml",
            f"{name} is not UTF-8 (byte {exc.object[exc.start]:#x} at offset {exc.start})",
            "save it as UTF-8",
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        where = f"line {line}" if line else "somewhere"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ClusterError(
            "yaml",
            f"cannot parse {name} at {where}: {problem}",
            "fix the indentation or quoting on that line",
            line=line,
        ) from None
    except RecursionError:
        raise ClusterError(
            "yaml", f"{name} nests too deeply to parse", "flatten the document"
        ) from None
