"""Calibration constants of the cost model: few, named, each with its source.

All figures come from ../shared/reference/hardware-facts.yaml (key paths given). None is
fitted to a published training run; issue 3 (cost-model fidelity) replaces these
first-version constants by calibrated ones and reports the error.
"""

from __future__ import annotations

import bisect

# Fraction of dense peak that the best-shaped torch.matmul reaches ("maximum achievable
# matmul FLOPs"): compute_efficiency.mamf_bf16[*].eff and mamf_fp8[*].eff.
MATMUL_EFFICIENCY_BF16 = {
    "ampere": 0.869,  # a100_sxm_80gb 271.2 / 312
    "hopper": 0.803,  # h100_sxm5 794.5 / 989
    "blackwell": 0.776,  # b200_hgx 1745 / 2250
    "cdna3": 0.514,  # mi300x 668.4 / 1300
}
MATMUL_EFFICIENCY_FP8 = {
    "hopper": 0.709,  # h100_sxm5 1402.6 / 1979
    "blackwell": 0.763,  # b200_hgx 3432.5 / 4500
}
DEFAULT_MATMUL_EFFICIENCY = 0.803  # an unknown arch is costed like hopper; say so

# FlashAttention-2 forward+backward, head dim 128, causal, on H100 SXM:
# compute_efficiency.attention_h100.fa2_fwd_bwd_hd128_causal (TFLOP/s at each seqlen).
# The benchmark counts causal FLOPs as half of the full S x S product, the tracer counts
# the full product, so attention time = traced FLOPs * CAUSAL_FRACTION / rate.
ATTENTION_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
ATTENTION_TFLOPS_H100 = (163, 221, 265, 294, 308, 328)
H100_BF16_PEAK_TFLOPS = 989.4  # gpus[h100_sxm5].bf16_tflops
CAUSAL_FRACTION = 0.5

# Memory-bound operators (norms, activations, routing, permutation) stream at the HBM
# rate. No measured achievable fraction is in the reference data yet: peak, uncalibrated.
HBM_EFFICIENCY = 1.0

# Bytes the Adam step touches per parameter of the local shard with bf16 weights and
# fp32 master weights, grads and moments: read master, m, v, grad (16), write master,
# m, v (12), write the bf16 weight (2). Byte accounting, not a measurement.
ADAM_BYTES_PER_PARAM = 30


def matmul_efficiency(arch: str, fp8: bool) -> float:
    table = MATMUL_EFFICIENCY_FP8 if fp8 else MATMUL_EFFICIENCY_BF16
    return table.get(arch, MATMUL_EFFICIENCY_BF16.get(arch, DEFAULT_MATMUL_EFFICIENCY))


def attention_efficiency(seq_len: int) -> float:
    """Fraction of bf16 peak FlashAttention-2 reaches at this sequence length (the H100
    curve, applied to every GPU as a fraction of its own peak), clamped at the table's
    ends and linearly interpolated between its points."""
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
