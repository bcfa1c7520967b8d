"""The report's figures, drawn with matplotlib's object API (no pyplot, no display) and
returned as SVG text to inline in the page.

SVG settings, for a lean and self-contained page: text stays text (svg.fonttype none: no
glyph outlines, and the browser's sans-serif draws it), nothing is rasterized, there is
no metadata (no date: the same plan gives the same bytes; no links to RDF vocabularies),
and each figure's ids carry its name so that two inlined figures never share one.
"""

from __future__ import annotations

import io
import math
import re

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch, PathPatch
from matplotlib.path import Path

from tera.planner.report import units
from tera.planner.report.schedule import FORWARD, Timeline

# One colour per step-time part, the same on every page.
PART_COLOURS = {
    "compute": "#4c78a8",
    "recompute": "#9ecae9",
    "tp_comm": "#f58518",
    "cp_comm": "#ffbf79",
    "ep_comm": "#e45756",
    "pp_comm": "#b279a2",
    "bubble": "#bab0ac",
    "dp_comm": "#54a24b",
    "optimizer": "#eeca3b",
}
MEMORY_COLOURS = {
    "params": "#4c78a8",
    "grads": "#72b7b2",
    "optimizer": "#eeca3b",
    "activations": "#f58518",
    "buffers": "#b279a2",
}
IDLE = "#ececec"
WIDTH_IN = 10.0  # figure width, inches (720 pt)
SVG_METADATA = ("Date", "Creator", "Format", "Type")  # None each: no <metadata> element
RC = {"font.size": 9, "font.family": "sans-serif", "svg.fonttype": "none", "axes.titlesize": 10}


def figure(height_in: float) -> Figure:
    with matplotlib.rc_context(RC):
        return Figure(figsize=(WIDTH_IN, height_in), layout="constrained")


def to_svg(fig: Figure, name: str) -> str:
    """The figure as an <svg> element: no XML prologue, no metadata, every id (and every
    reference to one) prefixed with `name`, so that figures inlined in one page never
    share an id (matplotlib numbers its groups figure_1, axes_1, ... in each), and path
    coordinates cut to two decimals."""
    buffer = io.StringIO()
    with matplotlib.rc_context({**RC, "svg.hashsalt": name}):
        fig.savefig(buffer, format="svg", metadata=dict.fromkeys(SVG_METADATA))
    text = buffer.getvalue()
    text = text[text.index("<svg") :]
    text = re.sub(r'\bid="([^"]+)"', rf'id="{name}-\1"', text)
    text = re.sub(r'(url\(#|href="#)([^")]+)', rf"\g<1>{name}-\2", text)
    return re.sub(r'\bd="[^"]*"', _two_decimals, text)


def _two_decimals(path: re.Match) -> str:
    """Path coordinates to 0.01 pt (matplotlib writes 6 decimals): a third of the bytes
    of a 2,048-GPU map, and no visible difference."""
    return re.sub(r"(\.\d\d)\d+", r"\1", path.group())


def add_boxes(ax, boxes: list[tuple[float, float, float, float]], colour, **style) -> None:
    """Draw rectangles (x, y, width, height) of one colour as ONE compound path: in SVG
    that is one element of about 100 bytes a box instead of one styled element of about
    260, which keeps 2,048-GPU maps and long schedules small (and fast to draw)."""
    if not boxes:
        return
    corners = np.array([(0, 0), (1, 0), (1, 1), (0, 1), (0, 0)], dtype=float)
    xy = np.array(boxes, dtype=float)
    vertices = xy[:, None, :2] + corners[None, :, :] * xy[:, None, 2:]
    codes = np.tile([Path.MOVETO, Path.LINETO, Path.LINETO, Path.LINETO, Path.CLOSEPOLY], len(xy))
    path = Path(vertices.reshape(-1, 2), codes)
    ax.add_patch(PathPatch(path, facecolor=colour, **style))


def step_time_bar(breakdown_s: dict[str, float], step_time_s: float) -> str:
    """One horizontal bar of the step, split into its parts (those above zero)."""
    fig = figure(2.0)
    with matplotlib.rc_context(RC):
        ax = fig.add_subplot()
        unit, size = units.time_unit(step_time_s)
        left, handles = 0.0, []
        for part, seconds in breakdown_s.items():
            if seconds <= 0:
                continue
            colour = PART_COLOURS.get(part, "#888888")
            ax.barh(0, seconds / size, left=left, color=colour, height=0.6, edgecolor="white")
            left += seconds / size
            label = f"{part} {units.duration(seconds)} ({units.percent(seconds / step_time_s)})"
            handles.append(Patch(color=colour, label=label))
        ax.set_xlim(0, max(left, step_time_s / size))
        ax.set_yticks([])
        ax.set_xlabel(f"time in one step ({unit})")
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
        fig.legend(handles=handles, loc="outside lower center", ncols=3, frameon=False)
    return to_svg(fig, "step-time")


def memory_chart(stage_memory_gib: list[dict[str, float]], hbm_gib: float) -> str:
    """Stacked memory parts of one GPU of every pipeline stage against the HBM line. When
    the fullest stage uses under a tenth of HBM the line would flatten the bars, so the
    axis fits the bars and a note gives the HBM size instead."""
    stages = len(stage_memory_gib)
    peak_gib = max(sum(memory.values()) for memory in stage_memory_gib)
    unit, scale = ("GiB", 1.0) if peak_gib >= 1 else ("MiB", 1024.0)
    fig = figure(3.2)
    with matplotlib.rc_context(RC):
        ax = fig.add_subplot()
        bottoms = [0.0] * stages
        for part, colour in MEMORY_COLOURS.items():
            heights = [memory.get(part, 0.0) * scale for memory in stage_memory_gib]
            ax.bar(range(stages), heights, bottom=bottoms, color=colour, label=part, width=0.7)
            bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
        peak, hbm = peak_gib * scale, hbm_gib * scale
        if peak >= 0.1 * hbm:
            ax.axhline(
                hbm, color="#d62728", linestyle="--", linewidth=1.5,
                label=f"HBM {units.gib(hbm_gib)} per GPU",
            )  # fmt: skip
            ax.set_ylim(0, max(peak, hbm) * 1.12)
        else:
            ax.set_ylim(0, peak * 1.3)
            ax.text(
                0.99, 0.97, f"HBM line ({units.gib(hbm_gib)} per GPU) is off the scale: "
                f"the fullest stage uses {units.percent(peak_gib / hbm_gib)} of it",
                transform=ax.transAxes, ha="right", va="top", color="#d62728",
            )  # fmt: skip
        ax.set_ylabel(f"memory per GPU ({unit})")
        ax.set_xlabel("pipeline stage")
        ax.set_xticks(range(stages))
        ax.set_xlim(-0.6, stages - 0.4)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return to_svg(fig, "memory")


def _chunk_colour(kind: str, chunk: int, vpp: int):
    """Blues for forwards, oranges for backwards, darker for later chunks."""
    cmap = matplotlib.colormaps["Blues" if kind == FORWARD else "Oranges"]
    return cmap(0.55 if vpp == 1 else 0.35 + 0.5 * chunk / (vpp - 1))


def text_colour(background) -> str:
    """Black on light boxes, white on dark ones (relative luminance, ITU-R BT.709)."""
    r, g, b = background[:3]
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.5 else "white"


def gantt(timeline: Timeline, label_limit: int = 160) -> str:
    """The schedule: one row per stage (stage 0 on top), one box per op, idle time in
    grey. Micro-batch numbers are written in the boxes when there are few enough."""
    stages, vpp = timeline.stages, timeline.vpp
    makespan = timeline.makespan
    unit, size = units.time_unit(makespan)
    fig = figure(max(1.8, 0.9 + 0.28 * stages))
    with matplotlib.rc_context(RC):
        ax = fig.add_subplot()
        ax.set_facecolor(IDLE)
        boxes: dict[tuple[str, int], list[tuple[float, float, float, float]]] = {}
        labelled = len(timeline.slots) <= label_limit
        for slot in timeline.slots:
            x, width = slot.start / size, (slot.end - slot.start) / size
            y = stages - 1 - slot.stage
            key = (slot.op.kind, slot.op.chunk)
            boxes.setdefault(key, []).append((x, y - 0.4, width, 0.8))
            if labelled and width > makespan / size / 80:
                ax.text(
                    x + width / 2, y, str(slot.op.microbatch), ha="center", va="center",
                    fontsize=7, color=text_colour(_chunk_colour(*key, vpp)),
                )  # fmt: skip
        handles = []
        forwards_first = sorted(boxes, key=lambda key: (key[0] != FORWARD, key[1]))
        for kind, chunk in forwards_first:
            rects = boxes[(kind, chunk)]
            colour = _chunk_colour(kind, chunk, vpp)
            add_boxes(ax, rects, colour, edgecolor="white", linewidth=0.4)
            name = "forward" if kind == FORWARD else "backward"
            handles.append(Patch(color=colour, label=name + (f" chunk {chunk}" if vpp > 1 else "")))
        handles.append(Patch(facecolor=IDLE, edgecolor="#999999", label="idle (bubble)"))
        ax.set_xlim(0, makespan / size)
        ax.set_ylim(-0.6, stages - 0.4)
        step = max(1, math.ceil(stages / 16))
        ticks = list(range(0, stages, step))
        ax.set_yticks([stages - 1 - s for s in ticks], [f"stage {s}" for s in ticks])
        ax.set_xlabel(f"time ({unit})")
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return to_svg(fig, "schedule")
