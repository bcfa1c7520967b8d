"""The kernels compiled for sm_90 (H100, H200) without a GPU: tera.kernels.aot and
bench/kernels_compile.py, whose checks (no register spills, wgmma and pipelined loads in the
grouped GEMMs, 16-byte row moves, a config that fits shared memory) must hold for every
launch one MoE layer's forward and backward makes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tera.kernels import _triton, aot

from . import bench_scripts

BENCH = bench_scripts.BENCH / "kernels_compile.py"
KERNELS = {
    "_route_kernel",
    "_route_backward_kernel",
    "_permute_kernel",
    "_unpermute_kernel",
    "_unpermute_backward_kernel",
    "_grouped_mm_kernel",
    "_grouped_mm_weight_grad_kernel",
}


def load_bench():
    return bench_scripts.load("kernels_compile")


@pytest.mark.slow
@pytest.mark.skipif(not _triton.AVAILABLE, reason="Triton is not installed (Linux only)")
def test_moe_layer_compiles_for_sm90_without_problems(tmp_path):
    # A fresh process: these tests run under TRITON_INTERPRET=1, which has no compiler.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compile here, not from a cache
    rows_file = tmp_path / "rows.json"
    command = [sys.executable, str(BENCH), "--models", "mixtral-8x7b,deepseek-v3"]
    command += ["--dtypes", "bfloat16,float32", "--out", str(tmp_path), "--json", str(rows_file)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if "written against 3.9" in result.stderr:
        pytest.skip(result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Problems: none" in (tmp_path / "kernels-sm90-compile.md").read_text()

    rows = json.loads(rows_file.read_text())
    for model in ("mixtral-8x7b", "deepseek-v3"):
        for dtype in ("bfloat16", "float32"):
            mine = [r for r in rows if r["model"] == model and r["dtype"] == dtype]
            assert {r["kernel"] for r in mine} == KERNELS, (model, dtype)
            # Forward and backward of three grouped GEMMs (gate, up, down), every config.
            gemm_calls = sum(r["calls"] for r in mine if r["kernel"] == "_grouped_mm_kernel")
            configs = len({r["config"] for r in mine if r["kernel"] == "_grouped_mm_kernel"})
            assert gemm_calls == 6 * configs
            # Unpermute runs weighted (forward) and unweighted (permute's backward).
            unpermutes = {r["options"] for r in mine if r["kernel"] == "_unpermute_kernel"}
            assert {"HAS_WEIGHT=True" in o for o in unpermutes} == {True, False}
    bf16_gemms = [r for r in rows if r["dtype"] == "bfloat16" and "grouped_mm" in r["kernel"]]
    assert all(r["wgmma"] and r["async_copies"] and r["widest_load"] == 16 for r in bf16_gemms)
    fp32_gemms = [r for r in rows if r["dtype"] == "float32" and "grouped_mm" in r["kernel"]]
    assert not any(r["wgmma"] for r in fp32_gemms)  # IEEE fp32: the CUDA cores
    assert not any(r["spill_bytes"] for r in rows)


def row(**changes):
    fields = dict(
        model="m", dtype="bfloat16", kernel="_grouped_mm_kernel", operands="8x16", options="",
        config="BLOCK_M=64", calls=1, registers=128, spill_bytes=0, shared_bytes=96 * 1024,
        wgmma=4, async_copies=48, widest_load=16, widest_store=16,
    )  # fmt: skip
    return load_bench().Row(**{**fields, **changes})


@pytest.mark.parametrize(
    "changes, problem",
    [
        (dict(spill_bytes=24), "spills 24 bytes"),
        (dict(wgmma=0), "not on the tensor cores"),
        (dict(async_copies=0), "not pipelined"),
        (dict(kernel="_permute_kernel", widest_store=2), "2-byte accesses"),
        (dict(shared_bytes=228 * 1024), "no config fits shared memory"),
    ],
)
def test_each_check_can_fail(changes, problem):
    bench = load_bench()
    assert bench.problems([row()]) == []
    found = bench.problems([row(**changes)])
    assert len(found) == 1 and problem in found[0]


def test_fp32_without_tf32_needs_no_tensor_cores():
    bench = load_bench()
    assert bench.problems([row(dtype="float32", wgmma=0)]) == []
    assert "tensor cores" in bench.problems([row(dtype="tf32", wgmma=0)])[0]


def test_one_fitting_config_is_enough():
    bench = load_bench()
    rows = [row(config="big", shared_bytes=300 * 1024), row(config="small")]
    assert bench.problems(rows) == []


def test_widest_access_from_ptx():
    ptx = """
    @%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    ld.global.b16 %rs1, [ %rd2 + 0 ];
    st.global.v2.b32 [ %rd3 + 0 ], { %r5, %r6 };
    cp.async.cg.shared.global [ %r7 + 0 ], [ %rd4 + 0 ], 0x10, %r8;
    """
    assert aot._widest(ptx, "ld") == 16
    assert aot._widest(ptx, "st") == 8
    assert aot._widest("ld.global.b16 %rs1, [ %rd2 + 0 ];", "ld") == 2
    assert aot._widest("cp.async.ca.shared.global [ %r7 ], [ %rd4 ], 4, %r8;", "ld") == 4
    assert aot._widest("mov.u32 %r1, %r2;", "st") == 0


def test_recording_needs_the_compiler():
    # conftest.py runs these tests under the interpreter.
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET unset"):
        with aot.recording():
            pass
