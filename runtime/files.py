"""Durable file writes shared by checkpoints and metrics."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a reader, or a crash at any point, sees either
    the old file or the whole new one: write a temporary sibling, fsync it, rename it over
    `path`. (The rename itself is durable once the caller fsyncs the directory.)"""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
