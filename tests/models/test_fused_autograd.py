"""RMSNorm and gated activations: correct gradients, and saved tensors as a fused kernel."""

import pytest
import torch

from tera.models.ffn import activation
from tera.models.transformer import RMSNorm


def saved_bytes(fn, *inputs, exclude=()) -> int:
    """Bytes of distinct storages saved for backward while running fn(*inputs)."""
    seen: dict[int, int] = {}
    excluded = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in excluded:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(seen.values())


def test_rmsnorm_matches_the_formula_and_its_gradient():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    norm = RMSNorm(16, 1e-6, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    assert torch.autograd.gradcheck(lambda a, w: norm(a), (x, norm.weight))


def test_rmsnorm_saves_its_bf16_input_and_fp32_rstd_only():
    x = torch.randn(4, 8, 64, dtype=torch.bfloat16, requires_grad=True)
    norm = RMSNorm(64, 1e-6, dtype=torch.bfloat16)
    expected = x.numel() * 2 + 4 * 8 * 4  # input in bf16, one fp32 rstd per row
    assert saved_bytes(norm, x, exclude=[norm.weight]) == expected


@pytest.mark.parametrize("kind", ["swiglu", "geglu"])
def test_gated_activation_gradient_and_saved_inputs(kind):
    torch.manual_seed(0)
    gate = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    up = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    act = (
        torch.nn.functional.silu
        if kind == "swiglu"
        else (lambda g: torch.nn.functional.gelu(g, approximate="tanh"))
    )
    torch.testing.assert_close(activation(kind, up, gate=gate), act(gate) * up)
    assert torch.autograd.gradcheck(lambda g, u: activation(kind, u, gate=g), (gate, up))
    assert saved_bytes(lambda g, u: activation(kind, u, gate=g), gate, up) == 2 * gate.numel() * 8
