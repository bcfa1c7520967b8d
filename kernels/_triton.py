"""Triton where it is installed, and the two facts the dispatcher needs about it.

Triton ships for Linux only. Elsewhere `jit` leaves a kernel a plain (never called)
function, so that the kernel modules still import: their torch references are the CPU path
and need no Triton. Kernel modules use `from __future__ import annotations`, so their
`tl.constexpr` annotations are not evaluated when Triton is missing.

INTERPRET: TRITON_INTERPRET=1 was set when tera.kernels was imported. Triton reads the
variable when `@triton.jit` decorates a kernel, so it decides whether the kernels run in
Triton's CPU interpreter (tests) or compile for the GPU; setting it later changes nothing.
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

AVAILABLE = triton is not None
INTERPRET = AVAILABLE and os.environ.get("TRITON_INTERPRET") == "1"


def jit(fn):
    """`triton.jit`, or the function itself without Triton."""
    return triton.jit(fn) if AVAILABLE else fn


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (block shapes must be powers of two)."""
    return 1 << max(n - 1, 0).bit_length()
