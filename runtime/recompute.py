"""Activation checkpointing by a stage's recompute mode (plan.stages()[s]["recompute"]):
  full       every block's forward is recomputed in backward (only block inputs are kept)
  selective  only the attention core (softmax(q k^T) v) is recomputed, as Megatron-LM's
             selective recomputation (Korthikanti et al. 2022): its activations are the
             large, cheap-to-recompute ones
  none       nothing is recomputed

The module's own forward is wrapped (non-reentrant torch.utils.checkpoint), not the module,
so parameter FQNs do not change and hooks registered on the module (FSDP's unshard and
reshard) stay outside the checkpointed region, as with torch's checkpoint_wrapper.
Collectives inside a recomputed block (TP gathers, EP all-to-alls) run again in backward,
in the same order on every rank.
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

MODES = ("none", "selective", "full")


def apply_recompute(chunk: nn.Module, mode: str) -> None:
    """Checkpoint the blocks of `chunk` (a pipeline.Chunk) in `mode`."""
    if mode not in MODES:
        raise ValueError(f"recompute mode {mode!r} is not one of {MODES}")
    for block in chunk.layers.values():
        if mode == "full":
            _checkpoint_forward(block)
        elif mode == "selective":
            _checkpoint_forward(block.attn.core)


def _checkpoint_forward(module: nn.Module) -> None:
    forward = module.forward

    @functools.wraps(forward)
    def checkpointed(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    module.forward = checkpointed
