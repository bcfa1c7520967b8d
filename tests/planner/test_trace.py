"""The Graph IR against an independent analytical FLOP count.

The analytical count is written out here from the architecture alone: 2*m*n*k for every
matmul (attention scores and values included, no causal discount), routed experts counted
top_k times, the embedding lookup counted as no FLOPs. Backward is two matmuls per forward
matmul (input and weight gradients), so it is exactly twice the forward.
"""

import networkx as nx
import pytest

from tera.models import load_spec, param_counts
from tera.planner.trace import trace

SEQ = 1024


def analytic_forward_flops(spec, S):
    a, D = spec.attention, spec.hidden
    H = a.heads
    if a.kind == "mla":
        n, r, v = a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
        q = 2 * S * D * a.q_lora_rank + 2 * S * a.q_lora_rank * H * (n + r)
        kv = 2 * S * D * (a.kv_lora_rank + r) + 2 * S * a.kv_lora_rank * H * (n + v)
        core = 2 * S * S * H * (n + r) + 2 * S * S * H * v
        out = 2 * S * H * v * D
        attention = q + kv + core + out
    else:
        hd, G = a.head_dim, a.kv_heads
        attention = (
            2 * S * D * H * hd
            + 2 * 2 * S * D * G * hd
            + 2 * S * S * H * hd * 2
            + 2 * S * H * hd * D
        )
    mats = 3 if spec.ffn.kind in ("swiglu", "geglu") else 2
    dense_ffn = mats * 2 * S * D * spec.ffn.hidden
    total = 0
    for i in range(spec.layers):
        total += attention
        if spec.is_moe_layer(i):
            m = spec.moe
            total += 2 * S * D * m.experts  # router
            total += m.top_k * mats * 2 * S * D * m.expert_hidden
            if m.shared_experts:
                total += m.shared_experts * mats * 2 * S * D * m.shared_hidden
        else:
            total += dense_ffn
    return total + 2 * S * D * spec.vocab  # LM head


@pytest.mark.parametrize("name", ["llama3-8b", "mixtral-8x7b", "deepseek-v3", "qwen3-30b-a3b"])
def test_graph_flops_match_analytic_count(name):
    spec = load_spec(name)
    graph = trace(spec, SEQ)
    fwd = sum(d["fwd_flops"] for _, d in graph.nodes(data=True))
    bwd = sum(d["bwd_flops"] for _, d in graph.nodes(data=True))
    expected = analytic_forward_flops(spec, SEQ)
    assert fwd == pytest.approx(expected, rel=0.01)
    assert bwd == pytest.approx(2 * expected, rel=0.01)


@pytest.mark.parametrize("name", ["tiny-moe", "deepseek-v3", "gpt3-175b"])
def test_graph_params_equal_model_params(name):
    spec = load_spec(name)
    graph = trace(spec, 256)
    assert sum(d["params"] for _, d in graph.nodes(data=True)) == param_counts(spec).total


def test_graph_is_a_connected_dag_with_every_layer():
    spec = load_spec("deepseek-v3")
    graph = trace(spec, 512)
    assert nx.is_directed_acyclic_graph(graph)
    assert nx.is_weakly_connected(graph)
    layers = {d["layer"] for _, d in graph.nodes(data=True)}
    assert layers == set(range(-1, spec.layers + 1))
    kinds = {d["kind"] for _, d in graph.nodes(data=True)}
    assert {
        "matmul",
        "attention",
        "norm",
        "router",
        "permute",
        "expert",
        "unpermute",
        "embedding",
        "loss",
        "residual",
        "activation",
    } <= kinds
    experts = [n for n, d in graph.nodes(data=True) if d["kind"] == "expert"]
    assert len(experts) == spec.moe_layers
    assert all(graph.nodes[n]["expert"] for n in experts)
    # each block runs after the previous one
    order = {n: i for i, n in enumerate(nx.topological_sort(graph))}
    assert order["layers.4.attn_norm"] > order["layers.3.ffn.experts"]
    assert nx.has_path(graph, "embed", "head:loss")
    assert nx.has_path(graph, "layers.2.ffn.w2", "layers.3.ffn.experts")


def test_saved_bytes_scale_with_sequence_and_attention_is_flash_style():
    spec = load_spec("llama3-8b")
    short, long = trace(spec, 512), trace(spec, 1024)
    saved = lambda g: sum(d["saved_bytes"] for _, d in g.nodes(data=True))  # noqa: E731
    # FlashAttention keeps no S x S matrix: saved bytes are linear in the sequence.
    assert saved(long) == pytest.approx(2 * saved(short), rel=0.01)
    core = long.nodes["layers.0.attn.core"]
    a = spec.attention
    qkvo = 1024 * (2 * a.heads + 2 * a.kv_heads) * a.head_dim * 2
    assert core["saved_bytes"] == qkvo + 1024 * a.heads * 4


def test_learned_positions_refuse_longer_sequences():
    from tera.models import SpecError

    with pytest.raises(SpecError) as err:
        trace(load_spec("gpt3-175b"), 4096)
    assert err.value.field == "seq_len"


def test_tp_replicated_marks_norms_router_and_mla_down_projections():
    g = trace(load_spec("deepseek-v3"), 256)
    node = g.nodes
    layer = 3  # the first MoE layer
    assert node[f"layers.{layer}.attn_norm"]["tp_replicated"]
    assert node[f"layers.{layer}.ffn.router.gate"]["tp_replicated"]
    assert node[f"layers.{layer}.attn.q_a_proj"]["tp_replicated"]
    assert node[f"layers.{layer}.attn.kv_a_proj"]["tp_replicated"]
    assert not node[f"layers.{layer}.attn.q_b_proj"]["tp_replicated"]
    assert not node[f"layers.{layer}.attn.o_proj"]["tp_replicated"]
    assert not node[f"layers.{layer}.ffn.experts"]["tp_replicated"]
