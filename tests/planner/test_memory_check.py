"""The cost model's memory per rank against one rank's share built and stepped on the CPU.

Parameters, gradients and optimizer state must match the prediction exactly; bytes saved
for backward within 10% (compared where one process can reproduce the prediction's
sharding: tp = cp = 1). The second half checks the measurement itself against counts made
here from the architecture alone, so that a wrong share cannot pass by agreeing with a
wrong prediction.
"""

import dataclasses

import pytest

from tera.models import build, load_spec
from tera.models.moe import Experts
from tera.models.transformer import RMSNorm
from tera.planner.layout import Layout
from tera.planner.memory_check import (
    Comparison,
    MeasuredMemory,
    compare,
    measure_rank,
    rank_spec,
    resolve,
)

SEQ = 64
FP32 = 4


def scaled(preset: str, name: str, attention: dict, ffn: dict, moe=None, **fields):
    """A few-hundred-thousand-parameter model with a preset's structure."""
    spec = load_spec(preset)
    return dataclasses.replace(
        spec,
        name=name,
        attention=dataclasses.replace(spec.attention, **attention),
        ffn=dataclasses.replace(spec.ffn, **ffn),
        moe=moe and dataclasses.replace(spec.moe, **moe),
        **fields,
    )


TINY = load_spec("tiny-moe")  # GQA, dense layer 0, 8 experts top-2 + a shared expert
LLAMA = scaled(  # dense, GQA, RoPE, SwiGLU, untied
    "llama3-8b",
    "small-llama",
    dict(heads=4, kv_heads=2, head_dim=16),
    dict(hidden=192),
    layers=4,
    hidden=64,
    vocab=512,
    max_seq_len=128,
)
GPT = scaled(  # dense, MHA, GELU, learned positions, tied embeddings
    "gpt3-175b",
    "small-gpt",
    dict(heads=4, kv_heads=4, head_dim=16),
    dict(hidden=256),
    layers=2,
    hidden=64,
    vocab=512,
    max_seq_len=SEQ,
)
MLA = scaled(  # MLA with replicated down-projections, sigmoid router with bias
    "deepseek-v3",
    "small-mla",
    dict(
        heads=4,
        kv_heads=4,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
    ),
    dict(hidden=128),
    dict(experts=8, top_k=2, expert_hidden=32, shared_hidden=32, first_dense_layers=1),
    layers=3,
    hidden=64,
    vocab=512,
    max_seq_len=128,
)

LAYOUTS = {
    TINY: [
        "tp=1",
        "pp=2,mbs=2",  # embedding on stage 0, final norm and head on stage 1
        "ep=2,dp=2",
        "ep=4,dp=4",  # two experts per rank
        "tp=2",  # norms and router gate whole on both tp ranks
        "tp=2,ep=2",  # ep borrowed from tp
        "dp=2,ep=2,zero=0",
        "dp=2,ep=2,zero=1",
        "dp=2,ep=2,zero=2",
        "dp=2,ep=2,zero=3",
        "dp=4,ep=2,zero=2",  # expert state sharded over edp=2, dense over dp=4
        "dp=4,dp_replicate=2,ep=2,zero=3",  # HSDP: shards inside one replica
        "pp=2,dp=2,zero=2",
        "tp=2,dp=2,ep=2,etp=2",  # each expert's hidden width split over etp
    ],
    LLAMA: [
        "tp=1",
        "pp=2",
        "tp=2",
        "dp=4,zero=0",
        "dp=4,zero=1",
        "dp=4,zero=3",
        "tp=2,dp=2",
        "cp=2",
    ],
    GPT: ["tp=1", "pp=2", "tp=2"],  # a tied head's copy on the last stage; positions whole
    MLA: ["tp=2,ep=2", "tp=2,ep=4,dp=2,zero=2"],  # tp > 1: no saved-bytes comparison
}
CASES = [
    pytest.param(spec, layout, stage, id=f"{spec.name}:{layout}:stage{stage}")
    for spec, layouts in LAYOUTS.items()
    for layout in layouts
    for stage in range(Layout.parse(layout).pp)
]


@pytest.mark.parametrize(("spec", "layout", "stage"), CASES)
def test_prediction_matches_the_rank_built_on_cpu(spec, layout, stage):
    comparison = compare(spec, layout, stage, SEQ)
    assert comparison.activations_comparable == (comparison.layout.tp == comparison.layout.cp == 1)
    errors = comparison.errors()
    assert not errors, "\n".join(errors)


# -- the measurement against counts from the architecture ---------------------------------


def measure(spec, layout, stage=0):
    return measure_rank(spec, resolve(spec, layout, SEQ), stage, SEQ)


def test_pipeline_stages_partition_an_untied_model():
    whole = measure(TINY, "tp=1").params
    assert measure(TINY, "pp=2", 0).params + measure(TINY, "pp=2", 1).params == whole


def test_last_stage_keeps_its_own_copy_of_a_tied_embedding():
    whole = measure(GPT, "tp=1").params
    stages = measure(GPT, "pp=2", 0).params + measure(GPT, "pp=2", 1).params
    assert stages == whole + GPT.vocab * GPT.hidden * FP32


def test_expert_parallelism_holds_experts_over_ep():
    m = TINY.moe
    per_expert = 3 * TINY.hidden * m.expert_hidden * FP32  # w1, w3, w2
    dropped = TINY.moe_layers * (m.experts - m.experts // 4) * per_expert
    assert measure(TINY, "tp=1").params - measure(TINY, "ep=4,dp=4,zero=0").params == dropped


@pytest.mark.parametrize("spec", [TINY, MLA, GPT], ids=lambda s: s.name)
def test_tensor_parallelism_splits_all_but_replicated_weights(spec):
    """Whole on every tp rank: norms, the router gate, MLA's down-projections and learned
    positions (Megatron's plain torch.nn.Embedding). Routed experts are untouched by tp."""
    model = build(spec, device="meta")
    replicated = split = experts = 0
    for name, module in model.named_modules():
        count = sum(p.numel() for p in module.parameters(recurse=False))
        leaf = name.rpartition(".")[2]
        if isinstance(module, Experts):
            experts += count
        elif isinstance(module, RMSNorm) or leaf in ("gate", "q_a_proj", "kv_a_proj", "pos_embed"):
            replicated += count
        else:
            split += count
    expected = (split // 2 + replicated + experts) * FP32
    assert measure(spec, "tp=2").params == expected


def test_zero_stages_shard_state_over_the_data_parallel_group():
    full = measure(LLAMA, "dp=4,zero=0")
    for zero in (1, 2, 3):
        m = measure(LLAMA, f"dp=4,zero={zero}")
        assert m.optimizer * 4 == full.optimizer == 2 * full.params
        assert m.grads * (4 if zero >= 2 else 1) == full.grads == full.params
        assert m.params * (4 if zero >= 3 else 1) == full.params


def test_adam_step_counters_are_reported_apart():
    # one fp32 scalar per optimized tensor: the dense and the expert flat buffer
    assert measure(TINY, "tp=1").optimizer_steps == 2 * FP32
    assert measure(LLAMA, "tp=1").optimizer_steps == FP32


def test_activations_grow_with_the_micro_batch():
    one, two = measure(LLAMA, "mbs=1").activations, measure(LLAMA, "mbs=2").activations
    assert 1.9 * one < two <= 2 * one  # per-sequence tensors double; rope tables do not


def test_rank_spec_refuses_shares_it_cannot_build():
    with pytest.raises(ValueError, match="top_k"):
        rank_spec(TINY, resolve(TINY, "ep=8,dp=8", SEQ))
    with pytest.raises(ValueError, match="kv_heads"):  # Megatron would replicate KV heads
        rank_spec(LLAMA, resolve(LLAMA, "tp=4", SEQ))


def test_errors_name_the_field_and_allow_the_saved_bytes_tolerance():
    measured = MeasuredMemory(
        params=100, grads=100, optimizer=200, activations=1000, optimizer_steps=4
    )
    predicted = {"params": 100, "grads": 101, "optimizer": 200, "activations": 1090}
    comparison = Comparison(resolve(LLAMA, "tp=1", SEQ), 0, predicted, measured, True)
    (error,) = comparison.errors()
    assert "grads: predicted 101 B, measured 100 B" in error
    assert len(comparison.errors(saved_tolerance=0.05)) == 2
