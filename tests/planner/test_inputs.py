"""The checks every planner entry point applies to its inputs (planner/inputs.py)."""

import dataclasses

import pytest

from tera.models import SpecError, load_spec
from tera.planner.inputs import MAX_SEQ_LEN, load_problem
from tera.planner.layout import LayoutError

TINY = load_spec("tiny-moe")  # 8 experts, top-2: the busiest expert carries at most 4x the mean


def problem(model=TINY, seq_len=64, imbalance=1.0, global_batch=8):
    return load_problem(model, "dgx-h100", 8, "bf16", global_batch, seq_len, imbalance)


def test_valid_inputs_load():
    spec, cluster = problem(seq_len=MAX_SEQ_LEN, imbalance=4.0)
    assert spec is TINY and cluster.num_gpus == 8


@pytest.mark.parametrize(
    ("changes", "field", "needle"),
    [
        ({"seq_len": MAX_SEQ_LEN + 1}, "seq_len", f"more than the {MAX_SEQ_LEN} tokens"),
        ({"global_batch": True}, "global_batch", "positive integer"),
        ({"imbalance": float("nan")}, "imbalance", "[1, 4] (experts/top_k)"),
        ({"imbalance": float("inf")}, "imbalance", "finite"),
        ({"imbalance": 4.5}, "imbalance", "[1, 4]"),
        ({"imbalance": 0.5}, "imbalance", "1.0 is balanced routing"),
        ({"imbalance": "2"}, "imbalance", "expected a number"),
    ],
)
def test_bad_problem_inputs_name_the_field(changes, field, needle):
    with pytest.raises(LayoutError) as err:
        problem(**changes)
    assert err.value.field == field and needle in str(err.value)


def test_a_dense_model_takes_any_finite_imbalance():
    dense = dataclasses.replace(TINY, moe=None)
    assert problem(dense, imbalance=100.0)[0].moe is None
    with pytest.raises(LayoutError, match=r"imbalance: nan .*use a finite number >= 1"):
        problem(dense, imbalance=float("nan"))


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (dataclasses.replace(TINY, hidden=132), "hidden"),
        (dataclasses.replace(TINY, moe=dataclasses.replace(TINY.moe, expert_hidden=1)),
         "moe.expert_hidden"),
    ],
)  # fmt: skip
def test_an_moe_width_the_trace_cannot_run_is_refused(spec, field):
    """torch._grouped_mm on the meta device takes 16-byte strides: a width of 1 or 132 bf16
    elements crashed the trace before this check."""
    with pytest.raises(SpecError) as err:
        problem(spec)
    assert err.value.field == field and "not a multiple of 8" in str(err.value)
    assert problem(dataclasses.replace(spec, moe=None))[0].moe is None  # dense: any width
