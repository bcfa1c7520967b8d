"""Calibration of the cost model: a few named constants per GPU generation and kernel family.

Two kinds of constant live here:

* Fixed facts, copied from ../shared/reference/hardware-facts.yaml (key paths given): the
  FlashAttention-2 throughput curve and the bytes an Adam step touches.
* Fitted efficiencies, stored in calibration.yaml next to this file and written by
  `python bench/fidelity.py --fit`, which minimises the error of the cost model on the
  verified published training runs of ../shared/reference/published-runs.yaml. The file
  records which groups of runs the fit saw. Nothing is per run or per model: every
  constant applies to every layout on a GPU generation. `Calibration.prior()` is the
  unfitted starting point: best-shape matmul efficiency (MAMF) from the hardware facts,
  everything else ideal (full HBM rate, no overlap of communication).

Fitted constants (the names in calibration.yaml):
  gemm_efficiency     fraction of the dense peak that a training step's GEMMs reach, per
                      "<arch>/<bf16|fp8>"; an arch without an entry uses its bf16 figure,
                      an unknown arch the hopper one (prior: hardware-facts
                      compute_efficiency.mamf_bf16 / mamf_fp8)
  attention_scale     FlashAttention-class kernel rate as a multiple of the FA2 H100 curve
                      below, which is applied to every GPU as a fraction of its bf16 peak
  hbm_efficiency      fraction of the HBM bandwidth memory-bound operators reach
  expert_rows_half    rows per local expert at which a grouped expert GEMM runs at half its
                      large-shape efficiency (efficiency * rows / (rows + half))
  tp_exposed, ep_exposed, dp_exposed
                      fraction of tensor-parallel, expert all-to-all and data-parallel
                      communication left on the critical path after the overlap
                      Megatron-LM/Transformer Engine achieve (1.0: none hidden)
"""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CALIBRATION_FILE = Path(__file__).with_name("calibration.yaml")

# Best-shape torch.matmul as a fraction of dense peak ("maximum achievable matmul FLOPs"):
# hardware-facts compute_efficiency.mamf_bf16[*].eff and mamf_fp8[*].eff.
MAMF = {
    "ampere/bf16": 0.869,  # a100_sxm_80gb 271.2 / 312
    "hopper/bf16": 0.803,  # h100_sxm5 794.5 / 989
    "hopper/fp8": 0.709,  # h100_sxm5 1402.6 / 1979
    "blackwell/bf16": 0.776,  # b200_hgx 1745 / 2250
    "blackwell/fp8": 0.763,  # b200_hgx 3432.5 / 4500
    "cdna3/bf16": 0.514,  # mi300x 668.4 / 1300
}
DEFAULT_ARCH = "hopper"  # an unknown arch is costed like hopper

# FlashAttention-2 forward+backward, head dim 128, causal, on H100 SXM:
# compute_efficiency.attention_h100.fa2_fwd_bwd_hd128_causal (TFLOP/s at each seqlen).
# The benchmark counts causal FLOPs as half of the full S x S product, the tracer counts
# the full product, so attention time = traced FLOPs * CAUSAL_FRACTION / rate.
ATTENTION_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
ATTENTION_TFLOPS_H100 = (163, 221, 265, 294, 308, 328)
H100_BF16_PEAK_TFLOPS = 989.4  # gpus[h100_sxm5].bf16_tflops
CAUSAL_FRACTION = 0.5

# Bytes the Adam step touches per parameter of the local shard with bf16 weights and
# fp32 master weights, grads and moments: read master, m, v, grad (16), write master,
# m, v (12), write the bf16 weight (2). Byte accounting, not a measurement.
ADAM_BYTES_PER_PARAM = 30


class CalibrationError(ValueError):
    """calibration.yaml is malformed: names the key and the fix."""


@dataclass(frozen=True)
class Calibration:
    gemm_efficiency: dict[str, float] = field(default_factory=lambda: dict(MAMF))
    attention_scale: float = 1.0
    hbm_efficiency: float = 1.0
    expert_rows_half: float = 0.0
    tp_exposed: float = 1.0
    ep_exposed: float = 1.0
    dp_exposed: float = 1.0
    fitted_on: tuple[str, ...] = ()  # groups of published runs the fit saw; () for the prior

    # Scalars the fit adjusts, in order (gemm_efficiency entries are fitted too).
    SCALARS = (
        "attention_scale",
        "hbm_efficiency",
        "expert_rows_half",
        "tp_exposed",
        "ep_exposed",
        "dp_exposed",
    )

    @classmethod
    def prior(cls) -> Calibration:
        return cls()

    @classmethod
    def load(cls, path: Path | str = CALIBRATION_FILE) -> Calibration:
        """Read a calibration file; a missing file gives the prior."""
        path = Path(path)
        if not path.exists():
            return cls.prior()
        data = yaml.safe_load(path.read_text()) or {}
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: dict, where: str = "calibration") -> Calibration:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"comment", "objective", "error"})
        if unknown:
            raise CalibrationError(f"{where}: unknown key {unknown[0]!r}; use {sorted(known)}")
        values: dict = {}
        gemm = dict(MAMF)
        for key, value in (data.get("gemm_efficiency") or {}).items():
            if "/" not in key or key.split("/")[1] not in ("bf16", "fp8"):
                raise CalibrationError(f"{where}: gemm_efficiency key {key!r}; use <arch>/bf16|fp8")
            gemm[key] = _fraction(where, f"gemm_efficiency.{key}", value, 1.0)
        values["gemm_efficiency"] = gemm
        for name in cls.SCALARS:
            if name in data:
                limit = None if name in ("expert_rows_half", "attention_scale") else 1.0
                values[name] = _fraction(where, name, data[name], limit)
        values["fitted_on"] = tuple(data.get("fitted_on") or ())
        return cls(**values)

    def to_dict(self) -> dict:
        out = {"gemm_efficiency": dict(sorted(self.gemm_efficiency.items()))}
        out.update({name: getattr(self, name) for name in self.SCALARS})
        out["fitted_on"] = list(self.fitted_on)
        return out

    def save(self, path: Path | str = CALIBRATION_FILE, comment: str = "") -> None:
        header = "".join(f"# {line}\n" for line in comment.splitlines())
        Path(path).write_text(header + yaml.safe_dump(self.to_dict(), sort_keys=False))

    def matmul_efficiency(self, arch: str, fp8: bool) -> float:
        table = self.gemm_efficiency
        bf16 = table.get(f"{arch}/bf16", table[f"{DEFAULT_ARCH}/bf16"])
        return table.get(f"{arch}/fp8", bf16) if fp8 else bf16

    def expert_gemm_factor(self, rows_per_expert: float) -> float:
        """Fraction of the large-shape GEMM rate a grouped GEMM with this many rows per
        expert reaches (1.0 when expert_rows_half is 0)."""
        if rows_per_expert <= 0:
            return 1.0
        return rows_per_expert / (rows_per_expert + self.expert_rows_half)

    def attention_efficiency(self, seq_len: int) -> float:
        """Fraction of bf16 peak a FlashAttention-class kernel reaches at this sequence
        length: the FA2 H100 curve (clamped at the table's ends, linear between its
        points) times attention_scale."""
        return _fa2_fraction(seq_len) * self.attention_scale


def _fa2_fraction(seq_len: int) -> float:
    xs, ys = ATTENTION_SEQLENS, ATTENTION_TFLOPS_H100
    if seq_len <= xs[0]:
        tflops = ys[0]
    elif seq_len >= xs[-1]:
        tflops = ys[-1]
    else:
        i = bisect.bisect_right(xs, seq_len)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        tflops = y0 + (y1 - y0) * (seq_len - x0) / (x1 - x0)
    return tflops / H100_BF16_PEAK_TFLOPS


def _fraction(where: str, name: str, value, limit: float | None) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise CalibrationError(f"{where}: {name} must be a number >= 0, got {value!r}")
    if limit is not None and value > limit:
        raise CalibrationError(f"{where}: {name} = {value} exceeds {limit}; it is a fraction")
    return float(value)
