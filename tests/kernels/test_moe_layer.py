"""The MoE layer with its ops on the Triton kernels (interpreted) against the same layer on
the torch references: output, auxiliary loss and every gradient."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tera.kernels.dispatch import triton_for
from tera.models import load_spec
from tera.models.moe import MoE

BASE = load_spec("tiny-moe")


def small(**moe) -> MoE:
    spec = dataclasses.replace(
        BASE, hidden=48, moe=dataclasses.replace(BASE.moe, experts=6, expert_hidden=40, **moe)
    )
    torch.manual_seed(0)
    layer = MoE(spec)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    if layer.router.expert_bias_E is not None:
        layer.router.expert_bias_E.normal_(std=0.1)
    return layer


def run(layer: MoE, x_BSD: torch.Tensor):
    layer.zero_grad()
    x_BSD = x_BSD.clone().requires_grad_()
    y_BSD = layer(x_BSD)
    (y_BSD.square().sum() + layer.aux_loss).backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    return y_BSD.detach(), layer.aux_loss.detach(), x_BSD.grad, grads


@pytest.mark.parametrize(
    "moe",
    [
        dict(top_k=2),
        dict(top_k=3, score="sigmoid", expert_bias=True, route_scale=2.5),
        dict(top_k=2, capacity_factor=0.6),  # drops rows
    ],
    ids=["softmax", "sigmoid-bias", "capacity"],
)
def test_layer_on_kernels_matches_layer_on_references(moe):
    layer = small(**moe)
    x_BSD = torch.randn(2, 19, 48)
    expected = run(layer, x_BSD)
    with triton_for("cpu"):
        actual = run(layer, x_BSD)
    # fp32 through three GEMMs summed in other orders: agreement to ~1e-5 of the scale
    close = dict(rtol=1e-4, atol=1e-4)
    for a, e in zip(actual[:3], expected[:3], strict=True):
        torch.testing.assert_close(a, e, **close)
    for name in expected[3]:
        torch.testing.assert_close(actual[3][name], expected[3][name], **close)
