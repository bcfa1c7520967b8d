"""Grouped GEMM: one launch multiplies every expert's rows by that expert's weights.

Shape legend: R routed rows, D input width, F output width, E experts.

  grouped_gemm(x_RD, w_EDF, offsets_E) -> y_RF
      y_RF[r] = x_RD[r] @ w_EDF[e] for the expert e owning row r: expert e owns rows
      offsets_E[e-1]..offsets_E[e] (from 0 for e = 0; int32 ends, the `offs` of
      torch._grouped_mm). Invariant: offsets_E is non-decreasing and offsets_E[-1] = R.
      An expert may own no rows. Inputs bf16, fp16 or fp32; products accumulate in fp32
      and y_RF has the input dtype.

Backward: dx_RD is the same grouped GEMM of dy_RF with each w_EDF[e] transposed (the
kernel takes strides, so the transpose is a view); dw_EDF[e] = x_e^T dy_e over expert
e's rows, zero for an expert with none.

The forward kernel numbers row tiles expert by expert (expert e has ceil(count_e /
BLOCK_M) of them) and launches an upper bound, ceil(R / BLOCK_M) + E row tiles; each
program finds its expert from offsets_E with a cumulative sum in registers, so nothing is
copied to the host and no schedule is precomputed, and programs past the last tile exit.
Row tiles go in groups of GROUP_M over the columns so that neighbouring programs share
weight and input tiles in L2 (the grouped ordering of Triton's matmul tutorial).

The interpreter (TRITON_INTERPRET=1) multiplies bf16 wrongly, so there the kernels convert
their tiles to fp32 before tl.dot; bf16 and fp16 products are exact in fp32, so this is the
GPU's arithmetic (tensor cores accumulate in fp32).
"""

from __future__ import annotations

import functools

import torch

from tera.kernels._triton import INTERPRET, jit, next_power_of_2, tl, triton

DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # the kernels' and torch._grouped_mm's


# -- Triton -----------------------------------------------------------------------------
@jit
def _grouped_mm_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    offsets_ptr,
    N,
    KD,
    E,
    stride_xr,
    stride_xk,
    stride_we,
    stride_wk,
    stride_wn,
    stride_yr,
    stride_yn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """y[r] = x[r] @ w[e] for the rows r of one (expert, BLOCK_M rows, BLOCK_N columns) tile."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_m = tl.num_programs(0) // tiles_n
    in_group = GROUP_M * tiles_n
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m

    experts = tl.arange(0, BLOCK_E)
    in_e = experts < E
    end_E = tl.load(offsets_ptr + experts, mask=in_e, other=0)
    start_E = tl.load(offsets_ptr + experts - 1, mask=in_e & (experts > 0), other=0)
    tiles_E = tl.where(in_e, tl.cdiv(end_E - start_E, BLOCK_M), 0)
    tile_end_E = tl.cumsum(tiles_E, axis=0)
    e = tl.sum((tile_end_E <= pid_m).to(tl.int32))
    if e >= E:  # an upper-bound program with no tile
        return
    mine = experts == e
    first_tile = tl.sum(tl.where(mine, tile_end_E - tiles_E, 0))
    row_start = tl.sum(tl.where(mine, start_E, 0)) + (pid_m - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(mine, end_E, 0))

    rows = row_start + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    in_r = rows < row_end
    in_n = cols < N
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xr + ks[None, :] * stride_xk
    w_ptrs = w_ptr + e.to(tl.int64) * stride_we  # E*D*F can pass 2**31 elements
    w_ptrs += ks[:, None] * stride_wk + cols[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, KD, BLOCK_K):
        in_k = k0 + ks < KD
        x = tl.load(x_ptrs, mask=in_r[:, None] & in_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=in_k[:, None] & in_n[None, :], other=0.0)
        if DOT_FP32:
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_yr + cols[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=in_r[:, None] & in_n[None, :])


@jit
def _grouped_mm_weight_grad_kernel(
    x_ptr,
    dy_ptr,
    dw_ptr,
    offsets_ptr,
    M,
    N,
    stride_xr,
    stride_xm,
    stride_dyr,
    stride_dyn,
    stride_we,
    stride_wm,
    stride_wn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dw[e] = x_e^T @ dy_e for one (expert, BLOCK_M, BLOCK_N) tile of dw, summing over the
    expert's rows BLOCK_K at a time; an expert without rows gets zeros."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    e = pid // (tiles_m * tiles_n)
    pid_m = (pid % (tiles_m * tiles_n)) // tiles_n
    pid_n = pid % tiles_n
    start = tl.load(offsets_ptr + e - 1, mask=e > 0, other=0)
    end = tl.load(offsets_ptr + e)

    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rs = tl.arange(0, BLOCK_K)
    in_m = ms < M
    in_n = ns < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rows = (r0 + rs).to(tl.int64)
        in_r = rows < end
        xt = tl.load(
            x_ptr + rows[None, :] * stride_xr + ms[:, None] * stride_xm,
            mask=in_m[:, None] & in_r[None, :],
            other=0.0,
        )
        dy = tl.load(
            dy_ptr + rows[:, None] * stride_dyr + ns[None, :] * stride_dyn,
            mask=in_r[:, None] & in_n[None, :],
            other=0.0,
        )
        if DOT_FP32:
            xt, dy = xt.to(tl.float32), dy.to(tl.float32)
        acc = tl.dot(xt, dy, acc, input_precision=PRECISION)
    dw_ptrs = dw_ptr + e.to(tl.int64) * stride_we
    dw_ptrs += ms[:, None] * stride_wm + ns[None, :] * stride_wn
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=in_m[:, None] & in_n[None, :])


# -- launch configuration ------------------------------------------------------------------
# The interpreter's cost is per program and per tile operation: small tiles keep the tests'
# multi-tile, multi-expert shapes quick while still crossing tile edges.
_INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}


# Tiles (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps) per kind of tl.dot, all of which
# bench/kernels_compile.py checks to compile for sm_90 without spilling registers and
# with software-pipelined loads (bench/results/kernels-sm90-compile.md).
_TILES = {
    # bf16 and fp16 on the tensor cores (wgmma): Hopper-sized tiles, as in Triton's matmul
    # tutorial; fewer rows per tile serve experts with few rows.
    "16-bit": [
        (128, 256, 64, 3, 8),
        (128, 128, 64, 4, 8),
        (128, 128, 64, 3, 4),
        (64, 256, 64, 4, 4),
        (64, 128, 64, 4, 4),
    ],
    # fp32 as TF32 on the tensor cores: the same tiles with half the K, so that a stage
    # holds the same bytes of 4-byte operands and the stages fit in shared memory.
    "tf32": [
        (128, 256, 32, 3, 8),
        (128, 128, 32, 4, 8),
        (128, 128, 32, 3, 4),
        (64, 256, 32, 3, 8),
        (64, 128, 32, 4, 4),
    ],
    # fp32 in IEEE arithmetic runs on the CUDA cores, which hold every operand of the
    # product in registers: the tensor-core tiles spill kilobytes per thread there.
    "ieee": [
        (128, 128, 8, 3, 8),
        (128, 64, 16, 3, 8),
        (64, 64, 32, 3, 4),
        (64, 64, 16, 4, 4),
    ],
}


@functools.cache
def _tuned(kernel_name: str, dot: str):
    """The kernel under Triton's autotuner (GPU only) over the tiles of its kind of dot,
    keyed by its width arguments and, as Triton always adds, the tensors' dtypes."""
    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_stages=s, num_warps=w)
        for m, n, k, s, w in _TILES[dot]
    ]
    if kernel_name == "forward":
        return triton.autotune(configs, key=["N", "KD"])(_grouped_mm_kernel)
    return triton.autotune(configs, key=["M", "N"])(_grouped_mm_weight_grad_kernel)


def _precision(dtype: torch.dtype) -> tuple[bool, str]:
    """(DOT_FP32, PRECISION) of tl.dot: fp32 follows torch's switch for TF32 matmuls, bf16
    and fp16 go to the tensor cores as they are (Triton's default precision names TF32 but
    only applies to fp32), and the interpreter multiplies in fp32."""
    if INTERPRET:
        return True, "ieee"
    if dtype == torch.float32:
        return True, "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return False, "tf32"


def _dot_kind(dtype: torch.dtype, precision: str) -> str:
    """The key of _TILES for operands of `dtype` multiplied at `precision`."""
    if dtype != torch.float32:
        return "16-bit"
    return precision


def _launch_forward(x_RD, w_EDF, offsets_E) -> torch.Tensor:
    R, KD = x_RD.shape
    E, _, N = w_EDF.shape
    y_RF = torch.empty(R, N, dtype=x_RD.dtype, device=x_RD.device)
    if R == 0 or N == 0:
        return y_RF
    dot_fp32, precision = _precision(x_RD.dtype)
    args = (x_RD, w_EDF, y_RF, offsets_E, N, KD, E, *x_RD.stride(), *w_EDF.stride(), *y_RF.stride())
    options = dict(BLOCK_E=next_power_of_2(E), GROUP_M=8, DOT_FP32=dot_fp32, PRECISION=precision)

    def grid(meta):
        return ((-(-R // meta["BLOCK_M"]) + E) * -(-N // meta["BLOCK_N"]),)

    if INTERPRET:
        _grouped_mm_kernel[grid(_INTERPRETER_BLOCKS)](*args, **options, **_INTERPRETER_BLOCKS)
    else:
        _tuned("forward", _dot_kind(x_RD.dtype, precision))[grid](*args, **options)
    return y_RF


def _launch_weight_grad(x_RD, dy_RF, offsets_E, experts: int) -> torch.Tensor:
    M, N = x_RD.shape[1], dy_RF.shape[1]
    dw_EDF = torch.empty(experts, M, N, dtype=x_RD.dtype, device=x_RD.device)
    if M == 0 or N == 0:
        return dw_EDF
    dot_fp32, precision = _precision(x_RD.dtype)
    args = (x_RD, dy_RF, dw_EDF, offsets_E, M, N, *x_RD.stride(), *dy_RF.stride(), *dw_EDF.stride())
    options = dict(DOT_FP32=dot_fp32, PRECISION=precision)

    def grid(meta):
        return (experts * -(-M // meta["BLOCK_M"]) * -(-N // meta["BLOCK_N"]),)

    if INTERPRET:
        blocks = _INTERPRETER_BLOCKS
        _grouped_mm_weight_grad_kernel[grid(blocks)](*args, **options, **blocks)
    else:
        _tuned("weight_grad", _dot_kind(x_RD.dtype, precision))[grid](*args, **options)
    return dw_EDF


def _check(x_RD: torch.Tensor, w_EDF: torch.Tensor, offsets_E: torch.Tensor) -> None:
    if x_RD.dim() != 2 or w_EDF.dim() != 3 or x_RD.shape[1] != w_EDF.shape[1]:
        raise ValueError(
            f"need x_RD (R, D) and w_EDF (E, D, F), got {tuple(x_RD.shape)} and "
            f"{tuple(w_EDF.shape)}"
        )
    if offsets_E.shape != (w_EDF.shape[0],) or offsets_E.dtype != torch.int32:
        raise ValueError(f"offsets_E must be int32 of shape ({w_EDF.shape[0]},)")
    if x_RD.dtype != w_EDF.dtype:
        raise ValueError(f"x_RD is {x_RD.dtype} but w_EDF is {w_EDF.dtype}")


def grouped_gemm_triton(x_RD, w_EDF, offsets_E) -> torch.Tensor:
    """The Triton grouped GEMM (CUDA tensors, or CPU ones under TRITON_INTERPRET=1)."""
    _check(x_RD, w_EDF, offsets_E)
    if x_RD.dtype not in DTYPES:
        raise ValueError(f"grouped_gemm takes bf16, fp16 or fp32, not {x_RD.dtype}")
    return GroupedGemmFunction.apply(x_RD, w_EDF, offsets_E)


class GroupedGemmFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_RD, w_EDF, offsets_E):
        offsets_E = offsets_E.contiguous()
        ctx.save_for_backward(x_RD, w_EDF, offsets_E)
        return _launch_forward(x_RD, w_EDF, offsets_E)

    @staticmethod
    def backward(ctx, dy_RF):
        x_RD, w_EDF, offsets_E = ctx.saved_tensors
        dx_RD = dw_EDF = None
        if ctx.needs_input_grad[0]:
            dx_RD = _launch_forward(dy_RF, w_EDF.transpose(1, 2), offsets_E)
        if ctx.needs_input_grad[1]:
            dw_EDF = _launch_weight_grad(x_RD, dy_RF, offsets_E, w_EDF.shape[0])
        return dx_RD, dw_EDF, None


# -- torch reference -----------------------------------------------------------------------
def _grouped_mm_applies(x_RD: torch.Tensor, w_EDF: torch.Tensor) -> bool:
    """Whether torch._grouped_mm takes these operands: bf16, fp16 or fp32 (bf16 alone on
    CUDA), with every stride but the innermost a multiple of 16 bytes."""
    if not hasattr(torch, "_grouped_mm") or x_RD.dtype not in DTYPES:
        return False
    if x_RD.is_cuda and x_RD.dtype != torch.bfloat16:
        return False
    size = x_RD.element_size()
    return all(s * size % 16 == 0 for s in (*x_RD.stride(), *w_EDF.stride()) if s != 1)


def grouped_gemm_reference(x_RD, w_EDF, offsets_E) -> torch.Tensor:
    """torch._grouped_mm where it applies (every preset's widths are multiples of 8, which
    it needs), else one matmul per expert, which reads the offsets on the host and so does
    not run on `meta` tensors."""
    _check(x_RD, w_EDF, offsets_E)
    if _grouped_mm_applies(x_RD, w_EDF):
        return torch._grouped_mm(x_RD, w_EDF, offs=offsets_E)
    ends = offsets_E.tolist()
    starts = [0, *ends[:-1]]
    ws = w_EDF.unbind(0)  # one unbind: indexing w[e] per expert builds E full-size gradients
    return torch.cat([x_RD[s:e] @ w for s, e, w in zip(starts, ends, ws, strict=True)])
