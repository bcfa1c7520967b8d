"""The Triton grouped GEMM (in the interpreter) against a per-expert fp64 loop, forward
and both gradients, over routings with uneven, empty and skewed experts; and the CPU
reference's two paths (torch._grouped_mm and the loop) against each other."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tera.kernels.dispatch import grouped_gemm
from tera.kernels.grouped_gemm import _grouped_mm_applies, grouped_gemm_reference
from tera.kernels.router import expert_counts

from .routing import DTYPES, SETTINGS, assert_close, routings


def offsets_of(routing) -> torch.Tensor:
    expert_idx_TK, E = routing
    return torch.cumsum(expert_counts(expert_idx_TK, E), 0, dtype=torch.int32)


def operands(routing, D: int, F: int, dtype, seed: int = 0):
    """x_RD, w_EDF and dy_RF scaled so that y and the gradients are O(1)."""
    offsets_E = offsets_of(routing)
    R, E = int(offsets_E[-1]), offsets_E.shape[0]
    generator = torch.Generator().manual_seed(seed)
    x_RD = (torch.randn(R, D, generator=generator) / D**0.5).to(dtype)
    w_EDF = torch.randn(E, D, F, generator=generator).to(dtype)
    dy_RF = (torch.randn(R, F, generator=generator) / F**0.5).to(dtype)
    return x_RD, w_EDF, dy_RF, offsets_E


def loop_fp64(x_RD, w_EDF, dy_RF, offsets_E):
    """y, dx, dw by one fp64 matmul per expert and autograd."""
    x = x_RD.double().requires_grad_()
    w = w_EDF.double().requires_grad_()
    y = grouped_gemm_reference(x, w, offsets_E)  # fp64: the per-expert loop
    y.backward(dy_RF.double())
    return y, x.grad, w.grad


@settings(SETTINGS, max_examples=80)
@given(
    routing=routings(max_tokens=32, max_experts=8, max_k=3),
    D=st.integers(1, 72),
    F=st.integers(1, 72),
    dtype=st.sampled_from(DTYPES),
)
def test_grouped_gemm_kernel_matches_loop(triton, poisoned, routing, D, F, dtype):
    x_RD, w_EDF, dy_RF, offsets_E = operands(routing, D, F, dtype)
    x_RD.requires_grad_()
    w_EDF.requires_grad_()
    y_RF = grouped_gemm(x_RD, w_EDF, offsets_E)
    y_RF.backward(dy_RF)
    y, dx, dw = loop_fp64(x_RD.detach(), w_EDF.detach(), dy_RF, offsets_E)
    assert y_RF.dtype == x_RD.grad.dtype == w_EDF.grad.dtype == dtype
    assert_close(y_RF, y, dtype)
    assert_close(x_RD.grad, dx, dtype)
    assert_close(w_EDF.grad, dw, dtype)  # zero for experts without rows


def test_kernel_handles_many_tiles_and_a_transposed_weight(triton, poisoned):
    """Several row tiles per expert, an expert of one row, a strided (transposed) weight."""
    counts = torch.tensor([70, 0, 1, 33])
    offsets_E = torch.cumsum(counts, 0, dtype=torch.int32)
    x_RD = torch.randn(int(counts.sum()), 40)
    w_EFD = torch.randn(4, 50, 40)
    y_RF = grouped_gemm(x_RD, w_EFD.transpose(1, 2), offsets_E)
    y, _, _ = loop_fp64(x_RD, w_EFD.transpose(1, 2), torch.zeros(y_RF.shape), offsets_E)
    assert_close(y_RF, y, torch.float32)


@settings(deadline=None, max_examples=40)
@given(
    routing=routings(max_tokens=32, max_experts=8, max_k=3),
    D=st.sampled_from([8, 16, 24]),
    F=st.sampled_from([8, 32]),
    dtype=st.sampled_from(DTYPES),
)
def test_reference_paths_agree(routing, D, F, dtype):
    """torch._grouped_mm (aligned widths) against the loop, forward and backward."""
    x_RD, w_EDF, dy_RF, offsets_E = operands(routing, D, F, dtype)
    assert _grouped_mm_applies(x_RD, w_EDF)
    x_RD.requires_grad_()
    w_EDF.requires_grad_()
    y_RF = grouped_gemm_reference(x_RD, w_EDF, offsets_E)
    y_RF.backward(dy_RF)
    y, dx, dw = loop_fp64(x_RD.detach(), w_EDF.detach(), dy_RF, offsets_E)
    assert_close(y_RF, y, dtype)
    assert_close(x_RD.grad, dx, dtype)
    assert_close(w_EDF.grad, dw, dtype)


def test_reference_runs_on_meta():
    """The planner traces on `meta`: the reference must run there, through _grouped_mm."""
    x_RD = torch.empty(96, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
    w_EDF = torch.empty(4, 64, 32, device="meta", dtype=torch.bfloat16, requires_grad=True)
    offsets_E = torch.empty(4, device="meta", dtype=torch.int32)
    y_RF = grouped_gemm(x_RD, w_EDF, offsets_E)
    y_RF.backward(torch.empty_like(y_RF))
    assert y_RF.shape == (96, 32) and w_EDF.grad.shape == w_EDF.shape


def test_grouped_gemm_rejects_mismatched_operands():
    offsets_E = torch.tensor([2, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="w_EDF"):
        grouped_gemm(torch.randn(4, 3), torch.randn(2, 5, 6), offsets_E)
    with pytest.raises(ValueError, match="int32"):
        grouped_gemm(torch.randn(4, 5), torch.randn(2, 5, 6), offsets_E.long())
    with pytest.raises(ValueError, match="bfloat16"):
        grouped_gemm(torch.randn(4, 5), torch.randn(2, 5, 6).bfloat16(), offsets_E)
