"""Mixture-of-Experts feed-forward layer: router, permute, grouped expert GEMMs, unpermute.

Shape legend: T tokens, D model width, F expert hidden width, E experts, K top-k,
R routed rows (T*K, fewer when a capacity factor drops some).

Data flow (one module per step, so the tracer sees each as an operator):
  Router     x_TD -> expert_idx_TK, weight_TK, counts_E   (+ auxiliary load-balancing loss)
  Permute    x_TD -> x_RD grouped by expert, row_token_R, row_weight_R
  Experts    x_RD -> y_RD, one GEMM chain per expert over its contiguous rows
  Unpermute  y_RD -> y_TD, weighted sum of each token's k expert outputs
Shared experts run densely on every token and are added to the routed output.

Routing is dropless when capacity_factor is None; otherwise expert e keeps the first
ceil(cf * T * K / E) rows routed to it (in token order) and drops the rest, which then
contribute nothing (the residual connection carries those tokens).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tera.models.ffn import FeedForward, activation
from tera.models.spec import FFNSpec, ModelSpec, MoESpec


class Router(nn.Module):
    """Gate: scores = softmax or sigmoid of x·Wg; selection may add a bias (DeepSeek-V3's
    aux-loss-free balancing, arXiv 2412.19437 Sec 2.1.2) that does not change the weights."""

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
        logits_TE = self.gate(x_TD).float()
        scores_TE = logits_TE.softmax(-1) if m.score == "softmax" else logits_TE.sigmoid()
        if self.balanced:
            # Token t's k-th choice is expert (t*K + k) mod E: every expert gets T*K/E rows.
            flat = torch.arange(T * K, device=x_TD.device) % E
            expert_idx_TK = flat.view(T, K)
        else:
            select_TE = scores_TE if self.expert_bias_E is None else scores_TE + self.expert_bias_E
            expert_idx_TK = select_TE.topk(K, dim=-1).indices
        weight_TK = scores_TE.gather(1, expert_idx_TK)
        if m.normalize_top_k:
            weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        weight_TK = weight_TK * m.route_scale
        counts_E = torch.zeros(E, device=x_TD.device, dtype=torch.int64)
        counts_E = counts_E.scatter_add(
            0, expert_idx_TK.flatten(), torch.ones_like(expert_idx_TK.flatten())
        )
        self.aux_loss = None
        if m.aux_loss_coeff and self.training:
            # Switch Transformer load-balancing loss (arXiv 2101.03961 Eq. 4):
            # E * sum_e f_e * P_e, f_e the fraction of routed rows, P_e the mean gate score.
            probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
            fraction_E = counts_E.float() / (T * K)
            self.aux_loss = m.aux_loss_coeff * E * (fraction_E * probs_TE.mean(0)).sum()
        return expert_idx_TK, weight_TK.to(x_TD.dtype), counts_E


def balanced_counts(tokens: int, top_k: int, experts: int) -> list[int]:
    """Rows per expert under the balanced assignment (t*K + k) mod E."""
    rows = tokens * top_k
    return [rows // experts + (1 if e < rows % experts else 0) for e in range(experts)]


class Permute(nn.Module):
    """Gather token rows into expert-contiguous order, applying the capacity limit.

    Returns x_RD, the token index and routing weight of each kept row, and the kept row
    count per expert as a Python list (host values: the expert loop slices by them)."""

    def __init__(self, moe: MoESpec):
        super().__init__()
        self.moe = moe

    def forward(self, x_TD, expert_idx_TK, weight_TK, counts_E, host_counts: list[int]):
        T, K = expert_idx_TK.shape
        E = self.moe.experts
        order_R = torch.sort(expert_idx_TK.flatten(), stable=True).indices
        kept_counts = host_counts
        if self.moe.capacity_factor is not None:
            capacity = math.ceil(self.moe.capacity_factor * T * K / E)
            kept_counts = [min(c, capacity) for c in host_counts]
            if kept_counts != host_counts:
                keep = torch.cat(
                    [
                        torch.arange(start, start + kept, device=x_TD.device)
                        for start, kept in zip(
                            _exclusive_cumsum(host_counts), kept_counts, strict=True
                        )
                    ]
                )
                order_R = order_R[keep]
        row_token_R = order_R // K
        x_RD = x_TD.index_select(0, row_token_R)
        row_weight_R = weight_TK.flatten().index_select(0, order_R)
        return x_RD, row_token_R, row_weight_R, kept_counts


def _exclusive_cumsum(values: list[int]) -> list[int]:
    out, total = [], 0
    for v in values:
        out.append(total)
        total += v
    return out


class Experts(nn.Module):
    """E expert FFNs stored as stacked weights w1_EDF (gate), w3_EDF (up, gated kinds
    only), w2_EFD; rows of expert e are the contiguous slice given by its count."""

    def __init__(self, dim: int, moe: MoESpec, kind: str, device=None, dtype=None):
        super().__init__()
        self.kind = kind
        E, F_ = moe.experts, moe.expert_hidden
        kw = dict(device=device, dtype=dtype)
        self.w1_EDF = nn.Parameter(torch.empty(E, dim, F_, **kw))
        gated = FFNSpec(kind, F_).gated
        self.w3_EDF = nn.Parameter(torch.empty(E, dim, F_, **kw)) if gated else None
        self.w2_EFD = nn.Parameter(torch.empty(E, F_, dim, **kw))

    def forward(self, x_RD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        # unbind once: indexing w[e] per expert would make backward build E full-size
        # zero gradients, one per expert.
        w1s = self.w1_EDF.unbind(0)
        w3s = self.w3_EDF.unbind(0) if self.w3_EDF is not None else None
        w2s = self.w2_EFD.unbind(0)
        outputs, start = [], 0
        for e, rows in enumerate(counts):
            if rows == 0:
                continue
            x = x_RD[start : start + rows]
            start += rows
            if w3s is not None:
                h = activation(self.kind, x @ w3s[e], gate=x @ w1s[e])
            else:
                h = activation(self.kind, x @ w1s[e])
            outputs.append(h @ w2s[e])
        if not outputs:
            return x_RD.new_zeros(0, self.w2_EFD.shape[-1])
        return torch.cat(outputs)


class Unpermute(nn.Module):
    """y_TD[t] = sum over kept rows r of token t of weight_r * y_RD[r]."""

    def forward(self, y_RD, row_token_R, row_weight_R, tokens: int):
        y_TD = y_RD.new_zeros(tokens, y_RD.shape[-1])
        return y_TD.index_add(0, row_token_R, y_RD * row_weight_R[:, None])


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
        if self.router.balanced:
            host_counts = balanced_counts(B * S, self.moe.top_k, self.moe.experts)
        else:
            host_counts = counts_E.tolist()  # one device-to-host sync per MoE layer
        x_RD, row_token_R, row_weight_R, kept = self.permute(
            x_TD, expert_idx_TK, weight_TK, counts_E, host_counts
        )
        y_RD = self.experts(x_RD, kept)
        y_TD = self.unpermute(y_RD, row_token_R, row_weight_R, B * S)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        return y_TD.view(B, S, D)
