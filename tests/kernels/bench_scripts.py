"""The scripts under bench/ as modules, for the tests of their plumbing (bench/ holds
scripts, not a package)."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).parents[2] / "bench"


@functools.cache
def load(name: str):
    """bench/<name>.py, imported once."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
