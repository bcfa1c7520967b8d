"""Activation checkpointing: full keeps fewer activations than selective, selective fewer
than none, and none of them changes the loss or the gradients."""

import pytest
import torch

from tera.models import build, load_spec
from tera.runtime.pipeline import Chunk
from tera.runtime.recompute import apply_recompute


def kept_bytes_and_grads(mode: str):
    """Bytes autograd keeps outside checkpointed regions for one forward of tiny-moe, and
    the gradients of its loss."""
    spec = load_spec("tiny-moe")
    torch.manual_seed(0)
    model = build(spec)
    chunk = Chunk(model, list(range(spec.layers)), embed=True, head=True)
    apply_recompute(chunk, mode)
    tokens = torch.randint(0, spec.vocab, (2, 33), generator=torch.Generator().manual_seed(0))
    kept = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal kept
        kept += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = chunk(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return kept, {n: p.grad for n, p in chunk.named_parameters()}


def test_recompute_modes_trade_memory_for_nothing_else():
    none, grads = kept_bytes_and_grads("none")
    selective, selective_grads = kept_bytes_and_grads("selective")
    full, full_grads = kept_bytes_and_grads("full")
    assert full < selective < none
    for name, grad in grads.items():
        assert torch.equal(selective_grads[name], grad), name
        assert torch.equal(full_grads[name], grad), name


def test_an_unknown_mode_is_refused():
    spec = load_spec("tiny-moe")
    chunk = Chunk(build(spec, device="meta"), [0], embed=False, head=False)
    with pytest.raises(ValueError, match="recompute mode 'some'"):
        apply_recompute(chunk, "some")
