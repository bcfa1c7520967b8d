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
