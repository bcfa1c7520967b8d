"""Typed model description: the model YAML of DESIGN.md as frozen dataclasses.

A ModelSpec is everything the planner and the runtime need to know about a decoder-only
transformer, dense or Mixture-of-Experts. It is validated on construction, so every
ModelSpec in the program is internally consistent (heads divide into KV groups, MLA fields
are present for MLA, top-k does not exceed the expert count, ...).

Invariant: `ModelSpec.from_dict(spec.to_dict()) == spec`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).parent / "presets"

ATTENTION_KINDS = ("mha", "gqa", "mla")
FFN_KINDS = ("swiglu", "geglu", "gelu", "relu", "squared_relu")
POSITION_KINDS = ("rope", "learned", "alibi", "none")
SCORE_FUNCTIONS = ("softmax", "sigmoid")


class SpecError(ValueError):
    """A model description is malformed. The message names the field and the fix."""

    def __init__(self, field_name: str, problem: str, fix: str):
        self.field = field_name
        super().__init__(f"{field_name}: {problem}; {fix}")


@dataclass(frozen=True)
class AttentionSpec:
    """Self-attention. For `mla` (DeepSeek multi-head latent attention) the query/key head
    width is qk_nope_head_dim + qk_rope_head_dim and the value width v_head_dim; `head_dim`
    is then unused by the model."""

    kind: str = "gqa"
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    q_lora_rank: int | None = None  # None: queries projected directly from the hidden state
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    qk_nope_head_dim: int | None = None
    v_head_dim: int | None = None
    qk_norm: bool = False  # RMSNorm on each query and key head (Qwen3)
    qkv_bias: bool = False  # bias on the q, k, v projections (Qwen2)
    sliding_window: int | None = None  # tokens each query sees; None is full causal

    def __post_init__(self) -> None:
        _check_choice("attention.kind", self.kind, ATTENTION_KINDS)
        _check_positive("attention.heads", self.heads)
        _check_positive("attention.kv_heads", self.kv_heads)
        _check_positive("attention.head_dim", self.head_dim)
        if self.heads % self.kv_heads:
            raise SpecError(
                "attention.kv_heads",
                f"{self.heads} heads do not split into {self.kv_heads} KV groups",
                "choose kv_heads that divides heads",
            )
        if self.kind == "mha" and self.kv_heads != self.heads:
            raise SpecError(
                "attention.kv_heads",
                f"mha needs kv_heads == heads ({self.heads}), got {self.kv_heads}",
                "use kind: gqa for grouped KV heads",
            )
        mla_fields = ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
        if self.kind == "mla":
            for name in mla_fields:
                value = getattr(self, name)
                if value is None:
                    raise SpecError(f"attention.{name}", "missing for kind: mla", "set it")
                _check_positive(f"attention.{name}", value)
            if self.q_lora_rank is not None:
                _check_positive("attention.q_lora_rank", self.q_lora_rank)
        if self.sliding_window is not None:
            _check_positive("attention.sliding_window", self.sliding_window)

    @property
    def qk_head_dim(self) -> int:
        if self.kind == "mla":
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.head_dim

    @property
    def value_head_dim(self) -> int:
        return self.v_head_dim if self.kind == "mla" else self.head_dim


@dataclass(frozen=True)
class FFNSpec:
    """Dense feed-forward block. Gated kinds (swiglu, geglu) have three weight matrices,
    the others two."""

    kind: str = "swiglu"
    hidden: int = 11008

    def __post_init__(self) -> None:
        _check_choice("ffn.kind", self.kind, FFN_KINDS)
        _check_positive("ffn.hidden", self.hidden)

    @property
    def gated(self) -> bool:
        return self.kind in ("swiglu", "geglu")


@dataclass(frozen=True)
class MoESpec:
    """Mixture-of-Experts feed-forward. Layer i (0-based) is an MoE layer when
    i >= first_dense_layers and (i - first_dense_layers) % every == 0; the other layers use
    the dense FFN. Experts use the same activation kind as the dense FFN.

    capacity_factor None means dropless routing; otherwise each expert takes at most
    ceil(capacity_factor * tokens * top_k / experts) rows and the rest are dropped.
    `score` is the gate: softmax over experts (Mixtral, Qwen) or a per-expert sigmoid
    (DeepSeek-V3) whose selection may add a learned bias that does not change the weights.
    """

    experts: int = 8
    top_k: int = 2
    expert_hidden: int = 14336
    shared_experts: int = 0
    shared_hidden: int | None = None
    first_dense_layers: int = 0
    every: int = 1
    capacity_factor: float | None = None
    score: str = "softmax"
    expert_bias: bool = False  # DeepSeek-V3 aux-loss-free balancing bias (selection only)
    normalize_top_k: bool = True  # renormalise the k selected weights to sum to 1
    route_scale: float = 1.0
    aux_loss_coeff: float = 0.01  # Switch Transformer load-balancing loss weight

    def __post_init__(self) -> None:
        _check_positive("moe.experts", self.experts)
        _check_positive("moe.top_k", self.top_k)
        _check_positive("moe.expert_hidden", self.expert_hidden)
        _check_positive("moe.every", self.every)
        if self.top_k > self.experts:
            raise SpecError(
                "moe.top_k",
                f"top_k {self.top_k} exceeds the {self.experts} experts",
                "choose top_k <= experts",
            )
        if self.shared_experts < 0 or self.first_dense_layers < 0:
            raise SpecError("moe", "negative shared_experts or first_dense_layers", "use >= 0")
        if self.shared_experts and self.shared_hidden is None:
            raise SpecError("moe.shared_hidden", "missing with shared_experts > 0", "set it")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise SpecError("moe.capacity_factor", "must be positive", "or null for dropless")
        _check_choice("moe.score", self.score, SCORE_FUNCTIONS)


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer. `max_seq_len` sizes learned position embeddings and
    is the longest sequence the model accepts."""

    name: str
    layers: int
    hidden: int
    vocab: int
    attention: AttentionSpec
    ffn: FFNSpec
    moe: MoESpec | None = None
    tie_embeddings: bool = False
    position: str = "rope"
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    norm_eps: float = 1e-5
    source: str = ""  # where the numbers come from
    notes: str = ""
    published: dict[str, float] = field(default_factory=dict, hash=False)  # params_total_b, ...

    def __post_init__(self) -> None:
        if not self.name:
            raise SpecError("name", "empty", "give the model a name")
        for name in ("layers", "hidden", "vocab", "max_seq_len"):
            _check_positive(name, getattr(self, name))
        _check_choice("position", self.position, POSITION_KINDS)
        if self.moe is not None and self.moe.first_dense_layers > self.layers:
            raise SpecError(
                "moe.first_dense_layers",
                f"{self.moe.first_dense_layers} exceeds the {self.layers} layers",
                "choose first_dense_layers <= layers",
            )

    def is_moe_layer(self, index: int) -> bool:
        m = self.moe
        return (
            m is not None
            and index >= m.first_dense_layers
            and (index - m.first_dense_layers) % m.every == 0
        )

    @property
    def moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.layers))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "model") -> ModelSpec:
        if not isinstance(data, dict):
            raise SpecError(
                where, f"expected a mapping, got {type(data).__name__}", "see DESIGN.md"
            )
        data = dict(data)
        attention = _build(AttentionSpec, data.pop("attention", None), "attention")
        ffn = _build(FFNSpec, data.pop("ffn", None), "ffn")
        moe_data = data.pop("moe", None)
        moe = None if moe_data is None else _build(MoESpec, moe_data, "moe")
        return _build(cls, data, "", attention=attention, ffn=ffn, moe=moe)


def _build(kind: type, data: Any, prefix: str, **extra: Any):
    """Construct dataclass `kind` from a mapping, naming unknown, missing and mistyped fields."""
    label = prefix or "model"
    if data is None:
        raise SpecError(label, "missing", f"add a `{label}:` mapping (see DESIGN.md)")
    if not isinstance(data, dict):
        raise SpecError(label, f"expected a mapping, got {data!r}", "see DESIGN.md")
    known = {f.name: f for f in fields(kind)}
    dotted = (lambda n: f"{prefix}.{n}") if prefix else (lambda n: n)
    for key in data:
        if key not in known:
            close = [n for n in known if n.startswith(str(key)[:3])]
            hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
            raise SpecError(dotted(key), "unknown field", hint)
    kwargs: dict[str, Any] = {}
    for name, f in known.items():
        if name in extra:
            kwargs[name] = extra[name]
        elif name in data:
            kwargs[name] = _coerce(dotted(name), data[name], f.type)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SpecError(dotted(name), "missing", "this field is required")
    return kind(**kwargs)


def _coerce(name: str, value: Any, annotation: str) -> Any:
    """Check a YAML scalar against the field's annotation (a string under
    `from __future__ import annotations`)."""
    optional = "None" in annotation
    if value is None:
        if optional:
            return None
        raise SpecError(name, "is null", "give a value")
    base = annotation.replace(" | None", "")
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(name, f"expected an integer, got {value!r}", "write a whole number")
        return value
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(name, f"expected a number, got {value!r}", "write a number")
        return float(value)
    if base == "bool":
        if not isinstance(value, bool):
            raise SpecError(name, f"expected true or false, got {value!r}", "write true or false")
        return value
    if base == "str":
        if not isinstance(value, str):
            raise SpecError(name, f"expected a string, got {value!r}", "quote it")
        return value
    if base.startswith("dict"):
        if not isinstance(value, dict):
            raise SpecError(name, f"expected a mapping, got {value!r}", "write key: value pairs")
        return dict(value)
    return value


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SpecError(name, f"must be a positive integer, got {value!r}", "fix the value")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SpecError(name, f"unknown {value!r}", f"choose one of {', '.join(choices)}")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_spec(name_or_path: str | Path) -> ModelSpec:
    """Load a preset by name or a model YAML by path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml") or not path.exists():
        preset = PRESET_DIR / f"{name_or_path}.yaml"
        if not preset.exists():
            if path.suffix in (".yaml", ".yml"):
                raise SpecError("model", f"file {str(path)!r} not found", "check the path")
            names = preset_names()
            close = [n for n in names if str(name_or_path).lower()[:4] in n]
            hint = f"did you mean {', '.join(close[:3])}?" if close else "see `tera-plan models`"
            raise SpecError("model", f"unknown preset {str(name_or_path)!r}", hint)
        path = preset
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SpecError(
            "model", f"{path.name} is not valid YAML{where}", "fix the syntax"
        ) from None
    return ModelSpec.from_dict(data)
