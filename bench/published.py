"""Published training runs as tera inputs: model preset, cluster, layout, batch, precision.

Reads ../shared/reference/published-runs.yaml and turns each point into a `Case` that the
cost model can evaluate, or into the reason it cannot (`Unusable`). Every default or
substitution made for a field the source leaves open is listed here, once:

- zero: a missing value is 1 for Megatron-family runs (Megatron-Core, Megatron-Bridge and
  NeMo enable the distributed optimizer in their performance recipes) and 3 for torchtitan
  (FSDP2); micro-batch: a missing value is 1.
- recompute: "full" and "selective"/op-level SAC map to tera's modes; missing means none.
- precision: BF16, FP16 and mixed runs are costed as bf16 (same tensor-core rate); every
  FP8 flavour (tensorwise, rowwise, blockwise, MXFP8) as fp8. NVFP4 is not modelled.
- hardware: each `hardware.ref` maps to a cluster preset; the GPU or the NICs are swapped
  where the source names different ones (see HARDWARE). GB300 and B300 systems have no
  entry in the hardware facts and are skipped.
- measured tokens/s/GPU: the point's own figure where it has one; otherwise it is derived
  from its reported model TFLOP/s per GPU (or MFU times the stated peak) divided by tera's
  traced model FLOPs per token, the same FLOPs the prediction uses, so the error in tokens/s
  equals the error in model TFLOP/s.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "published-runs.yaml"


@dataclass(frozen=True)
class Hardware:
    preset: str
    gpu: str | None = None  # catalog id replacing the preset's GPU
    hbm_gb: float | None = None  # HBM size replacing the GPU's (same chip, other memory)
    nics: tuple[int, float, str] | None = None  # (per node, Gb/s each, kind)


HARDWARE = {
    "selene-a100": Hardware("dgx-a100"),
    "a100-unknown": Hardware("dgx-a100"),
    # Jean Zay: 4 Omni-Path 100 Gb/s links per node (bigscience tr11 README)
    "jeanzay-a100": Hardware("dgx-a100", nics=(4, 100.0, "ib")),
    "eos-h100": Hardware("dgx-h100"),
    "dgx-h100": Hardware("dgx-h100"),
    "zoo-h100": Hardware("dgx-h100"),
    "h100-unknown": Hardware("dgx-h100"),
    # Llama 3 paper Sec 3.3.1: RoCE 400 Gb/s per GPU
    "meta-h100-roce": Hardware("dgx-h100", nics=(8, 400.0, "roce")),
    # torchtitan's H100 96 GB HBM2e at 500 W: costed as an H100 SXM with 96 GB
    "meta-h100-96gb-500w": Hardware("dgx-h100", hbm_gb=96),
    "h800-deepseek": Hardware("hgx-h800"),
    "h800-kimi": Hardware("hgx-h800"),
    "h200-whitefiber": Hardware("dgx-h200"),
    "dgx-b200": Hardware("dgx-b200"),
    "dgx-gb200": Hardware("gb200-nvl72"),
}


@dataclass(frozen=True)
class Case:
    id: str
    group: str
    model: str
    hardware: Hardware
    gpus: int
    layout: str
    global_batch: int
    seq_len: int
    precision: str
    recompute_published: bool  # False: the source leaves recompute open
    verified: bool
    measured_tokens: float | None  # tokens/s/GPU as published, None when derived
    measured_tflops: float | None  # model TFLOP/s/GPU to derive it from
    note: str = ""


@dataclass(frozen=True)
class Unusable:
    id: str
    group: str
    reason: str


def _precision(text: str | None) -> str | None:
    t = (text or "bf16").lower()
    if "fp4" in t:
        return None
    if "fp8" in t or "float8" in t:
        return "fp8"
    return "bf16"


def _recompute(text: str | None) -> str:
    t = (text or "").lower()
    if t.startswith("full") or t.startswith("yes"):
        return "full"
    if "selective" in t or "sac" in t:
        return "selective"
    return "none"


def _zero(point: dict) -> int:
    z = point["layout"].get("zero")
    if z is not None:
        return int(z)
    return 3 if point["group"] == "torchtitan" else 1


def to_case(point: dict) -> Case | Unusable:
    pid, group = point["id"], point["group"]
    L, m, hw = point["layout"], point["measured"], point["hardware"]

    def no(reason: str) -> Unusable:
        return Unusable(pid, group, reason)

    hardware = HARDWARE.get(hw.get("ref"))
    if hardware is None:
        return no(f"no hardware facts for {hw.get('ref')}")
    precision = _precision(point.get("precision"))
    if precision is None:
        return no(f"precision {point.get('precision')} not modelled")
    tokens = m.get("tokens_per_sec_per_gpu")
    tflops = m.get("tflops_per_gpu")
    if tokens is None and m.get("mfu") and hw.get("peak_bf16_tflops"):
        tflops = m["mfu"] * hw["peak_bf16_tflops"]  # model FLOPs (SC21 T2: 0.75 * HFU)
    if tokens is None and tflops is None:
        return no("no measured throughput")
    gpus = hw.get("n_gpus")
    tp, pp, cp = (L.get(k) or 1 for k in ("tp", "pp", "cp"))
    if gpus is None or L.get("tp") is None or L.get("dp") is None:
        return no("layout not fully published")
    if L.get("seq_len") is None or L.get("global_batch") is None:
        return no("batch or sequence length not published")
    ep, etp, vpp = L.get("ep") or 1, L.get("etp") or 1, L.get("vpp") or 1
    parts = [f"tp={tp}", f"pp={pp}", f"cp={cp}", f"ep={ep}", f"etp={etp}", f"dp={L['dp']}"]
    if vpp > 1:
        parts += [f"vpp={vpp}", "schedule=interleaved"]
    parts += [
        f"zero={_zero(point)}",
        f"mbs={L.get('micro_batch') or 1}",
        f"recompute={_recompute(L.get('recompute'))}",
    ]
    return Case(
        id=pid,
        group=group,
        model=point["model"]["ref"],
        hardware=hardware,
        gpus=int(gpus),
        layout=",".join(parts),
        global_batch=int(L["global_batch"]),
        seq_len=int(L["seq_len"]),
        precision=precision,
        recompute_published=L.get("recompute") is not None,
        verified=not point.get("unverified", False),
        measured_tokens=tokens,
        measured_tflops=None if tokens is not None else tflops,
    )


def load_cases(path: Path = REFERENCE) -> list[Case | Unusable]:
    points = yaml.safe_load(path.read_text())["points"]
    return [to_case(p) for p in points]


def cluster_for(case: Case):
    """The case's cluster preset, sized and with the substitutions of its Hardware."""
    from tera.topologies import load
    from tera.topologies.catalog import get_gpu

    hw = case.hardware
    cluster = load(hw.preset, gpus=case.gpus)
    gpu = get_gpu(hw.gpu) if hw.gpu else cluster.gpu
    if hw.hbm_gb:
        gpu = dataclasses.replace(gpu, hbm_bytes=hw.hbm_gb * 1e9)
    changes = {"gpu": gpu}
    if hw.nics:
        changes.update(nic_count=hw.nics[0], nic_gbps=hw.nics[1], nic_kind=hw.nics[2])
    return dataclasses.replace(cluster, **changes)
