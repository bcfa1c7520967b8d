"""Which implementation runs: the Triton kernel for CUDA tensors, the torch reference for
every other device (the CPU, and `meta`, on which the planner traces the model).

Under TRITON_INTERPRET=1, `triton_on_cpu()` sends CPU tensors to the Triton kernels too,
which Triton's interpreter then runs on the CPU: the kernel tests compare them with the
references so. Each op's contract is in the docstring of its module.
"""

from __future__ import annotations

import contextlib

import torch

from tera.kernels import _triton
from tera.kernels.grouped_gemm import grouped_gemm_reference, grouped_gemm_triton
from tera.kernels.permute import (
    permute_reference,
    permute_triton,
    unpermute_reference,
    unpermute_triton,
)
from tera.kernels.router import route_reference, route_triton

_triton_on_cpu = False


@contextlib.contextmanager
def triton_on_cpu():
    """Run the Triton kernels on CPU tensors, in Triton's interpreter, inside the block."""
    global _triton_on_cpu
    if not _triton.INTERPRET:
        raise RuntimeError(
            "triton_on_cpu needs TRITON_INTERPRET=1 in the environment before tera.kernels "
            "is first imported (Triton reads it when it decorates the kernels)"
        )
    previous, _triton_on_cpu = _triton_on_cpu, True
    try:
        yield
    finally:
        _triton_on_cpu = previous


def uses_triton(t: torch.Tensor) -> bool:
    """Whether an op on `t` runs the Triton kernel (else the torch reference)."""
    if not _triton.AVAILABLE:
        return False
    return t.is_cuda or (_triton_on_cpu and t.device.type == "cpu")


def route(logits_TE, top_k, score="softmax", bias_E=None, normalize=True, scale=1.0):
    """(expert_idx_TK, weight_TK, counts_E): see tera.kernels.router."""
    impl = route_triton if uses_triton(logits_TE) else route_reference
    return impl(logits_TE, top_k, score, bias_E, normalize, scale)


def permute(x_TD, row_TK, rows: int):
    """x_RD: see tera.kernels.permute."""
    impl = permute_triton if uses_triton(x_TD) else permute_reference
    return impl(x_TD, row_TK, rows)


def unpermute(y_RD, row_TK, weight_TK):
    """y_TD: see tera.kernels.permute."""
    impl = unpermute_triton if uses_triton(y_RD) else unpermute_reference
    return impl(y_RD, row_TK, weight_TK)


def grouped_gemm(x_RD, w_EDF, offsets_E):
    """y_RF: see tera.kernels.grouped_gemm."""
    impl = grouped_gemm_triton if uses_triton(x_RD) else grouped_gemm_reference
    return impl(x_RD, w_EDF, offsets_E)
