"""tera.planner.report: a plan as a page a person would rather look at than read
(`tera-plan show plan.json --html report.html`), as a dict (`--json`) or as a terminal
summary.

  summary(plan) -> dict      the headline numbers, all from the plan file (summary.py)
  print_summary(plan, console)  the same as rich tables (terminal.py)
  render_html(plan) -> str   one self-contained HTML page: summary, step-time breakdown,
                             memory per stage against HBM, the pipeline schedule simulated
                             from the cost model (schedule.py), the rank placement map
                             coloured by TP, EP and PP groups (placement.py) and the
                             ranked alternatives; figures are matplotlib SVG, inline

Importing this package is cheap; matplotlib and the cost model load on render_html.
"""

from __future__ import annotations

from tera.planner.report.summary import summary
from tera.planner.report.terminal import print_summary

__all__ = ["drawn_microbatches", "print_summary", "render_html", "summary"]

# The schedule shows 2*pp micro-batches at most (warm-up, a steady state as long, and the
# drain: the steady state only repeats after that) and about MAX_DRAWN_OPS boxes, which
# keeps the boxes wide enough to read and the page small.
MAX_DRAWN_OPS = 1200


def drawn_microbatches(microbatches: int, stages: int, vpp: int) -> int:
    """Micro-batches the schedule figure shows: up to max(2*pp, 8) while their ops fit in
    MAX_DRAWN_OPS, a multiple of pp for the interleaved schedule (which needs one), never
    fewer than pp (which shows the warm-up and drain whole), never more than the step's."""
    ops_per_microbatch = 2 * stages * vpp
    shown = min(max(2 * stages, 8), MAX_DRAWN_OPS // ops_per_microbatch)
    if vpp > 1:
        shown -= shown % stages
    return min(microbatches, max(shown, stages))


def render_html(plan) -> str:
    from html import escape

    from tera.planner.plan import SCHEMA_VERSION
    from tera.planner.report import charts, page, placement, units
    from tera.planner.report.costs import cost_views
    from tera.planner.report.schedule import simulate

    s = summary(plan)
    views = cost_views(plan)
    m, pp, vpp = s["microbatches"], plan.layout.pp, plan.layout.vpp
    full = simulate(views.forward, views.backward, m)
    shown = drawn_microbatches(m, pp, vpp)
    drawn = full if shown == m else simulate(views.forward, views.backward, shown)

    stale = ""
    if views.differs_from(plan.prediction):
        stale = (
            f' <span class="note">The cost model now gives a step of '
            f"{units.duration(views.estimate.step_time_s)} where the plan says "
            f"{units.duration(s['step_time_s'])} (calibration changed since the plan was "
            "written, or the plan was searched with --imbalance); this chart uses the model "
            "as it is now.</span>"
        )
    schedule_name = "Interleaved 1F1B" if vpp > 1 else "1F1B"
    scope = (
        f"all {m} micro-batches"
        if shown == m
        else f"{shown} of the {m} micro-batches (the same schedule with fewer micro-batches: "
        "warm-up and drain as in the full step, a shorter steady state)"
    )
    chunks = f", {vpp} chunks per stage" if vpp > 1 else ""
    schedule_caption = (
        f"{schedule_name} on {pp} stages{chunks}, drawn for {scope}. Each box is one "
        "micro-batch's forward (blue) or backward (orange) on one stage, placed by "
        "simulating the schedule's dependencies with the cost model's per-chunk times; "
        "grey is idle. Whole step: the simulated pipeline takes "
        f"{units.duration(full.makespan)} with {units.percent(full.bubble_fraction)} of "
        f"stage time idle; the cost model's pipeline time is "
        f"{units.duration(views.pipeline_s)}.{stale}"
    )
    memory_caption = (
        "Memory of one GPU of each pipeline stage, by part (the plan's peak is "
        f"{escape(units.gib(s['peak_memory_gib']))}). The dashed line is the GPU's HBM."
    )
    step_caption = (
        f"The predicted step of {units.duration(s['step_time_s'])}, on the slowest stage: "
        "compute and the exposed part of each communication, per step."
    )
    placement_caption = (
        f"Every GPU at its node (row) and local index (column): {s['gpus']:,} GPUs on "
        f"{s['nodes']:,} node{'s' if s['nodes'] > 1 else ''}. Groups from planner/ranks.py; "
        f"rank order {plan.layout.order}."
    )
    sections = [
        page.section("summary", "Summary", "", page.summary_section(s)),
        page.section(
            "step-time",
            "Where the step time goes",
            step_caption,
            f"<figure>{charts.step_time_bar(s['breakdown_s'], s['step_time_s'])}</figure>",
        ),
        page.section(
            "memory",
            "Memory per pipeline stage",
            memory_caption,
            f"<figure>{charts.memory_chart(views.stage_memory_gib, s['hbm_gib'])}</figure>",
        ),
        page.section(
            "schedule",
            "Pipeline schedule",
            schedule_caption,
            f"<figure>{charts.gantt(drawn)}</figure>",
        ),
        page.section(
            "placement",
            "Rank placement",
            placement_caption,
            f"<figure>{placement.placement_map(plan)}</figure>",
        ),
        page.section(
            "alternatives",
            "Top plans from the search",
            "Ranked by the search's objective; the highlighted row is this plan. Hover a "
            "layout for its full string.",
            page.alternatives_table(s["alternatives"], str(plan.layout)),
        ),
    ]
    title = f"{s['model']} on {s['gpus']:,} {s['gpu']} GPUs"
    subtitle = (
        f"tera plan for {escape(s['cluster'])}, {escape(s['precision'])}, global batch "
        f"{s['global_batch']:,} x {s['seq_len']:,} tokens"
    )
    versions = plan.provenance
    footer = (
        f"tera {escape(str(versions.get('tera')))}, plan schema {SCHEMA_VERSION}. "
        "Times in s/ms/µs, memory in binary units (1 GiB = 2^30 bytes)."
    )
    return page.document(title, subtitle, sections, footer)
