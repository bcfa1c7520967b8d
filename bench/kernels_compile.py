"""What the MoE hot path compiles to on an H100 (compute capability 9.0), built without a GPU.

For each model's MoE layer (router, permute, grouped expert GEMMs, unpermute; forward and
backward) the Triton launches are recorded on `meta` tensors (tera.kernels.aot) and each
compiled for sm_90 as the launch on a GPU would compile it, every autotuning config of the
grouped GEMMs included. The cubin and PTX give registers, spills, shared memory, wgmma and
cp.async counts and the widest global accesses, and these checks:

  - no kernel spills registers to local memory;
  - every grouped-GEMM config has a software-pipelined K loop (cp.async) and runs tl.dot as
    wgmma on the tensor cores, but for fp32 without TF32 (IEEE products, on the CUDA cores);
    for every launch at least one config fits a block's 227 KB of shared memory (the
    autotuner skips the others);
  - permute and unpermute move rows with 16-byte loads and stores.

These are the compiler's facts, not timings (bench/kernels.py times the kernels on a GPU).
The compiled code depends on the token count only through block sizes, which stop
changing at a few thousand tokens. Data types: bfloat16, float16, float32 (torch's default,
TF32 off) and tf32 (float32 tensors with torch.backends.cuda.matmul.allow_tf32 on).
Writes <out>/kernels-sm90-compile.md, prints the problems found and exits 1 if there are any.

Run: python bench/kernels_compile.py [--models a,b] [--tokens N] [--dtypes bfloat16,tf32]
                                     [--out DIR] [--json FILE (every config's row)]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
import warnings
from pathlib import Path

import torch

from tera.kernels import _triton
from tera.kernels.aot import (
    SM90_SHARED_BYTES_PER_BLOCK,
    Launch,
    Resources,
    compile_launch,
    recording,
)
from tera.models import load_spec
from tera.models.moe import MoE

MODELS = ("mixtral-8x7b", "qwen3-235b-a22b", "deepseek-v3")
GEMMS = ("_grouped_mm_kernel", "_grouped_mm_weight_grad_kernel")
ROW_MOVERS = ("_permute_kernel", "_unpermute_kernel", "_unpermute_backward_kernel")
RESULTS = Path(__file__).parent / "results"


@dataclasses.dataclass(frozen=True)
class Row(Resources):
    """One compiled variant's resources, and where in which layer it comes from."""

    model: str
    dtype: str
    kernel: str
    operands: str  # tensor shapes, T marking a transposed view
    options: str  # the launch's constexpr and option arguments
    config: str  # the autotuning config ("" for a kernel without autotuning)
    calls: int  # launches per layer step that compile to this variant

    @property
    def launch(self) -> tuple:
        """What tells its launch from the layer's others (its configs share it)."""
        return self.model, self.dtype, self.kernel, self.operands, self.options


def layer_launches(model: str, tokens: int, dtype: torch.dtype) -> list[Launch]:
    """The Triton launches of one MoE layer's forward and backward over `tokens` tokens."""
    spec = load_spec(model)
    with recording() as launches:
        layer = MoE(spec, device="meta", dtype=dtype)
        x = torch.empty(1, tokens, spec.hidden, device="meta", dtype=dtype, requires_grad=True)
        layer(x).sum().backward()
    return launches


def describe(launch: Launch) -> tuple[str, str]:
    """(operands, options) of a launch, for the table."""
    shapes = []
    for arg in launch.args:
        if isinstance(arg, torch.Tensor):
            transposed = arg.dim() > 1 and arg.stride(-1) != 1
            shapes.append("x".join(map(str, arg.shape)) + ("T" if transposed else ""))
    options = " ".join(f"{k}={v}" for k, v in launch.kwargs.items())
    return ", ".join(shapes), options


def compile_rows(model: str, tokens: int, dtype_name: str) -> list[Row]:
    tf32 = dtype_name == "tf32"
    dtype = torch.float32 if tf32 else getattr(torch, dtype_name)
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32  # read by the GEMM wrappers at launch
    try:
        launches = layer_launches(model, tokens, dtype)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed
    calls: collections.Counter[tuple] = collections.Counter()
    first: dict[tuple, tuple[Launch, dict]] = {}  # launches that compile alike, once
    for launch in launches:
        operands, options = describe(launch)
        for config, kwargs in launch.variants():
            key = (launch.name, operands, options, config)
            calls[key] += 1
            first.setdefault(key, (launch, kwargs))
    rows = []
    for (kernel, operands, options, config), (launch, kwargs) in first.items():
        used = compile_launch(launch.kernel, launch.args, kwargs)
        rows.append(
            Row(
                **dataclasses.asdict(used),
                model=model,
                dtype=dtype_name,
                kernel=kernel,
                operands=operands,
                options=options,
                config=config,
                calls=calls[kernel, operands, options, config],
            )
        )
    return rows


def by_launch(rows: list[Row]) -> dict[tuple, list[Row]]:
    """The rows grouped by launch: one row per autotuning config, or just one."""
    launches: dict[tuple, list[Row]] = {}
    for r in rows:
        launches.setdefault(r.launch, []).append(r)
    return launches


def problems(rows: list[Row]) -> list[str]:
    """The checks of the module docstring, failed."""
    found = []
    for r in rows:
        where = f"{r.model} {r.dtype} {r.kernel} ({r.operands}) {r.config}".rstrip()
        if r.spill_bytes:
            found.append(f"{where}: spills {r.spill_bytes} bytes of registers")
        if r.kernel in GEMMS and not r.async_copies:
            found.append(f"{where}: the K loop's loads are not pipelined (no cp.async)")
        if r.kernel in GEMMS and r.dtype != "float32" and not r.wgmma:
            found.append(f"{where}: tl.dot is not on the tensor cores (no wgmma)")
        if r.kernel in ROW_MOVERS and min(r.widest_load, r.widest_store) < 16:
            found.append(f"{where}: rows move {r.widest_load}/{r.widest_store}-byte accesses")
    for (model, dtype, kernel, operands, _), variants in by_launch(rows).items():
        if not any(v.fits_sm90 for v in variants):
            found.append(f"{model} {dtype} {kernel} ({operands}): no config fits shared memory")
    return found


def span(values) -> str:
    """The range of the values as "low-high", or the one value."""
    values = list(values)
    low, high = min(values), max(values)
    return f"{low:.0f}" if low == high else f"{low:.0f}-{high:.0f}"


def table(rows: list[Row]) -> list[str]:
    """One line per launch; a launch through the autotuner sums up its configs (ranges
    over them, and the worst spill)."""
    lines = [
        "| model | dtype | kernel | operands | options | calls | configs fitting "
        "| registers | spill B | shared KiB | wgmma | cp.async | widest load B "
        "| widest store B |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (model, dtype, kernel, operands, options), variants in by_launch(rows).items():
        fitting = sum(v.fits_sm90 for v in variants)
        lines.append(
            f"| {model} | {dtype} | {kernel.strip('_')} | {operands} | {options} "
            f"| {variants[0].calls} | {fitting}/{len(variants)} "
            f"| {span(v.registers for v in variants)} | {max(v.spill_bytes for v in variants)} "
            f"| {span(v.shared_bytes / 1024 for v in variants)} "
            f"| {span(v.wgmma for v in variants)} | {span(v.async_copies for v in variants)} "
            f"| {span(v.widest_load for v in variants)} "
            f"| {span(v.widest_store for v in variants)} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--dtypes", default="bfloat16,float16,float32,tf32")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the table")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if not _triton.AVAILABLE or _triton.INTERPRET:
        print("needs Triton compiling (installed, TRITON_INTERPRET unset)", file=sys.stderr)
        return 2
    # Triton 3.9 warns on every compile that its FP-fusion default will change; the
    # default is what a launch on the GPU gets, so it is what is compiled here.
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")

    rows: list[Row] = []
    for model in args.models.split(","):
        for name in args.dtypes.split(","):
            rows += compile_rows(model, args.tokens, name)
            print(f"compiled {model} {name}", flush=True)
    found = problems(rows)
    lines = [
        f"# The MoE hot path compiled for sm_90 (H100, H200): Triton {_triton.triton.__version__}, "
        f"torch {torch.__version__}",
        "",
        f"`python bench/kernels_compile.py --tokens {args.tokens} --dtypes {args.dtypes}`: one "
        "MoE layer's forward and backward per model, each launch compiled ahead of time on a "
        "machine without a GPU. One line per launch; a grouped GEMM is compiled in each of its "
        "autotuning configs, and its line gives ranges over them (spill: the worst). Calls: the "
        "layer's launches that compile alike. Registers per thread, spill = stack bytes per "
        "thread, shared memory per block (configs fitting: at most "
        f"{SM90_SHARED_BYTES_PER_BLOCK // 1024} KiB), wgmma and cp.async instruction counts in "
        "the PTX, widest global access in bytes (cp.async copies count as loads).",
        "",
        *table(rows),
        "",
        "Problems: " + ("none" if not found else ""),
        *(f"- {p}" for p in found),
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "kernels-sm90-compile.md"
    path.write_text("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    print("\n".join(lines[4:]))
    print(f"wrote {path}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
