"""Which implementation runs: the Triton kernel for CUDA tensors, the torch reference for
every other device (the CPU, and `meta`, on which the planner traces the model).

`triton_for(device_type)` sends other tensors to the Triton kernels too, inside a block:
CPU tensors under TRITON_INTERPRET=1, which Triton's interpreter then runs on the CPU (the
kernel tests compare them with the references so), and `meta` tensors while
tera.kernels.aot records the launches to compile them for a GPU that is not here. Each
op's contract is in the docstring of its module.
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

_also_triton: frozenset[str] = frozenset()  # device types beside CUDA sent to Triton


@contextlib.contextmanager
def triton_for(device_type: str):
    """Inside the block, ops on `device_type` tensors run the Triton kernels.

    "cpu": in Triton's interpreter, which needs TRITON_INTERPRET=1 set before tera.kernels
    is first imported (Triton reads it when it decorates the kernels). "meta": only under
    tera.kernels.aot.recording(), which records the launches instead of running them, and
    so needs the compiler (TRITON_INTERPRET unset)."""
    global _also_triton
    if device_type == "cpu" and not _triton.INTERPRET:
        raise RuntimeError(
            "Triton kernels on the CPU need TRITON_INTERPRET=1 in the environment before "
            "tera.kernels is first imported (Triton reads it when it decorates the kernels)"
        )
    if device_type == "meta" and (_triton.INTERPRET or not _triton.AVAILABLE):
        raise RuntimeError(
            "Triton kernels on `meta` tensors need Triton compiling "
            "(installed, TRITON_INTERPRET unset)"
        )
    if device_type not in ("cpu", "meta"):
        raise ValueError(f"triton_for takes 'cpu' or 'meta', not {device_type!r}")
    previous, _also_triton = _also_triton, _also_triton | {device_type}
    try:
        yield
    finally:
        _also_triton = previous


def uses_triton(t: torch.Tensor) -> bool:
    """Whether an op on `t` runs the Triton kernel (else the torch reference)."""
    if not _triton.AVAILABLE:
        return False
    return t.is_cuda or t.device.type in _also_triton


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
