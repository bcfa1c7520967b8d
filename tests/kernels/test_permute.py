"""Permute and unpermute: the routing map's invariants, and the Triton kernels (in the
interpreter) against the torch references, forward and backward, with and without a
capacity that drops rows."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tera.kernels.dispatch import permute, unpermute
from tera.kernels.permute import permute_reference, routing_map, unpermute_reference
from tera.kernels.router import expert_counts

from .routing import DTYPES, SETTINGS, assert_close, routings

capacities = st.none() | st.integers(1, 12)


def routed(routing, capacity):
    expert_idx_TK, E = routing
    counts_E = expert_counts(expert_idx_TK, E)
    row_TK, offsets_E = routing_map(expert_idx_TK, counts_E, capacity)
    return expert_idx_TK, counts_E, row_TK, offsets_E, int(offsets_E[-1])


@settings(SETTINGS, max_examples=200)
@given(routing=routings(max_tokens=64, max_experts=16, max_k=6), capacity=capacities)
def test_routing_map_is_a_stable_capacity_limited_sort(routing, capacity):
    expert_idx_TK, counts_E, row_TK, offsets_E, R = routed(routing, capacity)
    limit = counts_E if capacity is None else counts_E.clamp(max=capacity)
    assert offsets_E.dtype == torch.int32
    assert offsets_E.tolist() == torch.cumsum(limit, 0).tolist()
    kept = row_TK >= 0
    assert sorted(row_TK[kept].tolist()) == list(range(R))  # every row exactly once
    starts = (offsets_E - limit).tolist()
    seen = [0] * len(counts_E)  # choices of each expert so far, in token order
    rows = row_TK.tolist()
    for t, choices in enumerate(expert_idx_TK.tolist()):
        for k, expert in enumerate(choices):
            rank, seen[expert] = seen[expert], seen[expert] + 1
            # an expert keeps its first `capacity` choices, in token order, at its own rows
            kept = capacity is None or rank < capacity
            assert rows[t][k] == (starts[expert] + rank if kept else -1)


@settings(SETTINGS, max_examples=100)
@given(
    routing=routings(),
    capacity=capacities,
    D=st.integers(1, 1200),
    dtype=st.sampled_from(DTYPES),
)
def test_permute_kernel_matches_reference(triton, poisoned, routing, capacity, D, dtype):
    _, _, row_TK, _, R = routed(routing, capacity)
    x_TD = torch.randn(row_TK.shape[0], D).to(dtype).requires_grad_()
    dx_RD = torch.randn(R, D).to(dtype)
    x_RD = permute(x_TD, row_TK, R)
    x_RD.backward(dx_RD)
    x32_TD = x_TD.detach().float().requires_grad_()
    expected = permute_reference(x32_TD, row_TK, R)
    expected.backward(dx_RD.float())
    assert x_RD.dtype == dtype
    assert torch.equal(x_RD.float(), expected)  # a copy: exact
    assert_close(x_TD.grad, x32_TD.grad, dtype)  # dropped choices get no gradient


@settings(SETTINGS, max_examples=100)
@given(
    routing=routings(),
    capacity=capacities,
    D=st.integers(1, 1200),
    dtype=st.sampled_from(DTYPES),
    weight_grad=st.booleans(),
)
def test_unpermute_kernel_matches_reference(
    triton, poisoned, routing, capacity, D, dtype, weight_grad
):
    _, _, row_TK, _, R = routed(routing, capacity)
    y_RD = torch.randn(R, D).to(dtype).requires_grad_()
    weight_TK = torch.rand(row_TK.shape).requires_grad_(weight_grad)
    dy_TD = torch.randn(row_TK.shape[0], D).to(dtype)
    y_TD = unpermute(y_RD, row_TK, weight_TK)
    y_TD.backward(dy_TD)
    y32_RD = y_RD.detach().float().requires_grad_()
    w_TK = weight_TK.detach().clone().requires_grad_(weight_grad)
    expected = unpermute_reference(y32_RD, row_TK, w_TK)
    expected.backward(dy_TD.float())
    assert y_TD.dtype == dtype
    assert_close(y_TD, expected, dtype)
    assert_close(y_RD.grad, y32_RD.grad, dtype)
    if weight_grad:
        # dots of rounded inputs, accumulated in fp32 by both
        torch.testing.assert_close(weight_TK.grad, w_TK.grad, rtol=1e-5, atol=1e-5)


def test_permute_and_unpermute_are_adjoint():
    """<permute(x), y> = <x, unpermute(y, 1)>: the identity the backward passes rely on."""
    expert_idx_TK = torch.tensor([[0, 2], [2, 1], [2, 0], [1, 2]])
    _, _, row_TK, _, R = routed((expert_idx_TK, 3), 2)
    assert (row_TK == -1).sum() == 2  # expert 2, chosen 4 times, keeps its first 2
    x_TD, y_RD = torch.randn(4, 5), torch.randn(R, 5)
    ones_TK = torch.ones(row_TK.shape)
    left = (permute(x_TD, row_TK, R) * y_RD).sum()
    right = (x_TD * unpermute(y_RD, row_TK, ones_TK)).sum()
    torch.testing.assert_close(left, right)
