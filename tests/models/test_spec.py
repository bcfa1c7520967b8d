"""ModelSpec validation: each malformed input raises SpecError naming the field and the fix."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tera.models import ModelSpec, SpecError, load_spec

BASE: dict[str, Any] = {
    "name": "t",
    "layers": 2,
    "hidden": 64,
    "vocab": 128,
    "attention": {"kind": "gqa", "heads": 4, "kv_heads": 2, "head_dim": 16},
    "ffn": {"kind": "swiglu", "hidden": 128},
    "moe": {"experts": 4, "top_k": 2, "expert_hidden": 32},
}


def _with(**changes: Any) -> dict[str, Any]:
    """BASE with changes keyed by path, `__` between levels (attention__kv_heads=2);
    a value of ... deletes the key."""
    data = copy.deepcopy(BASE)
    for path, value in changes.items():
        *parents, key = path.split("__")
        node = data
        for parent in parents:
            node = node[parent]
        if value is ...:
            del node[key]
        else:
            node[key] = value
    return data


def test_base_is_valid() -> None:
    spec = ModelSpec.from_dict(_with())
    assert spec.moe_layers == 2
    assert ModelSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    "data,field,fix",
    [
        pytest.param(_with(hiden=64), "hiden", "did you mean 'hidden'?", id="unknown-field"),
        pytest.param(
            _with(attention__kv_head=2),
            "attention.kv_head",
            "did you mean 'kv_heads'?",
            id="unknown-nested-field",
        ),
        pytest.param(_with(layers=...), "layers", "this field is required", id="missing"),
        pytest.param(_with(ffn=...), "ffn", "add a `ffn:` mapping", id="missing-section"),
        pytest.param(_with(layers="four"), "layers", "write a whole number", id="wrong-type"),
        pytest.param(
            _with(attention__qk_norm="yes"), "attention.qk_norm", "write true or false",
            id="wrong-type-bool",
        ),
        pytest.param(
            _with(attention__heads=6, attention__kv_heads=4),
            "attention.kv_heads",
            "choose kv_heads that divides heads",
            id="kv-heads-not-dividing",
        ),
        pytest.param(
            _with(attention={"kind": "mla", "heads": 4, "kv_heads": 4, "head_dim": 16}),
            "attention.kv_lora_rank",
            "set it",
            id="mla-without-ranks",
        ),
        pytest.param(
            _with(moe__top_k=5), "moe.top_k", "choose top_k <= experts", id="top-k-over-experts"
        ),
        pytest.param(
            _with(ffn__kind="silu"),
            "ffn.kind",
            "choose one of swiglu, geglu, gelu, relu, squared_relu",
            id="unknown-activation",
        ),
    ],
)  # fmt: skip
def test_from_dict_errors(data: dict[str, Any], field: str, fix: str) -> None:
    with pytest.raises(SpecError) as err:
        ModelSpec.from_dict(data)
    assert err.value.field == field
    assert fix in str(err.value)
    assert str(err.value).startswith(f"{field}: ")


def test_unknown_preset_suggests_a_name() -> None:
    with pytest.raises(SpecError) as err:
        load_spec("deepseek-v4")
    assert err.value.field == "model"
    assert "unknown preset 'deepseek-v4'" in str(err.value)
    assert "did you mean deepseek-v3" in str(err.value)


def test_missing_yaml_file(tmp_path) -> None:
    with pytest.raises(SpecError) as err:
        load_spec(tmp_path / "absent.yaml")
    assert err.value.field == "model"
    assert "check the path" in str(err.value)


def test_malformed_yaml_file(tmp_path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\nattention: {kind: gqa, heads: 4\nlayers: 2\n")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert err.value.field == "model"
    assert "broken.yaml is not valid YAML at line" in str(err.value)
    assert "fix the syntax" in str(err.value)


def test_yaml_file_that_is_not_a_mapping(tmp_path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert err.value.field == "model"
    assert "expected a mapping" in str(err.value)


def test_valid_yaml_file_loads(tmp_path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(
        "name: mine\nlayers: 2\nhidden: 64\nvocab: 128\n"
        "attention: {kind: mha, heads: 4, kv_heads: 4, head_dim: 16}\n"
        "ffn: {kind: gelu, hidden: 256}\n"
    )
    spec = load_spec(path)
    assert spec.name == "mine" and spec.moe is None


# ---- values the fuzz (tests/planner/test_fuzz.py) found escaping as tracebacks ---------------
@pytest.mark.parametrize(
    "data,field,problem",
    [
        pytest.param(_with(rope_theta=float("nan")), "rope_theta", "finite", id="nan"),
        pytest.param(_with(norm_eps=float("inf")), "norm_eps", "finite", id="inf"),
        pytest.param(_with(rope_theta=10**400), "rope_theta", "finite", id="past-float"),
        pytest.param(_with(rope_theta=-1.0), "rope_theta", "positive", id="negative-theta"),
        pytest.param(
            _with(moe__capacity_factor=float("nan")), "moe.capacity_factor", "finite", id="cf-nan"
        ),
        pytest.param(
            _with(moe__route_scale=float("inf")), "moe.route_scale", "finite", id="scale-inf"
        ),
        pytest.param(
            _with(moe__aux_loss_coeff=-0.1), "moe.aux_loss_coeff", ">= 0", id="aux-negative"
        ),
        pytest.param(_with(layers=10**7), "layers", "more than the 1024", id="layers-huge"),
        pytest.param(_with(hidden=2**70), "hidden", "more than the", id="hidden-past-int64"),
        pytest.param(_with(moe__experts=10**9), "moe.experts", "more than the", id="experts-huge"),
        pytest.param(
            _with(moe__shared_experts=1, moe__shared_hidden=-3),
            "moe.shared_hidden",
            "positive integer",
            id="shared-hidden-negative",
        ),
        pytest.param(
            _with(moe__shared_experts=-1), "moe.shared_experts", "from 0 to", id="shared-negative"
        ),
        pytest.param(
            _with(moe__first_dense_layers=2),
            "moe.first_dense_layers",
            "leaves none of the 2 layers MoE",
            id="no-moe-layer",
        ),
        pytest.param(
            _with(attention__head_dim=15), "attention.head_dim", "odd", id="odd-rope-head-dim"
        ),
        pytest.param(
            _with(
                attention={
                    "kind": "mla", "heads": 4, "kv_heads": 4, "head_dim": 16,
                    "kv_lora_rank": 16, "qk_rope_head_dim": 7, "qk_nope_head_dim": 16,
                    "v_head_dim": 16,
                },
                position="none",
            ),
            "attention.qk_rope_head_dim",
            "odd",
            id="odd-mla-rope-dim",
        ),
        pytest.param(_with(name=""), "name", "non-empty", id="empty-name"),
        pytest.param(_with(name="a\nb"), "name", "one-line", id="name-breaks-line"),
        pytest.param(
            _with(published={"params_total_b": float("nan")}),
            "published.params_total_b",
            "finite",
            id="published-nan",
        ),
        pytest.param(_with(published={1: 2.0}), "published", "not a name", id="published-key"),
        pytest.param(
            _with(**{"a\u2028b": 1}), "'a\\u2028b'", "unknown field", id="key-breaks-line"
        ),
    ],
)  # fmt: skip
def test_values_past_the_model_are_refused(data: dict[str, Any], field: str, problem: str) -> None:
    with pytest.raises(SpecError) as err:
        ModelSpec.from_dict(data)
    assert err.value.field == field
    assert problem in str(err.value)
    assert len(str(err.value).splitlines()) == 1


def test_odd_head_dim_is_fine_without_rope() -> None:
    assert (
        ModelSpec.from_dict(_with(attention__head_dim=15, position="alibi")).attention.head_dim
        == 15
    )


@pytest.mark.parametrize(
    "content,problem",
    [
        pytest.param(b"name: x\xff\xfe\n", "is not UTF-8 (byte 0xff at offset 7)", id="not-utf8"),
        pytest.param(b"[" * 600 + b"]" * 600, "nests too deeply to parse", id="deep-flow"),
        pytest.param(
            "".join(f"{'  ' * i}k:\n" for i in range(600)).encode(),
            "nests too deeply to parse",
            id="deep-block",
        ),
    ],
)
def test_a_file_that_does_not_read_as_yaml_is_refused(tmp_path, content, problem) -> None:
    path = tmp_path / "m.yaml"
    path.write_bytes(content)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert err.value.field == "model"
    assert problem in str(err.value)


def test_a_path_that_cannot_be_read_is_refused(tmp_path) -> None:
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(SpecError, match=r"^model: cannot read .*dir.yaml': Is a directory"):
        load_spec(tmp_path / "dir.yaml")
    with pytest.raises(SpecError, match=r"^model: unknown preset 'xxxx"):
        load_spec("x" * 5000)  # a name too long for the file system: not a path
    with pytest.raises(SpecError, match=r"^model: file .* not found"):
        load_spec("x" * 5000 + ".yaml")
