"""Dense feed-forward block and the FFN non-linearities, shared by dense layers, routed
experts and shared experts.

Shape legend: B batch, S sequence, D model width, F hidden width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tera.models.spec import FFNSpec


def activation(kind: str, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """The FFN non-linearity; gated kinds multiply act(gate) by the up projection `x`."""
    if kind == "swiglu":
        return F.silu(gate) * x
    if kind == "geglu":
        return F.gelu(gate, approximate="tanh") * x
    if kind == "gelu":
        return F.gelu(x, approximate="tanh")
    if kind == "relu":
        return F.relu(x)
    if kind == "squared_relu":
        return F.relu(x).square()
    raise ValueError(f"unknown activation {kind!r}")


class FeedForward(nn.Module):
    """Dense FFN: w2(act(w1 x) [* w3 x]). For gated kinds w1 is the gate, w3 the up
    projection."""

    def __init__(self, dim: int, hidden: int, kind: str, device=None, dtype=None):
        super().__init__()
        self.kind = kind
        kw = dict(bias=False, device=device, dtype=dtype)
        self.w1 = nn.Linear(dim, hidden, **kw)
        self.w3 = nn.Linear(dim, hidden, **kw) if FFNSpec(kind, hidden).gated else None
        self.w2 = nn.Linear(hidden, dim, **kw)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        if self.w3 is not None:
            h_BSF = activation(self.kind, self.w3(x_BSD), gate=self.w1(x_BSD))
        else:
            h_BSF = activation(self.kind, self.w1(x_BSD))
        return self.w2(h_BSF)
