"""Which implementation runs, and the package without Triton."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tera.kernels import _triton, dispatch


def test_kernels_only_for_cuda_or_inside_the_switch():
    cpu, meta = torch.zeros(1), torch.zeros(1, device="meta")
    assert not dispatch.uses_triton(cpu) and not dispatch.uses_triton(meta)
    with dispatch.triton_for("cpu"):
        assert dispatch.uses_triton(cpu) and not dispatch.uses_triton(meta)
    assert not dispatch.uses_triton(cpu)


def test_cpu_switch_refuses_compiled_kernels(monkeypatch):
    monkeypatch.setattr(_triton, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        with dispatch.triton_for("cpu"):
            pass


def test_meta_switch_needs_the_compiler():
    # These tests run under the interpreter (conftest.py), which cannot compile.
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET unset"):
        with dispatch.triton_for("meta"):
            pass


def test_switch_knows_its_device_types():
    with pytest.raises(ValueError, match="'cpu' or 'meta'"):
        with dispatch.triton_for("cuda"):
            pass


NO_TRITON = """
import sys
sys.modules["triton"] = None  # as on a platform without Triton: `import triton` fails
import torch
from tera.kernels import _triton
from tera.models import load_spec
from tera.models.moe import MoE

assert not _triton.AVAILABLE
spec = load_spec("tiny-moe")
moe = MoE(spec)
for p in moe.parameters():
    torch.nn.init.normal_(p, std=0.02)
moe(torch.randn(2, 8, spec.hidden)).sum().backward()
"""


def test_models_run_without_triton():
    result = subprocess.run([sys.executable, "-c", NO_TRITON], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
