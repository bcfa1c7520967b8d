"""The GPU catalog: catalog.yaml as frozen `GPU` records in SI units.

Invariants:
- Units inside Python are FLOP/s, bytes and bytes/s (per direction); catalog.yaml is written
  in TFLOP/s, GB and GB/s and converted here, once.
- Every number comes from ../shared/reference/hardware-facts.yaml (`facts_id` names the
  entry) except the measured `cpu` entry; tests/topologies/test_clusters.py checks that.
- `catalog()` maps canonical ids to GPUs; `get_gpu` also accepts the aliases ("H100").
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tera.topologies.errors import ClusterError

CATALOG_PATH = Path(__file__).parent / "catalog.yaml"

TERA = 1e12
GIGA = 1e9

SCALEUP_KINDS = ("switch", "mesh", "pcie", "loopback")


@dataclass(frozen=True)
class GPU:
    """One accelerator. Peak rates are dense (no 2:4 sparsity).

    scaleup_uni_bw is the line rate per GPU per direction into its scale-up fabric (for a
    mesh, the sum over all peer links); nccl_link_bw is what NCCL's topology model counts
    for one of its `scaleup_links` links, None where NCCL has no constant.
    """

    id: str
    name: str
    arch: str
    bf16_flops: float
    fp8_flops: float | None
    tf32_flops: float | None
    hbm_bytes: float
    hbm_bw: float
    scaleup_uni_bw: float
    tdp_w: float | None
    source: str
    short: str = ""
    scaleup_tech: str = ""
    scaleup_kind: str = "switch"
    scaleup_links: int = 1
    nccl_link_bw: float | None = None
    aliases: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_mapping(cls, data: dict[str, Any], where: str = "node.gpu") -> GPU:
        """Build a GPU from catalog-style units (TFLOP/s, GB, GB/s). Required keys: name,
        bf16_tflops, hbm_gb, hbm_gbs; the rest default (scale-up from `scaleup`)."""
        from tera.topologies.schema import Reader

        r = Reader(data, where)
        su = r.mapping("scaleup", required=False) or {}
        sr = Reader(su, f"{where}.scaleup")
        gpu_id = r.str("id", required=False) or r.str("name")
        bf16 = r.positive("bf16_tflops")
        kind = sr.choice("kind", SCALEUP_KINDS, default="switch")
        links = sr.positive_int("links", default=1)
        uni = sr.positive("uni_gbs", default=None)
        nccl = sr.positive("nccl_link_gbs", default=None)
        tech = sr.str("tech", required=False) or ""
        sr.done()
        gpu = cls(
            id=gpu_id,
            name=r.str("name", required=False) or gpu_id,
            arch=r.str("arch", required=False) or "unknown",
            bf16_flops=bf16 * TERA,
            fp8_flops=_scaled(r.positive("fp8_tflops", default=None), TERA),
            tf32_flops=_scaled(r.positive("tf32_tflops", default=None), TERA),
            hbm_bytes=r.positive("hbm_gb") * GIGA,
            hbm_bw=r.positive("hbm_gbs") * GIGA,
            scaleup_uni_bw=(uni or 0.0) * GIGA,
            tdp_w=r.positive("tdp_w", default=None),
            source=r.str("source", required=False) or "inline in the cluster description",
            short=r.str("short", required=False) or r.str("name", required=False) or gpu_id,
            scaleup_tech=tech,
            scaleup_kind=kind,
            scaleup_links=links,
            nccl_link_bw=_scaled(nccl, GIGA),
            aliases=tuple(r.list("aliases", required=False) or ()),
        )
        r.ignore("facts_id")
        r.done()
        return gpu

    def to_dict(self) -> dict[str, Any]:
        """Catalog-style mapping (TFLOP/s, GB, GB/s); GPU.from_mapping inverts it."""
        return {
            "id": self.id,
            "name": self.name,
            "short": self.short,
            "arch": self.arch,
            "bf16_tflops": _round(self.bf16_flops / TERA),
            "fp8_tflops": None if self.fp8_flops is None else _round(self.fp8_flops / TERA),
            "tf32_tflops": None if self.tf32_flops is None else _round(self.tf32_flops / TERA),
            "hbm_gb": _round(self.hbm_bytes / GIGA),
            "hbm_gbs": _round(self.hbm_bw / GIGA),
            "scaleup": {
                "tech": self.scaleup_tech,
                "kind": self.scaleup_kind,
                "links": self.scaleup_links,
                "uni_gbs": _round(self.scaleup_uni_bw / GIGA) or None,
                "nccl_link_gbs": None
                if self.nccl_link_bw is None
                else _round(self.nccl_link_bw / GIGA),
            },
            "tdp_w": self.tdp_w,
            "source": self.source,
        }


def _scaled(value: float | None, unit: float) -> float | None:
    return None if value is None else value * unit


def _round(value: float) -> float:
    """Stable decimal for to_dict: x/1e12 can print 989.4000000000001."""
    return round(value, 9)


@functools.lru_cache(maxsize=1)
def _load() -> tuple[dict[str, GPU], dict[str, str]]:
    import yaml

    entries = yaml.safe_load(CATALOG_PATH.read_text())
    gpus: dict[str, GPU] = {}
    names: dict[str, str] = {}
    for entry in entries:
        gpu = GPU.from_mapping(entry, where=f"catalog.{entry.get('id')}")
        gpus[gpu.id] = gpu
        for name in (gpu.id, *gpu.aliases):
            names[name] = gpu.id
            names[name.lower()] = gpu.id
    return gpus, names


def catalog() -> dict[str, GPU]:
    """Canonical GPU id -> GPU, in catalog order."""
    return dict(_load()[0])


def facts_ids() -> dict[str, str | None]:
    """Canonical GPU id -> its hardware-facts.yaml `gpus[].id` (None for measured entries)."""
    import yaml

    return {e["id"]: e.get("facts_id") for e in yaml.safe_load(CATALOG_PATH.read_text())}


def get_gpu(name: str, where: str = "node.gpu") -> GPU:
    """Look a GPU up by id or alias; unknown names raise ClusterError with close matches."""
    gpus, names = _load()
    key = names.get(name) or names.get(str(name).lower())
    if key is None:
        import difflib

        close = difflib.get_close_matches(str(name), sorted(gpus), n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ClusterError(
            where,
            f"unknown GPU {name!r}",
            f"{hint}use one of {', '.join(gpus)} or an inline mapping with name, "
            "bf16_tflops, hbm_gb and hbm_gbs",
        )
    return gpus[key]
