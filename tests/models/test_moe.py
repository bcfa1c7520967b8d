"""The MoE layer (torch references, CPU) against a per-token loop written from the
definition: top-k gate, capacity in token order, weighted sum of expert FFNs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from tera.models import load_spec
from tera.models.moe import MoE, balanced_counts

BASE = load_spec("tiny-moe")


def layer(**moe) -> MoE:
    spec = dataclasses.replace(BASE, moe=dataclasses.replace(BASE.moe, **moe))
    torch.manual_seed(0)
    module = MoE(spec)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.1)
    if module.router.expert_bias_E is not None:
        module.router.expert_bias_E.normal_(std=0.1)
    return module


def per_token_loop(module: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    m, experts, router = module.moe, module.experts, module.router
    T = x_TD.shape[0]
    logits_TE = x_TD @ router.gate.weight.T
    scores_TE = logits_TE.softmax(-1) if m.score == "softmax" else logits_TE.sigmoid()
    select_TE = scores_TE if router.expert_bias_E is None else scores_TE + router.expert_bias_E
    capacity = math.inf
    if m.capacity_factor is not None:
        capacity = math.ceil(m.capacity_factor * T * m.top_k / m.experts)
    taken = [0] * m.experts
    y_TD = module.shared(x_TD) if module.shared is not None else torch.zeros_like(x_TD)
    for t in range(T):
        chosen = select_TE[t].topk(m.top_k).indices.tolist()
        weights = scores_TE[t, chosen]
        if m.normalize_top_k:
            weights = weights / weights.sum()
        for e, w in zip(chosen, weights * m.route_scale, strict=True):
            taken[e] += 1
            if taken[e] > capacity:  # the expert is full: the choice is dropped
                continue
            x = x_TD[t]
            h = F.silu(x @ experts.w1_EDF[e]) * (x @ experts.w3_EDF[e])
            y_TD[t] += w * (h @ experts.w2_EFD[e])
    return y_TD


@pytest.mark.parametrize(
    "moe",
    [
        dict(),
        dict(top_k=3, score="sigmoid", expert_bias=True, route_scale=2.5),
        dict(normalize_top_k=False),
        dict(capacity_factor=0.5),
        dict(capacity_factor=1.0, top_k=1),
    ],
    ids=["softmax", "sigmoid-bias", "unnormalized", "capacity-0.5", "capacity-1-top1"],
)
def test_layer_matches_per_token_loop(moe):
    module = layer(**moe)
    x_BSD = torch.randn(2, 24, BASE.hidden)
    with torch.no_grad():
        expected = per_token_loop(module, x_BSD.view(-1, BASE.hidden)).view_as(x_BSD)
        torch.testing.assert_close(module(x_BSD), expected, rtol=1e-5, atol=1e-5)


def test_balanced_routing_fills_every_expert_equally():
    module = layer()
    module.router.balanced = True
    _, _, counts_E = module.router(torch.randn(10, BASE.hidden))
    assert counts_E.tolist() == balanced_counts(10, BASE.moe.top_k, BASE.moe.experts)


@pytest.mark.parametrize("balanced", [True, False])
def test_dropless_layer_runs_on_meta(balanced):
    """Dropless routing reads nothing back to the host, so even learned routing runs on
    `meta`; with a capacity only balanced routing can (its counts are known)."""
    spec = dataclasses.replace(BASE, moe=dataclasses.replace(BASE.moe, capacity_factor=None))
    module = MoE(spec, balanced_routing=balanced, device="meta", dtype=torch.bfloat16)
    x_BSD = torch.empty(1, 16, BASE.hidden, device="meta", dtype=torch.bfloat16)
    y_BSD = module(x_BSD.requires_grad_())
    y_BSD.backward(torch.empty_like(y_BSD))
    assert y_BSD.shape == x_BSD.shape and module.experts.w2_EFD.grad is not None
