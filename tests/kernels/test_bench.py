"""bench/kernels.py's plumbing, run on the CPU: every op of a shape on inputs built for it,
the Triton side in the interpreter, and the table. The timings themselves need a GPU; a
stand-in timer calls each op once and reports a fixed time, so the rows' arithmetic is
checked on known values."""

from __future__ import annotations

import pytest

from tera.models import load_spec

from . import bench_scripts

OPS = ["router", "routing map", "permute", "unpermute", "gemm up", "gemm down", "gemm up bwd"]


class CallOnce:
    """Runs each timed callable once (so that a broken op raises) and calls it 2 ms."""

    def __init__(self):
        self.calls = 0

    def __call__(self, fn):
        fn()
        self.calls += 1
        return 2.0

    maybe = __call__


@pytest.mark.parametrize("routing", ["balanced", "skewed"])
def test_every_op_runs_and_tabulates(triton, routing):
    bench = bench_scripts.load("kernels")
    spec = load_spec("tiny-moe")
    timer = CallOnce()
    # 1 TFLOP/s and 1 GB/s: rooflines in ms are then FLOPs / 1e9 and bytes / 1e6.
    shape = bench.Shape(spec, 32, routing, timer, flops=1e12, copy=1e9, device="cpu")
    rows = shape.run()

    assert [r.op for r in rows] == OPS == [r.op for r in rows[: bench.OPS]]
    # Every row times the kernel and (but the routing map, torch on both paths) its
    # reference; the GEMMs also time a dense matmul.
    assert timer.calls == 7 + 6 + 3
    T, K, D, F = 32, spec.moe.top_k, spec.hidden, spec.moe.expert_hidden
    R = T * K
    gemm_up = rows[4]
    assert gemm_up.roofline_ms == pytest.approx(2 * R * D * F / 1e9)
    assert gemm_up.target() == (1.0, bench.GEMM_TARGETS[routing])  # dense 2 ms / kernel 2 ms
    assert rows[6].roofline_ms == pytest.approx(2 * gemm_up.roofline_ms)
    permute = rows[2]
    assert permute.roofline_ms == pytest.approx(((T + R) * D * 2 + R * 8) / 1e6)
    assert rows[1].target() is None and rows[1].torch_ms == rows[1].kernel_ms
    assert all(r.load >= 1.0 for r in rows)
    if routing == "balanced":
        assert rows[0].load == pytest.approx(1.0)

    lines = bench.table(rows)
    assert len(lines) == 2 + len(OPS)
    router = lines[2].split(" | ")
    assert router[0] == "| router" and router[-2:] == [">= 50%", "no |"]  # far off, at 1 GB/s
