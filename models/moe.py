"""Mixture-of-Experts feed-forward layer: router, permute, grouped expert GEMMs, unpermute.

Shape legend: T tokens, D model width, F expert hidden width, E experts, K top-k,
R routed rows (T*K, fewer when a capacity factor drops some).

Data flow (one module per step, so the tracer sees each as an operator; each step calls a
tera.kernels op: a Triton kernel on CUDA tensors, its torch reference on CPU and `meta`):
  Router     x_TD -> expert_idx_TK, weight_TK, counts_E   (+ auxiliary load-balancing loss)
  Permute    x_TD -> x_RD grouped by expert, row_TK (each choice's row), offsets_E
  Experts    x_RD -> y_RD, grouped GEMMs over every expert's contiguous rows at once
  Unpermute  y_RD -> y_TD, weighted sum of each token's kept expert outputs
Shared experts run densely on every token and are added to the routed output.

Routing is dropless when capacity_factor is None, and then nothing is read back to the
host. Otherwise expert e keeps the first ceil(cf * T * K / E) rows routed to it (in token
order) and drops the rest, which then contribute nothing (the residual connection carries
those tokens); sizing x_RD then reads the counts on the host, one sync per layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tera.kernels.dispatch import grouped_gemm, permute, route, unpermute
from tera.kernels.permute import routing_map
from tera.kernels.router import expert_counts, gate_scores, gate_weights
from tera.models.ffn import FeedForward, activation
from tera.models.spec import FFNSpec, ModelSpec, MoESpec


class Router(nn.Module):
    """Gate: scores = softmax or sigmoid of x·Wg; selection may add a bias (DeepSeek-V3's
    aux-loss-free balancing, arXiv 2412.19437 Sec 2.1.2) that does not change the weights.
    weight_TK is fp32, as the router computes it; the unpermute sums in fp32."""

    def __init__(self, dim: int, moe: MoESpec, balanced: bool, device=None, dtype=None):
        super().__init__()
        self.moe = moe
        self.balanced = balanced
        self.gate = nn.Linear(dim, moe.experts, bias=False, device=device, dtype=dtype)
        bias = torch.zeros(moe.experts, device=device, dtype=torch.float32)
        self.register_buffer("expert_bias_E", bias if moe.expert_bias else None)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x_TD: torch.Tensor):
        m = self.moe
        T, E, K = x_TD.shape[0], m.experts, m.top_k
        logits_TE = self.gate(x_TD)
        scores_TE = None  # computed in torch only where needed: the kernel has its own
        if self.balanced:
            # Token t's k-th choice is expert (t*K + k) mod E: every expert gets T*K/E rows.
            expert_idx_TK = (torch.arange(T * K, device=x_TD.device) % E).view(T, K)
            scores_TE = gate_scores(logits_TE, m.score)
            weight_TK = gate_weights(scores_TE, expert_idx_TK, m.normalize_top_k, m.route_scale)
            counts_E = expert_counts(expert_idx_TK, E)
        else:
            expert_idx_TK, weight_TK, counts_E = route(
                logits_TE, K, m.score, self.expert_bias_E, m.normalize_top_k, m.route_scale
            )
        self.aux_loss = None
        if m.aux_loss_coeff and self.training:
            # Switch Transformer load-balancing loss (arXiv 2101.03961 Eq. 4):
            # E * sum_e f_e * P_e, f_e the fraction of routed rows, P_e the mean gate score.
            if scores_TE is None:
                scores_TE = gate_scores(logits_TE, m.score)
            probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
            fraction_E = counts_E.float() / (T * K)
            self.aux_loss = m.aux_loss_coeff * E * (fraction_E * probs_TE.mean(0)).sum()
        return expert_idx_TK, weight_TK, counts_E


def balanced_counts(tokens: int, top_k: int, experts: int) -> list[int]:
    """Rows per expert under the balanced assignment (t*K + k) mod E."""
    rows = tokens * top_k
    return [rows // experts + (1 if e < rows % experts else 0) for e in range(experts)]


class Permute(nn.Module):
    """Gather token rows into expert-contiguous order, applying the capacity limit.

    Returns x_RD, row_TK (the row of each choice, -1 when dropped) and offsets_E (the end
    of each expert's rows). `host_counts`, the counts when the host already knows them
    (balanced routing), spares the capacity case reading counts_E back."""

    def __init__(self, moe: MoESpec):
        super().__init__()
        self.moe = moe

    def forward(self, x_TD, expert_idx_TK, counts_E, host_counts: list[int] | None = None):
        T, K = expert_idx_TK.shape
        capacity, rows = None, T * K
        if self.moe.capacity_factor is not None:
            capacity = math.ceil(self.moe.capacity_factor * T * K / self.moe.experts)
            counts = counts_E.tolist() if host_counts is None else host_counts
            rows = sum(min(c, capacity) for c in counts)
        row_TK, offsets_E = routing_map(expert_idx_TK, counts_E, capacity)
        return permute(x_TD, row_TK, rows), row_TK, offsets_E


class Experts(nn.Module):
    """E expert FFNs stored as stacked weights w1_EDF (gate), w3_EDF (up, gated kinds
    only), w2_EFD; expert e's rows are x_RD[offsets_E[e-1]:offsets_E[e]]."""

    def __init__(self, dim: int, moe: MoESpec, kind: str, device=None, dtype=None):
        super().__init__()
        self.kind = kind
        E, F_ = moe.experts, moe.expert_hidden
        kw = dict(device=device, dtype=dtype)
        self.w1_EDF = nn.Parameter(torch.empty(E, dim, F_, **kw))
        gated = FFNSpec(kind, F_).gated
        self.w3_EDF = nn.Parameter(torch.empty(E, dim, F_, **kw)) if gated else None
        self.w2_EFD = nn.Parameter(torch.empty(E, F_, dim, **kw))

    def forward(self, x_RD: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        if self.w3_EDF is not None:
            gate_RF = grouped_gemm(x_RD, self.w1_EDF, offsets_E)
            h_RF = activation(self.kind, grouped_gemm(x_RD, self.w3_EDF, offsets_E), gate=gate_RF)
        else:
            h_RF = activation(self.kind, grouped_gemm(x_RD, self.w1_EDF, offsets_E))
        return grouped_gemm(h_RF, self.w2_EFD, offsets_E)


class Unpermute(nn.Module):
    """y_TD[t] = sum over token t's kept choices k of weight_TK[t, k] * y_RD[row_TK[t, k]]."""

    def forward(self, y_RD, row_TK, weight_TK):
        return unpermute(y_RD, row_TK, weight_TK)


class MoE(nn.Module):
    def __init__(self, spec: ModelSpec, balanced_routing: bool = False, device=None, dtype=None):
        super().__init__()
        moe = spec.moe
        assert moe is not None
        self.moe = moe
        kw = dict(device=device, dtype=dtype)
        self.router = Router(spec.hidden, moe, balanced_routing, **kw)
        self.permute = Permute(moe)
        self.experts = Experts(spec.hidden, moe, spec.ffn.kind, **kw)
        self.unpermute = Unpermute()
        self.shared = None
        if moe.shared_experts:
            width = moe.shared_experts * moe.shared_hidden
            self.shared = FeedForward(spec.hidden, width, spec.ffn.kind, **kw)

    @property
    def aux_loss(self) -> torch.Tensor | None:
        return self.router.aux_loss

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        expert_idx_TK, weight_TK, counts_E = self.router(x_TD)
        host_counts = None
        if self.router.balanced:  # known without the data, which `meta` tensors lack
            host_counts = balanced_counts(B * S, self.moe.top_k, self.moe.experts)
        x_RD, row_TK, offsets_E = self.permute(x_TD, expert_idx_TK, counts_E, host_counts)
        y_RD = self.experts(x_RD, offsets_E)
        y_TD = self.unpermute(y_RD, row_TK, weight_TK)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        return y_TD.view(B, S, D)
