"""Spine timings: `tera-plan models` start-up and trace time of the large presets.

Targets (issue 2): start-up under 1.5 s, deepseek-v3 traced in under 10 s. Prints a table
and writes bench/results/spine.md. Run: python bench/spine.py
"""

from __future__ import annotations

import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "spine.md"
TRACED = [
    ("deepseek-v3", 4096),
    ("kimi-k2", 4096),
    ("qwen3-235b-a22b", 4096),
    ("mixtral-8x22b", 4096),
    ("llama3-405b", 8192),
    ("switch-c", 2048),
]


def startup_seconds(repeats: int = 5) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "tera.planner.cli", "models"], check=True, capture_output=True
        )
        times.append(time.perf_counter() - start)
    return times


def trace_seconds(name: str, seq_len: int) -> float:
    """Trace in a fresh process so that no cache or warm import helps."""
    code = (
        "import time; t = time.perf_counter(); from tera.models import load_spec; "
        "from tera.planner.trace import trace; "
        f"trace(load_spec({name!r}), {seq_len}); print(time.perf_counter() - t)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(out.stdout.strip())


def main() -> None:
    lines = [
        f"# Spine timings ({platform.node()}, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()})",
        "",
    ]
    start = startup_seconds()
    lines += [
        "| what | seconds | target |",
        "|---|---|---|",
        f"| `tera-plan models` start-up (median of {len(start)}) | "
        f"{statistics.median(start):.2f} | < 1.5 |",
    ]
    for name, seq in TRACED:
        seconds = trace_seconds(name, seq)
        target = "< 10" if name == "deepseek-v3" else ""
        row = f"| trace {name} at {seq} tokens, incl. torch import | {seconds:.2f} | {target} |"
        lines.append(row)
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
