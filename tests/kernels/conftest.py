"""The kernel tests run the Triton kernels on the CPU, in Triton's interpreter.

Triton reads TRITON_INTERPRET when it decorates a kernel, that is when tera.kernels is
first imported: pytest loads this file before it imports any test module, so the variable
is set here. (A run that imports tera.kernels first through other tests is told so by
tera.kernels.dispatch.triton_for("cpu").)
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from tera.kernels.dispatch import triton_for  # noqa: E402


@pytest.fixture
def triton():
    """Inside the test, ops on CPU tensors run the Triton kernels (interpreted)."""
    with triton_for("cpu"):
        yield


@pytest.fixture
def poisoned(monkeypatch):
    """torch.empty hands out NaN-filled floats and -7777-filled integers, so that an output
    element a kernel fails to write cannot pass as a value."""
    empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        if t.is_floating_point():
            return t.fill_(float("nan"))
        if t.dtype in (torch.int32, torch.int64):
            return t.fill_(-7777)
        return t

    monkeypatch.setattr(torch, "empty", poisoned_empty)
