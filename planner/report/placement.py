"""The rank-to-node placement map: every GPU of the plan as a cell at its (node, local GPU),
coloured once per parallel axis.

The groups come from planner/ranks.py (`process_groups`), never re-derived: on the TP and
EP panels all ranks of one group share a colour and neighbouring groups differ (ten hues,
then their light shades: colours repeat every 20 groups); on the PP panel a cell's colour
is its pipeline stage, its position in its (sorted) pp group, on a sequential scale, so
that which nodes hold which stage reads at a glance. An axis of degree 1 has no groups to
show and gets no panel (pp, grey, when no axis has groups).

Nodes are drawn as rows of their GPUs; more than NODES_PER_COLUMN nodes wrap into side by
side columns of nodes, so 2,048 GPUs on 8-GPU nodes make 8 columns of 32 nodes; past
MAX_COLUMNS columns the columns grow by 32 nodes at a time instead.
"""

from __future__ import annotations

import math

import matplotlib
from matplotlib.colors import to_hex, to_rgb

from tera.planner.ranks import process_groups
from tera.planner.report.charts import RC, add_boxes, figure, text_colour, to_svg

AXES = ("tp", "ep", "pp")
TITLES = {"tp": "tensor parallel (TP) groups", "ep": "expert parallel (EP) groups"}
NODES_PER_COLUMN = 32
MAX_COLUMNS = 16
LABEL_LIMIT = 128  # write rank numbers in the cells up to this many GPUs
NONE = "#d9d9d9"
_TAB20 = [to_hex(c) for c in matplotlib.colormaps["tab20"].colors]
GROUP_PALETTE = _TAB20[0::2] + _TAB20[1::2]  # ten distinct hues first


def group_index(plan, axis: str) -> list[int]:
    """For every rank, the index of its `axis` group in ranks.process_groups (sorted by
    first rank); for pp, the rank's stage (its place in its pp group)."""
    groups = process_groups(plan.layout.mesh)[axis]
    index = [0] * plan.world_size
    for g, group in enumerate(groups):
        for position, rank in enumerate(group):
            index[rank] = position if axis == "pp" else g
    return index


def axis_size(plan, axis: str) -> int:
    return getattr(plan.layout, axis)


def colours(plan) -> dict[str, list[str]]:
    """Per axis (tp, ep, pp), the hex colour of every rank's cell."""
    result = {}
    for axis in AXES:
        size = axis_size(plan, axis)
        if size == 1:
            result[axis] = [NONE] * plan.world_size
        elif axis == "pp":
            viridis = matplotlib.colormaps["viridis"]
            result[axis] = [to_hex(viridis(i / (size - 1))) for i in group_index(plan, axis)]
        else:
            result[axis] = [GROUP_PALETTE[i % len(GROUP_PALETTE)] for i in group_index(plan, axis)]
    return result


def column_rows(nodes: int) -> int:
    """Nodes per column of the map: NODES_PER_COLUMN, times what keeps the columns at
    MAX_COLUMNS or fewer; all of them when they fit in one."""
    per_column = NODES_PER_COLUMN * math.ceil(nodes / (NODES_PER_COLUMN * MAX_COLUMNS))
    return min(nodes, per_column)


def _cell(node: int, gpu: int, rows: int, gpus_per_node: int) -> tuple[float, float]:
    """(x, y) of a GPU's cell: GPUs left to right, nodes top to bottom, columns of `rows`
    nodes side by side with a one-cell gap."""
    column, row = divmod(node, rows)
    return column * (gpus_per_node + 1) + gpu, -row


def shown_axes(plan) -> tuple[str, ...]:
    """The axes with groups to show (degree > 1); pp alone when there is none."""
    return tuple(axis for axis in AXES if axis_size(plan, axis) > 1) or ("pp",)


def placement_map(plan) -> str:
    """One panel per shown axis, stacked, as one SVG."""
    rank_map = plan.rank_map()
    per_node = min(plan.cluster.gpus_per_node, plan.world_size)
    nodes = rank_map[-1][0] + 1
    rows = column_rows(nodes)
    columns = math.ceil(nodes / rows)
    width = columns * (per_node + 1) - 1
    cell_in = min(0.4, 8.0 / width)  # cells fill at most 8 of the figure's 10 inches
    axes = shown_axes(plan)
    fig = figure(len(axes) * (0.8 + rows * cell_in))
    by_axis = colours(plan)
    cells = [_cell(node, gpu, rows, per_node) for node, gpu in rank_map]
    labelled = plan.world_size <= LABEL_LIMIT
    with matplotlib.rc_context(RC):
        for i, axis in enumerate(axes):
            ax = fig.add_subplot(len(axes), 1, i + 1)
            by_colour: dict[str, list[tuple[float, float, float, float]]] = {}
            for (x, y), colour in zip(cells, by_axis[axis], strict=True):
                by_colour.setdefault(colour, []).append((x, y, 1, 1))
            for colour, boxes in by_colour.items():
                add_boxes(ax, boxes, colour, edgecolor="white", linewidth=0.5)
            if labelled:
                for rank, ((x, y), colour) in enumerate(zip(cells, by_axis[axis], strict=True)):
                    ax.text(
                        x + 0.5, y + 0.5, str(rank), ha="center", va="center", fontsize=7,
                        color=text_colour(to_rgb(colour)),
                    )  # fmt: skip
            ax.set_xlim(-0.2, width + 0.2)
            ax.set_ylim(-rows + 1 - 0.2, 1.2)
            ax.set_aspect("equal")
            ax.set_title(_title(plan, axis), loc="left")
            _ticks(ax, rows, columns, per_node, nodes)
            for side in ax.spines.values():
                side.set_visible(False)
    return to_svg(fig, "placement")


def _title(plan, axis: str) -> str:
    size = axis_size(plan, axis)
    if axis == "pp":
        if size == 1:
            return "pipeline stages: pp = 1, every GPU holds the whole model depth"
        return f"pipeline stage of each GPU (pp = {size}: stage 0 dark, stage {size - 1} light)"
    return f"{TITLES[axis]}: {plan.world_size // size} groups of {size}; one colour per group"


def _ticks(ax, rows: int, columns: int, per_node: int, nodes: int) -> None:
    """Node numbers down the left (every row up to 16 rows, else every 4th, 8th, ...);
    GPU numbers under a single column, else the first node of each column."""
    step = 1 if rows <= 16 else 4 * math.ceil(rows / 64)
    ax.set_yticks([0.5 - r for r in range(0, rows, step)], [str(r) for r in range(0, rows, step)])
    ax.set_ylabel("node" if columns == 1 else "node in column", fontsize=8)
    ax.tick_params(length=0, labelsize=7)
    if columns == 1:
        ax.set_xticks([g + 0.5 for g in range(per_node)], [str(g) for g in range(per_node)])
        ax.set_xlabel("GPU in node", fontsize=8)
        return
    centres = [c * (per_node + 1) + per_node / 2 for c in range(columns)]
    firsts = [c * rows for c in range(columns)]
    if columns <= 8:
        labels = [f"nodes {f}-{min(f + rows, nodes) - 1}" for f in firsts]
    else:  # no room for ranges: the first node of each column
        labels = [str(f) for f in firsts]
        ax.set_xlabel(f"columns of {rows} nodes, from node", fontsize=8)
    ax.set_xticks(centres, labels, fontsize=7)
