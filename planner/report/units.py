"""Numbers in human units for the report's tables and captions: seconds scaled to µs, ms,
s, min or h; bytes in binary units (KiB, MiB, GiB; 1 GiB = 2^30 bytes); dollars.

Every string carries its unit, and three significant figures are enough for a prediction
whose error is several percent (README, "How good the predictions are")."""

from __future__ import annotations

import math

from tera.planner.layout import Layout
from tera.planner.ranks import DEFAULT_ORDER

TIME_UNITS = (("h", 3600.0), ("min", 60.0), ("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9))


def _figures(value: float) -> str:
    """Three significant figures without an exponent (up to 999)."""
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def time_unit(seconds: float) -> tuple[str, float]:
    """The unit to show `seconds` in, and its size in seconds: the largest unit of which
    the value is at least one (minutes from 2 min on, so that 90 s stays 90 s)."""
    for name, size in TIME_UNITS:
        if abs(seconds) >= (2 * size if name in ("h", "min") else size):
            return name, size
    return TIME_UNITS[-1]


def duration(seconds: float) -> str:
    if seconds == 0:
        return "0 s"
    name, size = time_unit(seconds)
    return f"{_figures(seconds / size)} {name}"


def gib(value: float) -> str:
    """GiB shown as GiB from 1 GiB on, else MiB or KiB."""
    for name, scale in (("GiB", 1.0), ("MiB", 2**10), ("KiB", 2**20)):
        if abs(value) * scale >= 1:
            return f"{_figures(value * scale)} {name}"
    return f"{value * 2**30:.0f} B"


def usd(value: float) -> str:
    """Dollars: cents from $0.01 on, else two significant figures, never an exponent."""
    if value >= 1000:
        return f"${value:,.0f}"
    if value >= 0.01 or value <= 0:
        return f"${value:.2f}"
    return f"${value:.{1 - math.floor(math.log10(value))}f}"


def count(value: float) -> str:
    """A large count with thousands separators (tokens/s)."""
    return f"{value:,.0f}"


def percent(fraction: float) -> str:
    """One decimal, or two significant figures below 1% (so 0.017% is not 0.0%)."""
    if 0 < abs(fraction) < 0.01:
        return f"{fraction * 100:.2g}%"
    return f"{fraction:.1%}"


def short_layout(text: str) -> str:
    """A layout string in the short form tables print (Layout.brief), plus the rank order
    where it is not the default: two ranked plans may differ in nothing else."""
    layout = Layout.parse(text)
    order = f",order={layout.order}" if layout.order != DEFAULT_ORDER else ""
    return layout.brief() + order
