"""Kernel speed: each MoE op's Triton kernel against its torch reference and the roofline.

For the routed-expert shapes of Mixtral-8x7B, Qwen3-235B-A22B and DeepSeek-V3 (read from
the presets) at 4K, 16K and 64K tokens, with balanced and skewed routing, it times

  router         route_triton vs route_reference (bf16 logits, as the gate produces them)
  routing map    routing_map, torch ops shared by both paths (no target; reported
                 because the permute step of the model pays it)
  permute        permute_triton vs permute_reference
  unpermute      unpermute_triton vs unpermute_reference
  gemm up        grouped GEMM x_RD·w_EDF (D -> F) vs the reference (torch._grouped_mm)
  gemm down      grouped GEMM h_RF·w_EFD (F -> D)
  gemm up bwd    its input and weight gradients (two kernels) vs the reference's autograd

Roofline: memory ops against bytes / the measured device-to-device copy rate (a copy
reads and writes each byte: 2 * size / time), GEMMs against FLOPs / the measured dense
bf16 torch.matmul rate (8192^3). The GEMM targets compare with a dense torch.matmul of the
same total FLOPs on the same shapes (R x D x F), timed here too.

Targets (H100 or H200): grouped GEMM >= 80% of that dense matmul balanced and >= 60%
skewed; permute and unpermute >= 70% of the copy rate; router >= 50%.

Routing: balanced sends choice k of token t to expert (t*K + k) mod E; skewed draws each
token's K experts without replacement with popularity proportional to 1/rank (Zipf), and
the table gives the busiest expert's rows over the mean. Timing: CUDA events, warm-up
runs (which also run Triton's autotuner), the L2 cache flushed before each run, median of
the repeats. Writes bench/results/kernels-<gpu>.md. Needs a CUDA GPU: without one it says
so and exits with status 2, writing nothing.

Run: python bench/kernels.py [--models mixtral-8x7b,...] [--tokens 4096,...] [--repeats N]
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from tera.kernels import _triton
from tera.kernels import grouped_gemm as gg
from tera.kernels.permute import (
    permute_reference,
    permute_triton,
    routing_map,
    unpermute_reference,
    unpermute_triton,
)
from tera.kernels.router import expert_counts, route_reference, route_triton
from tera.models import load_spec

MODELS = ("mixtral-8x7b", "qwen3-235b-a22b", "deepseek-v3")
TOKENS = (4096, 16384, 65536)
ROUTINGS = ("balanced", "skewed")
OPS = 7  # rows per (model, tokens, routing)
# Fraction of the roofline (memory ops) or of the dense matmul (GEMMs) to reach.
MEMORY_TARGETS = {"router": 0.5, "permute": 0.7, "unpermute": 0.7}
GEMM_TARGETS = {"balanced": 0.8, "skewed": 0.6}
RESULTS = Path(__file__).parent / "results"
BF16 = torch.bfloat16


@dataclasses.dataclass
class Row:
    op: str
    model: str
    tokens: int
    routing: str
    load: float  # busiest expert's rows over the mean
    kernel_ms: float
    torch_ms: float | None  # None: the reference ran out of memory
    roofline_ms: float
    dense_ms: float | None = None  # GEMMs: dense torch.matmul of the same FLOPs

    def target(self) -> tuple[float, float] | None:
        """(achieved, target) fractions, where the issue sets a target."""
        if self.op.startswith("gemm") and self.dense_ms is not None:
            return self.dense_ms / self.kernel_ms, GEMM_TARGETS[self.routing]
        if self.op in MEMORY_TARGETS:
            return self.roofline_ms / self.kernel_ms, MEMORY_TARGETS[self.op]
        return None


class Timer:
    """Median CUDA-event time of a callable, with warm-up and an L2 flush before each run."""

    def __init__(self, repeats: int, warmup: int = 3):
        self.repeats, self.warmup = repeats, warmup
        self.scratch = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # > L2

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            self.scratch.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    def maybe(self, fn: Callable[[], object]) -> float | None:
        """Time `fn`, or None when it runs out of GPU memory (large references can)."""
        try:
            return self(fn)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return None


def peak_rates(timer: Timer) -> tuple[float, float]:
    """(dense bf16 matmul FLOP/s, device-to-device copy bytes/s), measured."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=BF16)
    b = torch.randn(n, n, device="cuda", dtype=BF16)
    flops = 2 * n**3 / (timer(lambda: a @ b) * 1e-3)
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy = 2 * src.numel() / (timer(lambda: dst.copy_(src)) * 1e-3)
    return flops, copy


def route_experts(T: int, E: int, K: int, routing: str, device: str) -> torch.Tensor:
    """expert_idx_TK (see the module docstring)."""
    if routing == "balanced":
        return (torch.arange(T * K, device=device) % E).view(T, K)
    return torch.multinomial(zipf(E, device).expand(T, E), K)


def zipf(E: int, device: str) -> torch.Tensor:
    return 1 / torch.arange(1, E + 1, device=device, dtype=torch.float32)


class Shape:
    """The rows of one (model, tokens, routing): each op on inputs built for it. `device`
    is "cuda" but for tests/kernels/test_bench.py, which runs the plumbing on the CPU in
    Triton's interpreter with a stand-in timer."""

    def __init__(self, spec, T, routing, timer: Timer, flops, copy, device: str = "cuda"):
        m = spec.moe
        self.spec, self.T, self.routing, self.device = spec, T, routing, device
        self.D, self.F, self.E, self.K = spec.hidden, m.expert_hidden, m.experts, m.top_k
        self.R = T * self.K
        self.timer, self.flops, self.copy = timer, flops, copy
        self.expert_idx_TK = route_experts(T, self.E, self.K, routing, device)
        self.counts_E = expert_counts(self.expert_idx_TK, self.E)
        self.load = self.counts_E.max().item() / (self.R / self.E)
        self.rows: list[Row] = []

    def add(self, op, kernel_fn, reference_fn, roofline_s: float, dense_fn=None) -> None:
        """A row; reference_fn None: the op is torch code on both paths (the routing map)."""
        kernel_ms = self.timer(kernel_fn)
        self.rows.append(
            Row(
                op,
                self.spec.name,
                self.T,
                self.routing,
                self.load,
                kernel_ms=kernel_ms,
                torch_ms=kernel_ms if reference_fn is None else self.timer.maybe(reference_fn),
                roofline_ms=roofline_s * 1e3,
                dense_ms=None if dense_fn is None else self.timer.maybe(dense_fn),
            )
        )

    def run(self) -> list[Row]:
        m, T, D, F, E, K, R = self.spec.moe, self.T, self.D, self.F, self.E, self.K, self.R
        device = self.device
        # The router's logits lean towards the routing's popularity, so it routes that way.
        logits_TE = torch.randn(T, E, device=device)
        if self.routing == "skewed":
            logits_TE += zipf(E, device).log()
        bias_E = torch.zeros(E, device=device) if m.expert_bias else None
        gate = (logits_TE.to(BF16), K, m.score, bias_E, m.normalize_top_k, m.route_scale)
        moved = T * E * 2 + T * K * (8 + 4) + E * 4  # logits in; indices, weights, counts out
        self.add(
            "router", lambda: route_triton(*gate), lambda: route_reference(*gate), moved / self.copy
        )

        idx_TK, counts_E = self.expert_idx_TK, self.counts_E
        moved = R * 8 * 2 + E * 8  # choices in, rows out (a lower bound: one pass)
        self.add("routing map", lambda: routing_map(idx_TK, counts_E), None, moved / self.copy)
        row_TK, offsets_E = routing_map(idx_TK, counts_E)

        x_TD = torch.randn(T, D, device=device, dtype=BF16)
        moved = (T + R) * D * 2 + R * 8  # token rows in, routed rows out, the map
        self.add(
            "permute",
            lambda: permute_triton(x_TD, row_TK, R),
            lambda: permute_reference(x_TD, row_TK, R),
            moved / self.copy,
        )
        x_RD = permute_triton(x_TD, row_TK, R)
        weight_TK = torch.rand(T, K, device=device)
        moved = (R + T) * D * 2 + R * (8 + 4)  # routed rows in, token rows out, map, weights
        self.add(
            "unpermute",
            lambda: unpermute_triton(x_RD, row_TK, weight_TK),
            lambda: unpermute_reference(x_RD, row_TK, weight_TK),
            moved / self.copy,
        )

        gemm_s = 2 * R * D * F / self.flops
        w_EDF = torch.randn(E, D, F, device=device, dtype=BF16) / D**0.5
        self.add(
            "gemm up",
            lambda: gg.grouped_gemm_triton(x_RD, w_EDF, offsets_E),
            lambda: gg.grouped_gemm_reference(x_RD, w_EDF, offsets_E),
            gemm_s,
            dense_fn=lambda: x_RD @ w_EDF[0],
        )
        h_RF = gg.grouped_gemm_triton(x_RD, w_EDF, offsets_E)
        w_EFD = w_EDF.transpose(1, 2).contiguous()
        self.add(
            "gemm down",
            lambda: gg.grouped_gemm_triton(h_RF, w_EFD, offsets_E),
            lambda: gg.grouped_gemm_reference(h_RF, w_EFD, offsets_E),
            gemm_s,
            dense_fn=lambda: h_RF @ w_EFD[0],
        )

        # Backward of the up projection: input and weight gradients, through autograd on
        # both paths. Any (R, F) gradient will do: the work does not depend on its values.
        dy_RF = h_RF
        x_RD.requires_grad_()
        w_EDF.requires_grad_()
        y_kernel = gg.grouped_gemm_triton(x_RD, w_EDF, offsets_E)
        y_reference = gg.grouped_gemm_reference(x_RD, w_EDF, offsets_E)
        w_DF = w_EDF[0].detach()

        def dense():
            dy_RF @ w_DF.T
            x_RD.detach().T @ dy_RF

        self.add(
            "gemm up bwd",
            lambda: torch.autograd.grad(y_kernel, (x_RD, w_EDF), dy_RF, retain_graph=True),
            lambda: torch.autograd.grad(y_reference, (x_RD, w_EDF), dy_RF, retain_graph=True),
            2 * gemm_s,
            dense_fn=dense,
        )
        return self.rows


def gpu_slug() -> str:
    name = torch.cuda.get_device_name().lower()
    return re.sub(r"[^a-z0-9]+", "-", name.removeprefix("nvidia")).strip("-")


def fmt_ms(value: float | None) -> str:
    return "OOM" if value is None else f"{value:.4g}"


def table(rows: list[Row]) -> list[str]:
    lines = [
        "| op | model | tokens | routing | max/mean load | Triton ms | torch ms | speed-up "
        "| roofline ms | % roofline | dense matmul ms | % dense | target | met |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speedup = "" if r.torch_ms is None else f"{r.torch_ms / r.kernel_ms:.2f}x"
        dense = "" if r.dense_ms is None else fmt_ms(r.dense_ms)
        of_dense = "" if r.dense_ms is None else f"{100 * r.dense_ms / r.kernel_ms:.0f}%"
        goal = met = ""
        if (target := r.target()) is not None:
            achieved, wanted = target
            goal, met = f">= {100 * wanted:.0f}%", "yes" if achieved >= wanted else "no"
        lines.append(
            f"| {r.op} | {r.model} | {r.tokens} | {r.routing} | {r.load:.2f} "
            f"| {fmt_ms(r.kernel_ms)} | {fmt_ms(r.torch_ms)} | {speedup} | {fmt_ms(r.roofline_ms)} "
            f"| {100 * r.roofline_ms / r.kernel_ms:.0f}% | {dense} | {of_dense} | {goal} | {met} |"
        )
    return lines


def refuse(what: str) -> int:
    print(f"bench/kernels.py needs {what}: nothing was measured or written", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        return refuse("a CUDA GPU; none is visible")
    if not _triton.AVAILABLE or _triton.INTERPRET:
        return refuse("Triton compiling for the GPU (installed, TRITON_INTERPRET unset)")

    timer = Timer(args.repeats)
    flops, copy = peak_rates(timer)
    rows: list[Row] = []
    for name in args.models.split(","):
        spec = load_spec(name)
        for T in map(int, args.tokens.split(",")):
            for routing in ROUTINGS:
                rows += Shape(spec, T, routing, timer, flops, copy).run()
                print("\n".join(table(rows[-OPS:])[2:]), flush=True)
                torch.cuda.empty_cache()
    props = torch.cuda.get_device_properties(0)
    lines = [
        f"# Kernel timings on {props.name} ({props.total_memory / 2**30:.0f} GiB), "
        f"torch {torch.__version__}",
        "",
        f"Measured here: dense bf16 matmul {flops / 1e12:.0f} TFLOP/s (8192^3), "
        f"device-to-device copy {copy / 1e9:.0f} GB/s (read + write). "
        f"Median of {args.repeats} runs after warm-up, L2 flushed before each; ms = 1e-3 s.",
        "",
        *table(rows),
        "",
    ]
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"kernels-{gpu_slug()}.md"
    path.write_text("\n".join(lines))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
