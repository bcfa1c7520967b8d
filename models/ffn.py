"""Dense feed-forward block and the FFN non-linearities, shared by dense layers, routed
experts and shared experts.

Shape legend: B batch, S sequence, D model width, F hidden width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tera.models.spec import FFNSpec


class _GatedActivation(torch.autograd.Function):
    """act(gate) * up, saving only its two inputs (act is recomputed in backward), as
    a fused SwiGLU/GeGLU kernel does; eager autograd would also keep act(gate)."""

    @staticmethod
    def forward(ctx, gate, up, kind):
        ctx.kind = kind
        ctx.save_for_backward(gate, up)
        return _gate_act(kind, gate) * up

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        if ctx.kind == "swiglu":
            dgate = torch.ops.aten.silu_backward(dy * up, gate)
        else:
            dgate = torch.ops.aten.gelu_backward(dy * up, gate, approximate="tanh")
        return dgate, dy * _gate_act(ctx.kind, gate), None


def _gate_act(kind: str, gate: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) if kind == "swiglu" else F.gelu(gate, approximate="tanh")


def activation(kind: str, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """The FFN non-linearity; gated kinds multiply act(gate) by the up projection `x`."""
    if kind in ("swiglu", "geglu"):
        return _GatedActivation.apply(gate, x, kind)
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
