"""Layout strings: parsing, resolution against model, world size and batch, errors."""

import pytest

from tera.models import load_spec
from tera.planner.layout import Layout, LayoutError


def test_parse_and_resolve_fills_dp():
    layout = Layout.parse("tp=1,pp=16,ep=64,zero=1,mbs=1")
    resolved = layout.resolve(load_spec("deepseek-v3"), 2048, 15360, 4096)
    assert resolved.dp == 128 and resolved.dp_shard == 128 and resolved.mesh.edp == 2
    assert str(resolved).startswith("tp=1,pp=16,vpp=1,ep=64")


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("tp=2,foo=1", "foo"),
        ("tp=two", "tp"),
        ("tp=0", "tp"),
        ("tp", "tp"),
        ("tp=2,tp=4", "tp"),
        ("recompute=most", "recompute"),
        ("schedule=zigzag", "schedule"),
        ("zero=4", "zero"),
        ("vpp=2", "vpp"),
        ("order=pp-dp", "order"),
        ("pp=2,recompute=full:none:none", "recompute"),
        ("pp=2,partition=3:4:5", "partition"),
        ("partition=3:x", "partition"),
        ("tp=\u00b2", "tp"),  # str.isdigit takes superscript two; int() does not
        ("tp=\u0662", "tp"),  # an Arabic-Indic two: digits are ASCII
        ("partition=1:\u00b2", "partition"),
        ("t\x1ep=2", "'t\\x1ep'"),  # a key holding a line break is named by its repr
        ("0\x1e0", "'0\\x1e0'"),
    ],
)
def test_malformed_layout_strings_name_the_field(text, field):
    with pytest.raises(LayoutError) as err:
        Layout.parse(text)
    assert err.value.field == field
    assert str(err.value).startswith(f"layout.{field}:")
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize(
    ("model", "text", "gpus", "batch", "seq", "field"),
    [
        ("llama3-8b", "tp=3", 24, 64, 4096, "tp"),  # 32 heads
        ("mixtral-8x7b", "ep=3", 24, 48, 4096, "ep"),  # 8 experts
        ("llama3-8b", "ep=2", 8, 64, 4096, "ep"),  # dense model
        ("llama3-8b", "tp=2,pp=2", 10, 64, 4096, "tp"),  # 4 does not divide 10 GPUs
        ("llama3-8b", "pp=64", 64, 64, 4096, "pp"),  # 32 layers
        ("llama3-8b", "tp=2,dp=8", 8, 64, 4096, "dp"),  # dp is 4
        ("llama3-8b", "tp=1,mbs=3", 8, 64, 4096, "mbs"),
        ("llama3-8b", "cp=4", 8, 64, 4100, "cp"),
        ("mixtral-8x7b", "tp=1,ep=8", 4, 64, 4096, "ep"),  # ep beyond the dense block
        ("llama3-8b", "pp=2,vpp=2,schedule=interleaved", 8, 12, 4096, "schedule"),
    ],
)
def test_layouts_that_do_not_divide_are_refused(model, text, gpus, batch, seq, field):
    layout = Layout.parse(text)
    with pytest.raises(LayoutError) as err:
        layout.resolve(load_spec(model), gpus, batch, seq)
    assert err.value.field == field


def test_tp_beyond_kv_heads_replicates_them():
    # 8 KV heads under tp=16: each KV head is replicated on two ranks, which is allowed
    resolved = Layout.parse("tp=16").resolve(load_spec("llama3-70b"), 16, 64, 4096)
    assert resolved.dp == 1


def test_partition_per_stage_recompute_and_order_round_trip():
    spec = load_spec("tiny-moe")
    text = "pp=2,vpp=2,schedule=interleaved,partition=1:1:1:1,recompute=full:none,order=tp-cp-pp-dp"
    layout = Layout.parse(text).resolve(spec, 8, 16, 128)
    assert layout.stage_recompute == ("full", "none") and layout.chunk_sizes(4) == (1, 1, 1, 1)
    assert Layout.parse(str(layout)) == layout == Layout.from_dict(layout.to_dict())
    assert "order=" not in str(Layout.parse("pp=2").resolve(spec, 8, 16, 128))
    with pytest.raises(LayoutError, match="partition"):
        Layout.parse("pp=2,partition=1:2").resolve(spec, 8, 16, 128)  # 3 of 4 blocks
