"""`tera-plan show plan.json`: the summary() of a plan as rich tables in a terminal."""

from __future__ import annotations

from rich.table import Table

from tera.planner.report import units
from tera.planner.report.summary import summary

TEXT_COLUMNS = ("metric", "value", "part", "layout")  # left-aligned; numbers align right


def _table(title: str, columns: list[str]) -> Table:
    table = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        justify = "left" if column in TEXT_COLUMNS else "right"
        table.add_column(column, justify=justify, no_wrap=i == 0)
    return table


def print_summary(plan, console) -> None:
    s = summary(plan)
    console.print(
        f"[bold]{s['model']}[/] on {s['cluster']}: {s['gpus']:,} {s['gpu']} GPUs, "
        f"{s['precision']}, global batch {s['global_batch']:,} x {s['seq_len']:,} tokens, "
        f"{s['microbatches']} micro-batches",
        highlight=False,
    )
    console.print(f"layout: {s['layout']}", highlight=False)
    fits = "fits" if s["fits"] else "DOES NOT FIT"
    prediction = _table("prediction", ["metric", "value"])
    prediction.add_row("step time", units.duration(s["step_time_s"]))
    prediction.add_row(
        "tokens/s",
        f"{units.count(s['tokens_per_s_per_gpu'])} per GPU, {units.count(s['tokens_per_s'])} "
        "in all",
    )
    prediction.add_row("MFU (of dense BF16 peak)", units.percent(s["mfu"]))
    prediction.add_row(
        "peak memory per GPU",
        f"{units.gib(s['peak_memory_gib'])} of {units.gib(s['hbm_gib'])} HBM ({fits})",
    )
    prediction.add_row(
        "cost",
        f"{units.usd(s['usd_per_million_tokens'])} per million tokens, "
        f"{units.usd(s['usd_per_step'])} per step (${s['price_per_gpu_hour_usd']:g}/GPU-hour)",
    )
    certificate = s["certificate"]
    prediction.add_row(
        "certificate",
        "none (hand-written layout)"
        if certificate is None
        else f"{certificate['status']}, gap {units.percent(certificate['gap'])}",
    )
    console.print(prediction)
    parts = _table("step time by part", ["part", "time", "share"])
    for part, seconds in s["breakdown_s"].items():
        parts.add_row(part, units.duration(seconds), units.percent(seconds / s["step_time_s"]))
    console.print(parts)
    if s["alternatives"]:
        first = s["alternatives"][0]["step_time_s"]
        table = _table(
            "top plans", ["#", "GPUs", "layout", "step", "vs #1", "tokens/s/GPU", "MFU", "peak"]
        )
        for a in s["alternatives"]:
            table.add_row(
                str(a["rank"]),
                f"{a['gpus']:,}",
                units.short_layout(a["layout_string"]),
                units.duration(a["step_time_s"]),
                f"+{units.percent(a['step_time_s'] / first - 1)}",
                units.count(a["tokens_per_s_per_gpu"]),
                units.percent(a["mfu"]),
                units.gib(a["peak_memory_gib"]),
            )
        console.print(table)
