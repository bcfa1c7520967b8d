"""The Triton router (in the interpreter) against the torch reference.

The kernel and torch compute the scores in fp32 with different exp and sum orders, so two
experts whose selection scores differ in the last bits may be ranked either way. The
choice is therefore checked by the selection scores it picks (equal to the reference's
top-k, in order), and the weights and the logits' gradient against the reference's
formula and autograd at the kernel's choice.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tera.kernels.dispatch import route
from tera.kernels.router import (
    expert_counts,
    gate_scores,
    gate_weights,
    route_reference,
    route_triton,
)

from .routing import SETTINGS


@st.composite
def gates(draw):
    """(logits_TE, top_k, score, bias_E, normalize, scale)."""
    T = draw(st.integers(0, 80))
    # up to 64 experts, and a few hundred as DeepSeek-V3 (256) and Kimi K2 (384) have
    E = draw(st.integers(1, 64) | st.integers(200, 400))
    K = draw(st.integers(1, min(E, 8)))
    score = draw(st.sampled_from(["softmax", "sigmoid"]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    spread = draw(st.sampled_from([0.1, 1.0, 8.0]))  # 8: saturated sigmoids tie at 1.0
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    logits_TE = (torch.randn(T, E, generator=generator) * spread).to(dtype)
    bias_E = None
    if draw(st.booleans()):
        bias_E = torch.randn(E, generator=generator) * draw(st.sampled_from([1e-3, 0.5]))
    normalize = draw(st.booleans())
    scale = draw(st.sampled_from([1.0, 2.5]))
    return logits_TE, K, score, bias_E, normalize, scale


@settings(SETTINGS, max_examples=120)
@given(gate=gates())
def test_router_kernel_matches_reference(triton, poisoned, gate):
    logits_TE, K, score, bias_E, normalize, scale = gate
    logits_TE.requires_grad_()
    expert_idx_TK, weight_TK, counts_E = route(*gate)
    assert (expert_idx_TK.dtype, weight_TK.dtype, counts_E.dtype) == (
        torch.int64,
        torch.float32,
        torch.int32,
    )
    select_TE = gate_scores(logits_TE.detach(), score)
    if bias_E is not None:
        select_TE = select_TE + bias_E
    reference_idx_TK, _, _ = route_reference(*gate)
    # distinct experts per token, with the reference's selection scores, best first
    assert all(len(set(row)) == K for row in expert_idx_TK.tolist())
    torch.testing.assert_close(
        select_TE.gather(1, expert_idx_TK), select_TE.gather(1, reference_idx_TK)
    )
    assert torch.equal(counts_E, expert_counts(expert_idx_TK, logits_TE.shape[1]))

    leaf_TE = logits_TE.detach().clone().requires_grad_()
    expected_TK = gate_weights(gate_scores(leaf_TE, score), expert_idx_TK, normalize, scale)
    torch.testing.assert_close(weight_TK, expected_TK, rtol=1e-5, atol=1e-6)
    dweight_TK = torch.randn(weight_TK.shape)
    weight_TK.backward(dweight_TK)
    expected_TK.backward(dweight_TK)
    assert logits_TE.grad.dtype == logits_TE.dtype
    tolerance = 1e-5 if logits_TE.dtype == torch.float32 else 1e-2  # bf16 rounds dlogits
    torch.testing.assert_close(
        logits_TE.grad.float(), leaf_TE.grad.float(), rtol=tolerance, atol=tolerance
    )


def test_bias_steers_selection_but_not_weights(triton):
    logits_TE = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias_E = torch.tensor([0.0, 0.0, 0.0, 10.0])
    expert_idx_TK, weight_TK, _ = route(logits_TE, 2, "sigmoid", bias_E, normalize=False)
    assert expert_idx_TK.tolist() == [[3, 0]]
    torch.testing.assert_close(weight_TK, torch.tensor([[-1.0, 2.0]]).sigmoid())


def test_router_rejects_bad_arguments():
    logits_TE = torch.randn(4, 3)
    with pytest.raises(ValueError, match="top_k"):
        route_triton(logits_TE, 4)
    with pytest.raises(ValueError, match="score"):
        route_reference(logits_TE, 2, score="relu")
    with pytest.raises(ValueError, match="bias_E"):
        route_reference(logits_TE, 2, bias_E=torch.zeros(4))
