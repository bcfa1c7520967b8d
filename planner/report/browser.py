"""Load a page in headless Chromium: a screenshot and the console messages, and a check that
a screenshot is not blank. Used by the report's test and by bench/report_example.py.

Console messages are read from Chromium's own log (`--enable-logging=stderr --v=0`), where
every console call and uncaught exception prints a line `...:CONSOLE(<line>)] "<text>",
source: <url>`. That log does not give the level, so every console message counts as an
error: the report runs no script, and any message means something ran that should not
have. (Failed resource loads do not reach that log; the report's own test checks instead
that the page references no resource at all.)
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BINARIES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    for name in BINARIES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass(frozen=True)
class PageLoad:
    png: Path  # the screenshot
    console: tuple[str, ...]  # every console message and uncaught exception, as logged


def console_messages(log: str) -> list[str]:
    """The console lines of a Chromium log."""
    return [line for line in log.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def load(
    page: Path, png: Path, width: int = 1200, height: int = 1600, binary: str | None = None
) -> PageLoad:
    """Open `page` (a file) at a fixed window size, write the screenshot to `png`. Raises
    RuntimeError when Chromium is missing or writes no screenshot."""
    binary = binary or find_chromium()
    if binary is None:
        raise RuntimeError("no chromium binary on PATH")
    with tempfile.TemporaryDirectory(prefix="tera-chromium-") as profile:
        command = [
            binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}",
            f"--window-size={width},{height}", f"--screenshot={png}",
            "--enable-logging=stderr", "--v=0", Path(page).resolve().as_uri(),
        ]  # fmt: skip
        if png.exists():
            png.unlink()
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if not png.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"chromium wrote no screenshot (exit {done.returncode}): {tail}")
    return PageLoad(png, tuple(console_messages(done.stderr)))


@dataclass(frozen=True)
class Ink:
    """How much a screenshot shows: the share of pixels that differ from the background
    (the most common colour) and the number of distinct colours."""

    share: float
    colours: int

    def blank(self, min_share: float = 0.02, min_colours: int = 16) -> bool:
        return self.share < min_share or self.colours < min_colours


def ink(png: Path) -> Ink:
    from matplotlib.image import imread

    rgb = np.round(imread(png)[..., :3] * 255).astype(np.uint32)
    packed = (rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]).ravel()
    values, counts = np.unique(packed, return_counts=True)
    background = values[np.argmax(counts)]
    return Ink(float(np.mean(packed != background)), int(len(values)))
