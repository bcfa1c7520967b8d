"""Permute tokens into expert-contiguous rows, and unpermute: the weighted sum back.

Shape legend: T tokens, D model width, E experts, K top-k, R routed rows (T*K when
dropless, fewer when a capacity drops some).

  routing_map(expert_idx_TK, counts_E, capacity) -> row_TK, offsets_E
      row_TK[t, k]  the row holding token t's k-th choice, or -1 when it was dropped
      offsets_E[e]  end of expert e's rows: expert e owns rows offsets_E[e-1]..offsets_E[e]
                    (from 0 for e = 0), so offsets_E[-1] = R. int32, the `offs` of
                    torch._grouped_mm and of tera's grouped GEMM.
  permute(x_TD, row_TK, R) -> x_RD           x_RD[row_TK[t, k]] = x_TD[t]
  unpermute(y_RD, row_TK, weight_TK) -> y_TD y_TD[t] = sum of weight_TK[t, k] *
                                             y_RD[row_TK[t, k]] over kept k, in fp32

Invariants of the map: an expert's rows are in token order (the sort is stable), so a
capacity keeps each expert's first `capacity` tokens, as GShard does (arXiv 2006.16668);
every row 0..R-1 is the image of exactly one kept (t, k), so the kernels write every row
and every token exactly once, with no atomics. The map is a stable sort in torch ops; the
kernels move the D-wide rows, which is where the bytes are.

The two data ops are adjoint: the backward of permute is unpermute with unit weights, and
the backward of unpermute writes weight * dy into the rows and dots dy with the rows for
the weights' gradient (one fused kernel).
"""

from __future__ import annotations

import torch

from tera.kernels._triton import jit, next_power_of_2, tl


# -- Triton -----------------------------------------------------------------------------
@jit
def _permute_kernel(
    x_ptr,
    row_ptr,
    out_ptr,
    T,
    D,
    K,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[row_TK[t, k]] = x[t]: each token row is read once and written K times."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_t = tokens < T
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        in_d = cols < D
        x = tl.load(
            x_ptr + tokens[:, None].to(tl.int64) * D + cols[None, :],
            mask=in_t[:, None] & in_d[None, :],
        )
        for k in range(K):
            rows = tl.load(row_ptr + tokens.to(tl.int64) * K + k, mask=in_t, other=-1)
            tl.store(
                out_ptr + rows[:, None] * D + cols[None, :],
                x,
                mask=(rows >= 0)[:, None] & in_d[None, :],
            )


@jit
def _unpermute_kernel(
    y_ptr,
    row_ptr,
    weight_ptr,
    out_ptr,
    T,
    D,
    K,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[t] = sum over kept k of weight[t, k] * y[row_TK[t, k]] (weight 1 without one)."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_t = tokens < T
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        in_d = cols < D
        acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for k in range(K):
            choice = tokens.to(tl.int64) * K + k
            rows = tl.load(row_ptr + choice, mask=in_t, other=-1)
            y = tl.load(
                y_ptr + rows[:, None] * D + cols[None, :],
                mask=(rows >= 0)[:, None] & in_d[None, :],
                other=0.0,
            ).to(tl.float32)
            if HAS_WEIGHT:
                y *= tl.load(weight_ptr + choice, mask=in_t, other=0.0)[:, None]
            acc += y
        tl.store(
            out_ptr + tokens[:, None].to(tl.int64) * D + cols[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=in_t[:, None] & in_d[None, :],
        )


@jit
def _unpermute_backward_kernel(
    dy_ptr,
    y_ptr,
    row_ptr,
    weight_ptr,
    dy_rows_ptr,
    dweight_ptr,
    T,
    D,
    K,
    WEIGHT_GRAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dy_rows[row_TK[t, k]] = weight[t, k] * dy[t] and, when WEIGHT_GRAD,
    dweight[t, k] = <dy[t], y[row_TK[t, k]]> (0 for dropped choices)."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    choices = tl.arange(0, BLOCK_K)
    in_t = tokens < T
    dweight = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        in_d = cols < D
        dy = tl.load(
            dy_ptr + tokens[:, None].to(tl.int64) * D + cols[None, :],
            mask=in_t[:, None] & in_d[None, :],
            other=0.0,
        ).to(tl.float32)
        for k in range(K):
            choice = tokens.to(tl.int64) * K + k
            rows = tl.load(row_ptr + choice, mask=in_t, other=-1)
            weight = tl.load(weight_ptr + choice, mask=in_t, other=0.0)
            offsets = rows[:, None] * D + cols[None, :]
            kept = (rows >= 0)[:, None] & in_d[None, :]
            tl.store(
                dy_rows_ptr + offsets,
                (weight[:, None] * dy).to(dy_rows_ptr.dtype.element_ty),
                mask=kept,
            )
            if WEIGHT_GRAD:
                y = tl.load(y_ptr + offsets, mask=kept, other=0.0).to(tl.float32)
                partial = tl.sum(dy * y, axis=1)
                dweight += tl.where(choices[None, :] == k, partial[:, None], 0.0)
    if WEIGHT_GRAD:
        tl.store(
            dweight_ptr + tokens[:, None].to(tl.int64) * K + choices[None, :],
            dweight,
            mask=in_t[:, None] & (choices < K)[None, :],
        )


def _blocks(T: int, D: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_D): up to 1024 columns a step and about 4K elements a program, so
    that a GPU program moves a few KiB per step while the interpreter, whose cost is per
    program, runs few programs on small tests."""
    block_d = min(next_power_of_2(D), 1024)
    return max(1, min(next_power_of_2(T), 4096 // block_d)), block_d


def _launch_unpermute(y_RD, row_TK, weight_TK, T: int):
    D = y_RD.shape[1]
    out_TD = torch.empty(T, D, dtype=y_RD.dtype, device=y_RD.device)
    block_t, block_d = _blocks(T, D)
    if T and D:
        _unpermute_kernel[(-(-T // block_t),)](
            y_RD,
            row_TK,
            row_TK if weight_TK is None else weight_TK,  # unread without weights
            out_TD,
            T,
            D,
            row_TK.shape[1],
            HAS_WEIGHT=weight_TK is not None,
            BLOCK_T=block_t,
            BLOCK_D=block_d,
        )
    return out_TD


def _check(x_D: torch.Tensor, row_TK: torch.Tensor, weight_TK=None) -> None:
    if x_D.dim() != 2 or row_TK.dim() != 2:
        raise ValueError("x must be 2-D (rows, width) and row_TK 2-D (tokens, top_k)")
    if weight_TK is not None and weight_TK.shape != row_TK.shape:
        raise ValueError(f"weight_TK {tuple(weight_TK.shape)} != row_TK {tuple(row_TK.shape)}")


def permute_triton(x_TD: torch.Tensor, row_TK: torch.Tensor, rows: int) -> torch.Tensor:
    """The Triton permute (CUDA tensors, or CPU ones under TRITON_INTERPRET=1)."""
    _check(x_TD, row_TK)
    if x_TD.shape[0] != row_TK.shape[0]:
        raise ValueError(f"x_TD has {x_TD.shape[0]} tokens, row_TK {row_TK.shape[0]}")
    return PermuteFunction.apply(x_TD, row_TK, rows)


def unpermute_triton(y_RD: torch.Tensor, row_TK: torch.Tensor, weight_TK: torch.Tensor):
    """The Triton unpermute (CUDA tensors, or CPU ones under TRITON_INTERPRET=1)."""
    _check(y_RD, row_TK, weight_TK)
    return UnpermuteFunction.apply(y_RD, row_TK, weight_TK)


class PermuteFunction(torch.autograd.Function):
    """x_RD = permute(x_TD); dx_TD is the unweighted unpermute of dx_RD."""

    @staticmethod
    def forward(ctx, x_TD, row_TK, rows):
        x_TD, row_TK = x_TD.contiguous(), row_TK.contiguous()
        T, D = x_TD.shape
        x_RD = torch.empty(rows, D, dtype=x_TD.dtype, device=x_TD.device)
        block_t, block_d = _blocks(T, D)
        if T and D:
            _permute_kernel[(-(-T // block_t),)](
                x_TD, row_TK, x_RD, T, D, row_TK.shape[1], BLOCK_T=block_t, BLOCK_D=block_d
            )
        ctx.save_for_backward(row_TK)
        return x_RD

    @staticmethod
    def backward(ctx, dx_RD):
        (row_TK,) = ctx.saved_tensors
        return _launch_unpermute(dx_RD.contiguous(), row_TK, None, row_TK.shape[0]), None, None


class UnpermuteFunction(torch.autograd.Function):
    """y_TD = unpermute(y_RD, weight_TK); one fused kernel gives dy_RD and dweight_TK."""

    @staticmethod
    def forward(ctx, y_RD, row_TK, weight_TK):
        y_RD, row_TK = y_RD.contiguous(), row_TK.contiguous()
        ctx.weight_dtype = weight_TK.dtype
        weight_TK = weight_TK.float().contiguous()
        ctx.save_for_backward(y_RD, row_TK, weight_TK)
        return _launch_unpermute(y_RD, row_TK, weight_TK, row_TK.shape[0])

    @staticmethod
    def backward(ctx, dy_TD):
        y_RD, row_TK, weight_TK = ctx.saved_tensors
        T, K = row_TK.shape
        R, D = y_RD.shape
        weight_grad = ctx.needs_input_grad[2]
        dy_RD = torch.empty(R, D, dtype=y_RD.dtype, device=y_RD.device)
        dweight_TK = torch.empty(T, K, dtype=torch.float32, device=y_RD.device)
        block_t, block_d = _blocks(T, D)
        if T:
            _unpermute_backward_kernel[(-(-T // block_t),)](
                dy_TD.contiguous(),
                y_RD,
                row_TK,
                weight_TK,
                dy_RD,
                dweight_TK,
                T,
                D,
                K,
                WEIGHT_GRAD=weight_grad,
                BLOCK_T=block_t,
                BLOCK_D=block_d,
                BLOCK_K=next_power_of_2(K),
            )
        return dy_RD, None, dweight_TK.to(ctx.weight_dtype) if weight_grad else None


# -- torch ------------------------------------------------------------------------------
def routing_map(expert_idx_TK: torch.Tensor, counts_E: torch.Tensor, capacity: int | None = None):
    """(row_TK, offsets_E) for a routing; see the module docstring. Torch ops only, all of
    them defined on `meta` tensors."""
    T, K = expert_idx_TK.shape
    sorted_R, order_R = torch.sort(expert_idx_TK.flatten(), stable=True)
    slot_R = torch.arange(T * K, device=order_R.device)
    kept_E = counts_E
    if capacity is not None:
        start_E = torch.cumsum(counts_E, 0) - counts_E
        rank_R = slot_R - start_E[sorted_R]  # position among the expert's rows
        kept_E = counts_E.clamp(max=capacity)
        kept_start_E = torch.cumsum(kept_E, 0) - kept_E
        slot_R = torch.where(rank_R < capacity, kept_start_E[sorted_R] + rank_R, -1)
    row_R = torch.empty_like(slot_R).scatter_(0, order_R, slot_R)  # invert the sort
    return row_R.view(T, K), torch.cumsum(kept_E, 0, dtype=torch.int32)


def _at_rows(row_TK: torch.Tensor, values_TK: torch.Tensor, rows: int) -> torch.Tensor:
    """values_R: each kept choice's value at its row. Dropped choices write a spare slot
    past the end, which is cut off (its gradient is zero: dropped weights learn nothing)."""
    target_R = torch.where(row_TK >= 0, row_TK, rows).flatten()
    values_R = values_TK.new_zeros(rows + 1)
    return values_R.scatter(0, target_R, values_TK.flatten())[:rows]


def permute_reference(x_TD: torch.Tensor, row_TK: torch.Tensor, rows: int) -> torch.Tensor:
    """x_RD as a gather of token rows."""
    _check(x_TD, row_TK)
    T, K = row_TK.shape
    tokens_TK = torch.arange(T, device=row_TK.device)[:, None].expand(T, K)
    return x_TD.index_select(0, _at_rows(row_TK, tokens_TK, rows))


def unpermute_reference(y_RD: torch.Tensor, row_TK: torch.Tensor, weight_TK: torch.Tensor):
    """y_TD as an fp32 scatter-add of weighted rows into their tokens. Autograd keeps y_RD
    itself for the weights' gradient, as the kernel does: index_put, unlike index_add,
    saves no copy of what it adds."""
    _check(y_RD, row_TK, weight_TK)
    T, K = row_TK.shape
    R, D = y_RD.shape
    tokens_TK = torch.arange(T, device=row_TK.device)[:, None].expand(T, K)
    weight_R = _at_rows(row_TK, weight_TK.float(), R)
    y_TD = torch.zeros(T, D, dtype=torch.float32, device=y_RD.device)
    token_R = _at_rows(row_TK, tokens_TK, R)
    y_TD = y_TD.index_put((token_R,), y_RD * weight_R[:, None], accumulate=True)
    return y_TD.to(y_RD.dtype)
