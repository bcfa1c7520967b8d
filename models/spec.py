"""Typed model description: the model YAML of DESIGN.md as frozen dataclasses.

A ModelSpec is everything the planner and the runtime need to know about a decoder-only
transformer, dense or Mixture-of-Experts. It is validated on construction, so every
ModelSpec in the program is internally consistent (heads divide into KV groups, MLA fields
are present for MLA, top-k does not exceed the expert count, ...).

Invariant: `ModelSpec.from_dict(spec.to_dict()) == spec`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).parent / "presets"

ATTENTION_KINDS = ("mha", "gqa", "mla")
FFN_KINDS = ("swiglu", "geglu", "gelu", "relu", "squared_relu")
POSITION_KINDS = ("rope", "learned", "alibi", "none")
SCORE_FUNCTIONS = ("softmax", "sigmoid")
# The most each size may be: far beyond every published model (the presets reach 128
# layers, hidden 25600, FFN 102400, a 256k vocabulary, 160 heads, 2048 experts), so that a
# larger value is a typo; and small enough that every weight's element count fits torch's
# int64 sizes (experts x hidden x expert_hidden = 2^53) and a trace stays short.
LIMITS = {
    "layers": 1024,
    "hidden": 2**17,
    "vocab": 2**22,
    "max_seq_len": 2**24,
    "heads": 2**12,
    "head_dim": 2**12,
    "lora_rank": 2**16,
    "ffn_hidden": 2**20,
    "experts": 2**16,
    "shared_experts": 2**8,
}


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
        _check_positive("attention.heads", self.heads, LIMITS["heads"])
        _check_positive("attention.kv_heads", self.kv_heads, LIMITS["heads"])
        _check_positive("attention.head_dim", self.head_dim, LIMITS["head_dim"])
        for name in ("qk_norm", "qkv_bias"):
            _check_bool(f"attention.{name}", getattr(self, name))
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
                _check_positive(f"attention.{name}", value, LIMITS["lora_rank"])
            if self.q_lora_rank is not None:
                _check_positive("attention.q_lora_rank", self.q_lora_rank, LIMITS["lora_rank"])
            # MLA rotates the qk_rope_head_dim channels whatever `position` says
            _check_even("attention.qk_rope_head_dim", self.qk_rope_head_dim)
        if self.sliding_window is not None:
            _check_positive("attention.sliding_window", self.sliding_window, LIMITS["max_seq_len"])

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
        _check_positive("ffn.hidden", self.hidden, LIMITS["ffn_hidden"])

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
        _check_positive("moe.experts", self.experts, LIMITS["experts"])
        _check_positive("moe.top_k", self.top_k)
        _check_positive("moe.expert_hidden", self.expert_hidden, LIMITS["ffn_hidden"])
        _check_positive("moe.every", self.every)
        if self.top_k > self.experts:
            raise SpecError(
                "moe.top_k",
                f"top_k {self.top_k} exceeds the {self.experts} experts",
                "choose top_k <= experts",
            )
        _check_count("moe.shared_experts", self.shared_experts, LIMITS["shared_experts"])
        _check_count("moe.first_dense_layers", self.first_dense_layers, LIMITS["layers"])
        if self.shared_experts and self.shared_hidden is None:
            raise SpecError("moe.shared_hidden", "missing with shared_experts > 0", "set it")
        if self.shared_hidden is not None:
            _check_positive("moe.shared_hidden", self.shared_hidden, LIMITS["ffn_hidden"])
        if self.capacity_factor is not None:
            _check_number("moe.capacity_factor", self.capacity_factor, "or null for dropless")
        _check_choice("moe.score", self.score, SCORE_FUNCTIONS)
        for name in ("expert_bias", "normalize_top_k"):
            _check_bool(f"moe.{name}", getattr(self, name))
        _check_number("moe.route_scale", self.route_scale, "1.0 leaves the weights as gated")
        _check_number("moe.aux_loss_coeff", self.aux_loss_coeff, "0 turns it off", least=0.0)


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
        if not isinstance(self.name, str) or not self.name.strip() or not self.name.isprintable():
            # messages quote the name: a line break in it would break their one line
            raise SpecError(
                "name", f"must be a non-empty one-line string, got {self.name!r}", "name it"
            )
        for name in ("layers", "hidden", "vocab", "max_seq_len"):
            _check_positive(name, getattr(self, name), LIMITS[name])
        _check_choice("position", self.position, POSITION_KINDS)
        _check_bool("tie_embeddings", self.tie_embeddings)
        _check_number("rope_theta", self.rope_theta, "e.g. 10000.0")
        _check_number("norm_eps", self.norm_eps, "e.g. 1e-5")
        if self.position == "rope" and self.attention.kind != "mla":
            _check_even("attention.head_dim", self.attention.head_dim)  # RoPE rotates pairs
        for key, value in self.published.items():
            if not isinstance(key, str):
                raise SpecError(
                    "published", f"key {key!r} is not a name", "write e.g. params_total_b"
                )
            _check_number(f"published.{_shown(key)}", value, "a published figure", least=0.0)
        if self.moe is not None and self.moe.first_dense_layers >= self.layers:
            raise SpecError(
                "moe.first_dense_layers",
                f"{self.moe.first_dense_layers} leaves none of the {self.layers} layers MoE",
                "choose first_dense_layers < layers, or moe: null for a dense model",
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
            raise SpecError(dotted(_shown(key)), "unknown field", hint)
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
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
            raise SpecError(name, f"expected a finite number, got {value!r}", "write a number")
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


def _shown(key: Any) -> str:
    """A key from the YAML as a message names it: itself when a printable string, else
    its repr, so that a key holding a line break cannot break the one-line error."""
    return key if isinstance(key, str) and key.isprintable() else repr(key)


def _check_positive(name: str, value: Any, most: int | None = None) -> None:
    """An integer in 1..most (`most`: LIMITS, or None for no bound)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SpecError(name, f"must be a positive integer, got {value!r}", "fix the value")
    if most is not None and value > most:
        raise SpecError(
            name, f"{value} is more than the {most} tera supports", f"use at most {most}"
        )


def _check_count(name: str, value: Any, most: int) -> None:
    """An integer in 0..most."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= most:
        raise SpecError(name, f"must be an integer from 0 to {most}, got {value!r}", "fix it")


def _check_even(name: str, value: int) -> None:
    if value % 2:
        raise SpecError(
            name, f"{value} is odd; rotary embeddings rotate channel pairs", "use an even width"
        )


def _check_number(name: str, value: Any, fix: str, least: float | None = None) -> None:
    """A finite number, > 0 (least None) or >= least."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and _finite(value)) or (value <= 0 if least is None else value < least):
        wanted = "a positive finite number" if least is None else f"a finite number >= {least:g}"
        raise SpecError(name, f"must be {wanted}, got {value!r}", fix)


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer past float's range
        return False


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise SpecError(name, f"expected true or false, got {value!r}", "write true or false")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SpecError(name, f"unknown {value!r}", f"choose one of {', '.join(choices)}")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_spec(name_or_path: str | Path) -> ModelSpec:
    """Load a preset by name or a model YAML by path; a file that cannot be read or
    parsed raises SpecError("model", ...), like every other bad model."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml") or not _exists(path):
        if str(name_or_path) not in preset_names():
            if path.suffix in (".yaml", ".yml"):
                raise SpecError("model", f"file {str(path)!r} not found", "check the path")
            names = preset_names()
            close = [n for n in names if str(name_or_path).lower()[:4] in n]
            hint = f"did you mean {', '.join(close[:3])}?" if close else "see `tera-plan models`"
            raise SpecError("model", f"unknown preset {str(name_or_path)!r}", hint)
        path = PRESET_DIR / f"{name_or_path}.yaml"
    return ModelSpec.from_dict(_read_yaml(path))


def _read_yaml(path: Path) -> Any:
    """The YAML document in `path`; any failure to read or parse it (an unreadable file,
    bytes that are not UTF-8, bad syntax, nesting deeper than the parser recurses) is a
    SpecError naming the field `model`."""
    name = path.name if path.name.isprintable() else repr(path.name)  # one line, always
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise SpecError("model", f"cannot read {str(path)!r}: {reason}", "check the path") from None
    except UnicodeDecodeError as err:
        raise SpecError(
            "model",
            f"{name} is not UTF-8 (byte {err.object[err.start]:#x} at offset {err.start})",
            "save it as UTF-8",
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SpecError("model", f"{name} is not valid YAML{where}", "fix the syntax") from None
    except RecursionError:
        raise SpecError(
            "model", f"{name} nests too deeply to parse", "flatten the document"
        ) from None


def _exists(path: Path) -> bool:
    """Whether `path` names something on disk; False for a name the OS refuses (too long,
    a NUL byte), which then reads as a preset name."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False
