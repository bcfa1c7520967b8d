"""Trace Hugging Face MoE models into tera's Graph IR (needs the `hf` extra: transformers).

`trace_hf(config, seq_len)` builds `MixtralForCausalLM`, `Qwen3MoeForCausalLM` or
`DeepseekV3ForCausalLM` (chosen by config["model_type"]) from a config dict, with no
download, on the `meta` device in bfloat16, and traces it with tera's tracer
(tera.planner.trace) into the same Graph IR that `trace(spec, seq_len)` produces for tera's
own model. `spec_from_hf(config)` maps the same config onto a ModelSpec, so the two graphs
can be compared and the HF graph can be costed like any other.

How the HF model is traced (see the module docstring of tera.planner.trace for the IR):

- Only one block of each kind is built (DeepSeek-V3: one dense then one MoE layer; Qwen3-MoE
  likewise when it has dense layers; Mixtral: one MoE layer) and `_replicate` of
  tera.planner.trace copies it to every layer, as `trace` does for tera's model.
- Attention runs through HF's "sdpa" implementation. On `meta`, scaled_dot_product_attention
  decomposes into two batched matmuls forward and four backward, which torch's FLOP registry
  counts with no causal discount, exactly as for tera's CoreAttention; the attention node's
  bytes and saved bytes are then replaced by what FlashAttention moves and keeps, with the
  same formula as tera's tracer.
- Experts run through HF's "grouped_mm" implementation: routing is sort/histc/cumsum on
  device, nothing is copied to the host, so it runs on `meta` (the "eager" implementation
  loops over `nonzero()` and cannot). torch's FLOP registry has no formula for
  aten._grouped_mm; EXTRA_FLOP_FORMULAS supplies one. On `meta` every one of the T*K routed
  rows is computed, which is the balanced, dropless count tera's tracer uses.
- HF's routers hold the gate weight as a bare Parameter (F.linear inside the router), not an
  nn.Linear. The router's own ops up to and including that matmul form a separate `matmul`
  node "<router path>:matmul" that owns the gate weight, as tera's `router.gate` Linear does;
  the rest of the router (softmax or sigmoid, top-k) is the `router` node.
- HF's activation modules (SiLUActivation) are replaced by their forward before tracing, so
  an expert's SiLU is expert work and an MLP's is its activation node, as in tera's model.
- HF reads the position ids to detect packed sequences, which `meta` cannot; the trace
  answers "not packed" for it (one sequence at positions 0..S-1 is not packed).
- HF's experts module does its own permute and unpermute (sort, gather, weighted sum), so an
  HF graph has no separate permute/unpermute nodes: that traffic is in the expert node.

Not modelled (as in the DeepSeek-V3 preset): DeepSeek's group-limited routing (n_group,
topk_group) and the multi-token-prediction layer; HF does not build the latter either.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any
from unittest import mock

import networkx as nx
import torch
from torch import nn
from torch.utils.flop_counter import flop_registry

from tera.models.spec import AttentionSpec, FFNSpec, ModelSpec, MoESpec, SpecError
from tera.planner.fields import NODE_FIELDS
from tera.planner.trace import (
    DTYPE,
    _Node,
    _renumber_segments,
    _replicate,
    _template_spec,
    _Tracer,
    empty_graph,
    flash_attention_io,
)

MODEL_CLASSES = {
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}
ROOT = "lm"  # node-name prefix of the CausalLM's own ops ("model" is HF's base model)
GATE = ":matmul"  # suffix of a router's gate matmul node
# Config keys that describe a checkpoint rather than the architecture.
_NOT_ARCHITECTURE = (
    "model_type",
    "architectures",
    "auto_map",
    "quantization_config",
    "torch_dtype",
    "dtype",
    "transformers_version",
)


# -- FLOP formulas torch's registry lacks ----------------------------------------------
def _grouped_mm_flops(mat_a, mat_b, *args, out_val=None, **kwargs) -> int:
    """aten._grouped_mm: 2 * M * K * N summed over groups, whatever the layout.

    Forward (MoE up/down projection): mat_a (R, K) x mat_b (E, K, N), groups along R.
    Backward, input gradient: the same form. Backward, weight gradient: mat_a (K, R) x
    mat_b (R, N) -> (E, K, N), groups along the contracted R. 3D x 3D is a plain batched
    matmul; 3D x 2D groups mat_b's columns. Rows past offs[-1] are skipped by the kernel;
    on `meta` offs is unknown and every row counts (dropless routing)."""
    a, b = mat_a.shape, mat_b.shape
    batch = a[0] if len(a) == 3 and len(b) == 3 else 1
    return 2 * batch * a[-2] * a[-1] * b[-1]


# Same calling convention as torch.utils.flop_counter.flop_registry entries:
# formula(*args, **kwargs, out_val=out) with the op's tensor arguments.
EXTRA_FLOP_FORMULAS = {torch.ops.aten._grouped_mm: _grouped_mm_flops}
_MATMUL_OPS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.matmul}


# -- configs ---------------------------------------------------------------------------
def hf_config(config: dict[str, Any]):
    """The transformers config object for a config dict (defaults filled in by HF)."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        config = config.to_dict()
    model_type = config.get("model_type")
    if model_type not in MODEL_CLASSES:
        raise SpecError(
            "model_type", f"unsupported {model_type!r}", f"use one of {', '.join(MODEL_CLASSES)}"
        )
    kwargs = {k: v for k, v in config.items() if k not in _NOT_ARCHITECTURE}
    return AutoConfig.for_model(model_type, **kwargs)


def _moe_layers(cfg) -> list[bool]:
    """Which decoder layers HF builds with a sparse MoE block."""
    n = cfg.num_hidden_layers
    if cfg.model_type == "mixtral":
        return [True] * n
    if cfg.model_type == "qwen3_moe":
        dense = set(cfg.mlp_only_layers or ())
        step = cfg.decoder_sparse_step
        return [i not in dense and cfg.num_experts > 0 and (i + 1) % step == 0 for i in range(n)]
    return [i >= cfg.first_k_dense_replace for i in range(n)]  # deepseek_v3


def _ffn_kind(cfg) -> str:
    act = cfg.hidden_act
    if act in ("silu", "swish"):
        return "swiglu"
    if act.startswith("gelu"):
        return "geglu"
    raise SpecError("hidden_act", f"{act!r} has no tera FFN kind", "use silu or gelu")


def spec_from_hf(config: dict[str, Any], name: str | None = None) -> ModelSpec:
    """The ModelSpec of a Mixtral, Qwen3-MoE or DeepSeek-V3 config dict (a config.json).

    Fields HF fills by default are read through the transformers config class, so a
    partial dict means what it means to HF."""
    cfg = hf_config(config)
    kind = cfg.model_type
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    bias = bool(getattr(cfg, "attention_bias", False))
    if kind == "deepseek_v3":
        if bias:
            raise SpecError("attention_bias", "tera's MLA has no biases", "set it false")
        attention = AttentionSpec(
            kind="mla",
            heads=heads,
            kv_heads=kv_heads,
            head_dim=cfg.v_head_dim,
            q_lora_rank=cfg.q_lora_rank,
            kv_lora_rank=cfg.kv_lora_rank,
            qk_rope_head_dim=cfg.qk_rope_head_dim,
            qk_nope_head_dim=cfg.qk_nope_head_dim,
            v_head_dim=cfg.v_head_dim,
        )
    else:
        attention = AttentionSpec(
            kind="mha" if kv_heads == heads else "gqa",
            heads=heads,
            kv_heads=kv_heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            qk_norm=kind == "qwen3_moe",
            qkv_bias=bias,  # Qwen3 also biases o_proj (hidden params per layer): not modelled
            sliding_window=getattr(cfg, "sliding_window", None),
        )
    moe_layers = _moe_layers(cfg)
    moe = None
    if any(moe_layers):
        first = moe_layers.index(True)
        later = [i for i in range(first + 1, len(moe_layers)) if moe_layers[i]]
        every = later[0] - first if later else 1
        if [i >= first and (i - first) % every == 0 for i in range(len(moe_layers))] != moe_layers:
            raise SpecError(
                "mlp_only_layers",
                "the dense/MoE layer pattern is not `first dense layers, then every k-th`",
                "list only a prefix of layers in mlp_only_layers",
            )
        common = dict(
            top_k=cfg.num_experts_per_tok,
            first_dense_layers=first,
            every=every,
            # The training coefficient, as tera's presets record it; HF applies it only with
            # output_router_logits, which trace_hf turns on.
            aux_loss_coeff=float(getattr(cfg, "router_aux_loss_coef", 0.0)),
        )
        if kind == "mixtral":
            moe = MoESpec(
                experts=cfg.num_local_experts, expert_hidden=cfg.intermediate_size, **common
            )
        elif kind == "qwen3_moe":
            moe = MoESpec(
                experts=cfg.num_experts,
                expert_hidden=cfg.moe_intermediate_size,
                normalize_top_k=bool(cfg.norm_topk_prob),
                **common,
            )
        else:
            scoring = getattr(cfg, "scoring_func", "sigmoid")  # kept from config.json
            if scoring != "sigmoid":
                raise SpecError(
                    "scoring_func", f"HF's DeepSeek-V3 gate is sigmoid, not {scoring!r}", "use it"
                )
            common["aux_loss_coeff"] = 0.0  # aux-loss-free; HF computes no balance loss
            moe = MoESpec(
                experts=cfg.n_routed_experts,
                expert_hidden=cfg.moe_intermediate_size,
                shared_experts=cfg.n_shared_experts or 0,
                shared_hidden=cfg.moe_intermediate_size if cfg.n_shared_experts else None,
                score="sigmoid",
                expert_bias=True,
                normalize_top_k=bool(cfg.norm_topk_prob),
                route_scale=float(cfg.routed_scaling_factor),
                **common,
            )
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    return ModelSpec(
        name=name or kind,
        layers=cfg.num_hidden_layers,
        hidden=cfg.hidden_size,
        vocab=cfg.vocab_size,
        attention=attention,
        ffn=FFNSpec(_ffn_kind(cfg), cfg.intermediate_size),
        moe=moe,
        tie_embeddings=bool(cfg.tie_word_embeddings),
        position="rope",
        rope_theta=float(theta),
        max_seq_len=cfg.max_position_embeddings,
        norm_eps=cfg.rms_norm_eps,
        source=f"Hugging Face {MODEL_CLASSES[kind]} config",
    )


def _template_config(config: dict[str, Any], template: ModelSpec) -> dict[str, Any]:
    """`config` cut down to the layers of tera's template spec (one block of each kind)."""
    out = dict(config)
    n = template.layers
    moe = [template.is_moe_layer(i) for i in range(n)]
    out["num_hidden_layers"] = n
    if template.moe is not None and config["model_type"] != "deepseek_v3":
        # Compute the load-balancing loss as tera's model does (DeepSeek-V3 has none in HF).
        out["output_router_logits"] = template.moe.aux_loss_coeff > 0
    kind = config["model_type"]
    if kind == "qwen3_moe":
        out["decoder_sparse_step"] = 1
        out["mlp_only_layers"] = [i for i in range(n) if not moe[i]]
    elif kind == "deepseek_v3":
        out["first_k_dense_replace"] = moe.index(True) if any(moe) else n
    return out


def build_hf(config: dict[str, Any], device: str = "meta", dtype: torch.dtype = DTYPE):
    """The HF CausalLM of `config`, in training mode, with sdpa attention and grouped_mm
    experts (both run on `meta`). Weights are random (or absent on `meta`)."""
    import transformers

    cfg = hf_config(config)
    cls = getattr(transformers, MODEL_CLASSES[cfg.model_type])
    with torch.device(device):
        model = cls._from_config(
            cfg, dtype=dtype, attn_implementation="sdpa", experts_implementation="grouped_mm"
        )
    return model.train()


# -- tracer ----------------------------------------------------------------------------
_KIND_BY_SUFFIX = (  # HF class-name suffix -> kind of the module's own ops; first match wins
    ("ForCausalLM", "loss"),
    ("RMSNorm", "norm"),
    ("RotaryEmbedding", "embedding"),
    ("Attention", "attention"),  # sdpa runs inside the attention module, with RoPE
    ("DecoderLayer", "residual"),
    ("SparseMoeBlock", "elementwise"),
    ("MoE", "elementwise"),
    ("Experts", "expert"),
    ("Router", "router"),
    ("MLP", "activation"),
    ("Model", "embedding"),  # position ids and the causal mask, before the first block
)


def _inline_activations(model: nn.Module) -> None:
    """Replace HF's activation modules (ACT2FN, e.g. SiLUActivation) by their bound forward,
    so their ops are their parent's own ops: an expert's SiLU belongs to the expert node and
    an MLP's to its activation node, as in tera's Experts and FeedForward."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__module__ == "transformers.activations" and not any(
                True for _ in child.parameters()
            ):
                del parent._modules[name]
                setattr(parent, name, child.forward)


def _module_kinds(model: nn.Module) -> dict[nn.Module, str | None]:
    """Kind of each module's own ops; None for modules tera has no kind for."""
    kinds: dict[nn.Module, str | None] = {}
    for module in model.modules():
        name = type(module).__name__
        kind = None
        if isinstance(module, nn.Linear):
            kind = "matmul"
        elif isinstance(module, nn.Embedding):
            kind = "embedding"
        else:
            kind = next((k for suffix, k in _KIND_BY_SUFFIX if name.endswith(suffix)), None)
        kinds[module] = kind
    return kinds


class HFTracer(_Tracer):
    """tera's tracer with HF module kinds, layer numbering, gate nodes and loss."""

    def __init__(self, model: nn.Module):
        _inline_activations(model)
        super().__init__(model)
        self.layers = model.config.num_hidden_layers
        self.kinds = _module_kinds(model)
        self.routers = {p for p, m in model.named_modules() if self.kinds[m] == "router"}
        self.gated: set[str] = set()  # routers whose gate matmul has run

    def kind_of(self, module: nn.Module) -> str:
        kind = self.kinds.get(module)
        if kind is None:
            raise TypeError(f"no tera operator kind for {type(module).__name__} (tera.planner.hf)")
        return kind

    def layer_of(self, path: str) -> int:
        parts = path.split(".")
        if path in ("", ROOT) or parts[0] == "lm_head" or path.startswith("model.norm"):
            return self.layers
        if parts[:2] == ["model", "layers"] and len(parts) > 2:
            return int(parts[2])
        return -1

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        # HF looks for packed sequences in the position ids by reading a value, which `meta`
        # cannot; one sequence at positions 0..S-1 is not packed, for which HF returns None.
        from transformers import masking_utils

        with contextlib.ExitStack() as stack:
            if hasattr(masking_utils, "find_packed_sequence_indices"):
                stack.enter_context(
                    mock.patch.object(
                        masking_utils, "find_packed_sequence_indices", lambda position_ids: None
                    )
                )
            return self.model(input_ids=tokens, labels=tokens, use_cache=False).loss

    def node_name(self, path: str, segment: int = 0) -> str:
        if path == "":
            suffix = f".{segment}" if segment else ""
            return f"{ROOT}:{self.kind_of(self.model)}{suffix}"
        return super().node_name(path, segment)

    def node(self, name: str) -> _Node:
        if name not in self.nodes:
            path = name.partition(":")[0]
            path = "" if path == ROOT else path
            kind = "matmul" if name == path + GATE else self.kind_of(self.modules_by_name[path])
            self.nodes[name] = _Node(kind=kind, layer=self.layer_of(path))
        return self.nodes[name]

    def current(self) -> str:
        name = super().current()
        path = self.last_path  # super() just set it to the running module's path
        if not self.in_backward and path in self.routers and path not in self.gated:
            return path + GATE
        return name

    def record(self, func, args, kwargs, out) -> None:
        super().record(func, args, kwargs, out)
        packet = func._overloadpacket
        formula = EXTRA_FLOP_FORMULAS.get(packet)
        if formula is not None and packet not in flop_registry:
            flops = formula(*args, **kwargs, out_val=out)
            if not self.in_backward:
                self.node(self.current()).fwd_flops += flops
            elif self.backward_owner is not None:
                self.node(self.backward_owner).bwd_flops += flops
        if not self.in_backward and packet in _MATMUL_OPS and self.last_path in self.routers:
            self.gated.add(self.last_path)

    def finish(self, spec: ModelSpec, seq_len: int) -> None:
        """Fix-ups after `run`: gate weights to the gate node, expert flags, tied weights
        counted once, and FlashAttention bytes on the attention nodes."""
        for path in self.routers:  # the weight and its gradient write go with the gate
            gate, router = self.node(path + GATE), self.node(self.node_name(path))
            moved = router.param_bytes
            gate.params, gate.param_bytes = router.params, moved
            gate.tp_replicated = True
            router.params = router.param_bytes = 0
            for field in ("bwd_bytes", "bwd_weight_bytes"):
                setattr(gate, field, getattr(gate, field) + moved)
                setattr(router, field, getattr(router, field) - moved)
        seen: set[int] = set()
        for path, module in self.model.named_modules():
            own = list(module.parameters(recurse=False))
            if not own:
                continue
            node = self.node(self.node_name(path))
            node.expert = self.kinds[module] == "expert"
            for p in own:  # a tied LM head owns nothing: the embedding owns the matrix
                if id(p) in seen:
                    nbytes = p.numel() * p.element_size()
                    node.params -= p.numel()
                    node.param_bytes -= nbytes
                    node.bwd_bytes -= nbytes  # run() wrote its gradient once per owner
                    node.bwd_weight_bytes -= nbytes
                seen.add(id(p))
        a = spec.attention
        k_heads = a.heads if a.kind == "mla" else a.kv_heads
        q = (1, a.heads, seq_len, a.qk_head_dim)
        k = (1, k_heads, seq_len, a.qk_head_dim)
        v = (1, k_heads, seq_len, a.value_head_dim)
        o = (1, a.heads, seq_len, a.value_head_dim)
        for node in self.nodes.values():
            # Only the segment running sdpa has FLOPs; RoPE-only segments keep their bytes.
            if node.kind == "attention" and node.fwd_flops:
                flash_attention_io(node, q, k, v, o)


def trace_hf(config: dict[str, Any], seq_len: int, replicate: bool = True) -> nx.DiGraph:
    """The Graph IR of the HF model `config` for one sequence of `seq_len` tokens.

    With replicate=True (default) one block of each kind is traced and copied to every
    layer, as tera.planner.trace.trace does; the graph's `spec` attribute is
    spec_from_hf(config). replicate=False traces every layer of `config` as given (slower
    for deep models; used to check the replication)."""
    spec = spec_from_hf(config)
    if not replicate:
        tracer = HFTracer(build_hf(config))
        tracer.run(seq_len)
        tracer.finish(spec, seq_len)
        return _as_traced(spec, seq_len, tracer)
    template, template_index = _template_spec(spec)
    tracer = HFTracer(build_hf(_template_config(config, template)))
    tracer.run(seq_len)
    tracer.finish(spec, seq_len)
    return _replicate(spec, seq_len, template_index, tracer)


def _as_traced(spec: ModelSpec, seq_len: int, tracer: HFTracer) -> nx.DiGraph:
    """The graph of every traced node with a cost, no replication."""
    graph = empty_graph(spec, seq_len)
    _renumber_segments(tracer)
    for name, node in tracer.nodes.items():
        if any(getattr(node, f) for f in NODE_FIELDS):
            graph.add_node(name, **dataclasses.asdict(node))
    graph.add_edges_from((u, v) for u, v in tracer.edges if u in graph and v in graph)
    return graph
