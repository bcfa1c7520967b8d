"""Hugging Face MoE models traced into the Graph IR agree with tera's own model.

Each HF config (Mixtral, Qwen3-MoE, DeepSeek-V3) is traced by tera.planner.hf.trace_hf and
compared with tera's trace of spec_from_hf(config): forward and backward FLOPs in total and
per kind (matmul, attention, expert), and parameters. The HF side runs HF's own modelling
code (sdpa attention, grouped_mm experts) on `meta`, so this checks the spec mapping, the
tracer hooks and the grouped_mm FLOP formula at once.
"""

import functools
from collections import defaultdict

import networkx as nx
import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from tera.models import SpecError, load_spec  # noqa: E402
from tera.planner.hf import EXTRA_FLOP_FORMULAS, spec_from_hf, trace_hf  # noqa: E402
from tera.planner.trace import trace  # noqa: E402

SEQ = 128

SMALL = {
    "mixtral": {
        "model_type": "mixtral",
        "vocab_size": 512,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "router_aux_loss_coef": 0.02,
        "max_position_embeddings": 256,
    },
    "qwen3_moe": {  # one dense layer first
        "model_type": "qwen3_moe",
        "vocab_size": 512,
        "hidden_size": 128,
        "intermediate_size": 384,
        "moe_intermediate_size": 96,
        "num_hidden_layers": 3,
        "mlp_only_layers": [0],
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "num_experts": 16,
        "num_experts_per_tok": 4,
        "norm_topk_prob": True,
        "max_position_embeddings": 256,
    },
    "deepseek_v3": {
        "model_type": "deepseek_v3",
        "vocab_size": 512,
        "hidden_size": 128,
        "intermediate_size": 320,
        "moe_intermediate_size": 64,
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 96,
        "kv_lora_rank": 64,
        "qk_rope_head_dim": 16,
        "qk_nope_head_dim": 32,
        "v_head_dim": 32,
        "n_routed_experts": 16,
        "n_shared_experts": 1,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 2.5,
        "max_position_embeddings": 256,
    },
}

# Published config.json values (architecture fields), hub revisions current in 2025.
MIXTRAL_8X7B = {
    "model_type": "mixtral",
    "architectures": ["MixtralForCausalLM"],
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.02,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 32000,
}
QWEN3_30B_A3B = {
    "model_type": "qwen3_moe",
    "architectures": ["Qwen3MoeForCausalLM"],
    "attention_bias": False,
    "decoder_sparse_step": 1,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "max_position_embeddings": 40960,
    "mlp_only_layers": [],
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
DEEPSEEK_V3 = {
    "model_type": "deepseek_v3",
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "v_head_dim": 128,
    "vocab_size": 129280,
    "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]},
}
REAL = {
    "mixtral-8x7b": MIXTRAL_8X7B,
    "qwen3-30b-a3b": QWEN3_30B_A3B,
    "deepseek-v3": DEEPSEEK_V3,
}


@functools.cache
def graphs(name: str, seq_len: int = SEQ):
    config = SMALL[name] if name in SMALL else _real_cut(name)
    return trace_hf(config, seq_len), trace(spec_from_hf(config), seq_len)


def _real_cut(name: str) -> dict:
    """A published config with fewer layers (DeepSeek-V3: 1 dense then 3 MoE)."""
    config = dict(REAL[name], num_hidden_layers=4)
    if name == "deepseek-v3":
        config["first_k_dense_replace"] = 1
    return config


def by_kind(graph: nx.DiGraph) -> dict[str, dict[str, int]]:
    sums: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for _, node in graph.nodes(data=True):
        for key in (node["kind"], "total"):
            for field in ("fwd_flops", "bwd_flops", "params"):
                sums[key][field] += node[field]
    return sums


def assert_close(hf: int, tera: int, rel: float, what: str) -> None:
    assert tera > 0, what
    assert abs(hf - tera) <= rel * tera, f"{what}: hf {hf:,} vs tera {tera:,}"


@pytest.mark.parametrize("name", [*SMALL, *REAL])
def test_flops_and_params_match_tera(name):
    hf, tera = (by_kind(g) for g in graphs(name))
    for kind in ("total", "matmul", "attention", "expert"):
        for field in ("fwd_flops", "bwd_flops"):
            assert_close(hf[kind][field], tera[kind][field], 0.02, f"{name} {kind} {field}")
    assert_close(hf["total"]["params"], tera["total"]["params"], 0.01, f"{name} params")


@pytest.mark.parametrize("name", SMALL)
def test_graph_is_a_dag_with_every_kind(name):
    hf, _ = graphs(name)
    assert nx.is_directed_acyclic_graph(hf)
    assert nx.is_weakly_connected(hf)
    kinds = {node["kind"] for _, node in hf.nodes(data=True)}
    assert {"matmul", "attention", "expert", "router", "norm", "loss"} <= kinds
    spec = spec_from_hf(SMALL[name])
    assert hf.graph["spec"] == spec.to_dict()
    assert {node["layer"] for _, node in hf.nodes(data=True)} == set(range(-1, spec.layers + 1))
    # Routed expert weights are flagged for ep sharding; the gate owns E x D parameters.
    experts = [n for n, d in hf.nodes(data=True) if d["kind"] == "expert"]
    assert len(experts) == spec.moe_layers
    assert all(hf.nodes[n]["expert"] and hf.nodes[n]["params"] for n in experts)
    gates = [n for n in hf if n.endswith("gate:matmul")]
    assert len(gates) == spec.moe_layers
    assert all(hf.nodes[n]["params"] == spec.moe.experts * spec.hidden for n in gates)


def test_replication_is_exact_in_flops_and_params():
    config = SMALL["deepseek_v3"]
    full, replicated = trace_hf(config, 64, replicate=False), trace_hf(config, 64)
    assert set(full) == set(replicated)
    for name in full:
        for field in ("fwd_flops", "bwd_flops", "params", "saved_bytes", "expert", "kind"):
            assert full.nodes[name][field] == replicated.nodes[name][field], (name, field)


def test_tied_embeddings_are_counted_once():
    config = dict(SMALL["qwen3_moe"], tie_word_embeddings=True)
    hf, tera = trace_hf(config, 64), trace(spec_from_hf(config), 64)
    assert hf.nodes["lm_head"]["params"] == 0  # the embedding owns the matrix
    hf_sums, tera_sums = by_kind(hf), by_kind(tera)
    for field in ("fwd_flops", "bwd_flops", "params"):
        assert hf_sums["total"][field] == tera_sums["total"][field], field
    # Per kind they differ: tera's LMHead multiplies by the tied matrix in its own ops, so
    # the head GEMM is a `loss` node there and a `matmul` node (HF's lm_head) here.
    head = 2 * 64 * config["hidden_size"] * config["vocab_size"]
    assert hf_sums["matmul"]["fwd_flops"] - tera_sums["matmul"]["fwd_flops"] == head


def test_grouped_mm_formula_counts_every_layout():
    formula = EXTRA_FLOP_FORMULAS[torch.ops.aten._grouped_mm]
    R, E, K, N = 96, 8, 64, 32

    def meta(*shape):
        return torch.empty(shape, device="meta")

    assert formula(meta(R, K), meta(E, K, N)) == 2 * R * K * N  # forward, input gradient
    assert formula(meta(K, R), meta(R, N)) == 2 * R * K * N  # weight gradient
    assert formula(meta(E, R, K), meta(E, K, N)) == 2 * E * R * K * N  # batched
    assert formula(meta(E, R, K), meta(K, N)) == 2 * R * K * N  # groups along N


@pytest.mark.parametrize("name", REAL)
def test_spec_of_published_config_is_the_preset(name):
    spec, preset = spec_from_hf(REAL[name]), load_spec(name)
    ignore = {"name", "source", "notes", "published"}
    if name == "deepseek-v3":
        # HF computes no sequence-wise balance loss; max_position_embeddings is the
        # YaRN-extended context, the preset the 4K pretraining context.
        ignore |= {"max_seq_len", "moe"}
        assert spec.moe == preset.moe.__class__(**{**preset.moe.__dict__, "aux_loss_coeff": 0.0})
    for field in spec.__dataclass_fields__:
        if field not in ignore:
            assert getattr(spec, field) == getattr(preset, field), field


def test_full_depth_deepseek_v3_has_the_published_parameter_count():
    graph = trace_hf(DEEPSEEK_V3, 256)
    params = sum(node["params"] for _, node in graph.nodes(data=True))
    assert abs(params / 1e9 - 671) < 1  # 671B published, MTP module excluded
    assert sum(graph.nodes[n]["expert"] for n in graph) == 58


def test_unsupported_configs_name_the_field():
    with pytest.raises(SpecError, match="model_type"):
        spec_from_hf({"model_type": "llama"})
    with pytest.raises(SpecError, match="mlp_only_layers"):
        spec_from_hf(dict(SMALL["qwen3_moe"], mlp_only_layers=[2]))  # MoE, MoE, dense
