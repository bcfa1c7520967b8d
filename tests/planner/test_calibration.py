"""Calibration: the committed file loads, bad files are refused, constants act as named."""

import dataclasses

import pytest

from tera.models import load_spec
from tera.planner import evaluate
from tera.planner.cost import CostModel
from tera.planner.cost.calibration import (
    CALIBRATION_FILE,
    MAMF,
    Calibration,
    CalibrationError,
)
from tera.planner.layout import Layout
from tera.planner.trace import trace
from tera.topologies import load


def test_committed_calibration_loads_and_says_what_it_was_fitted_on():
    cal = Calibration.load()
    assert CALIBRATION_FILE.exists()
    assert cal.fitted_on, "calibration.yaml must name the groups it was fitted on"
    for key, value in cal.gemm_efficiency.items():
        assert 0 < value <= 1, key
    for name in Calibration.SCALARS:
        assert getattr(cal, name) >= 0


def test_missing_file_gives_the_prior(tmp_path):
    assert Calibration.load(tmp_path / "absent.yaml") == Calibration.prior()
    assert Calibration.prior().gemm_efficiency == MAMF


def test_save_and_load_round_trip(tmp_path):
    cal = dataclasses.replace(
        Calibration.prior(),
        tp_exposed=0.25,
        expert_rows_half=128.0,
        gemm_efficiency={**MAMF, "hopper/fp8": 0.6},
        fitted_on=("group a", "group b"),
    )
    path = tmp_path / "cal.yaml"
    cal.save(path, comment="two lines\nof comment")
    assert path.read_text().startswith("# two lines\n# of comment\n")
    assert Calibration.load(path) == cal


@pytest.mark.parametrize(
    "text, message",
    [
        ("tp_exposd: 0.5\n", "unknown key 'tp_exposd'"),
        ("tp_exposed: 1.5\n", "tp_exposed = 1.5 exceeds 1.0"),
        ("hbm_efficiency: -0.1\n", "hbm_efficiency must be a number >= 0"),
        ("dp_exposed: fast\n", "dp_exposed must be a number"),
        ("gemm_efficiency: {hopper: 0.5}\n", "use <arch>/bf16|fp8"),
        ("gemm_efficiency: {hopper/fp8: 2}\n", "gemm_efficiency.hopper/fp8 = 2 exceeds"),
    ],
)
def test_malformed_calibration_names_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(CalibrationError, match=message.replace("(", r"\(").replace("|", r"\|")):
        Calibration.load(path)


def test_matmul_efficiency_falls_back_by_precision_then_arch():
    cal = Calibration.prior()
    assert cal.matmul_efficiency("hopper", fp8=True) == MAMF["hopper/fp8"]
    assert cal.matmul_efficiency("ampere", fp8=True) == MAMF["ampere/bf16"]  # no fp8 on A100
    assert cal.matmul_efficiency("unknown-arch", fp8=False) == MAMF["hopper/bf16"]


def test_expert_gemm_factor_halves_at_the_named_row_count():
    cal = dataclasses.replace(Calibration.prior(), expert_rows_half=256.0)
    assert cal.expert_gemm_factor(256) == pytest.approx(0.5)
    assert cal.expert_gemm_factor(64) < cal.expert_gemm_factor(1024) < 1
    assert Calibration.prior().expert_gemm_factor(16) == 1.0  # half = 0: no fall-off


def test_attention_efficiency_interpolates_the_fa2_curve():
    cal = Calibration.prior()
    lo, mid, hi = (cal.attention_efficiency(s) for s in (512, 3072, 16384))
    assert lo == pytest.approx(163 / 989.4) and hi == pytest.approx(328 / 989.4)
    assert mid == pytest.approx((265 + 294) / 2 / 989.4)
    assert cal.attention_efficiency(100) == lo and cal.attention_efficiency(10**6) == hi
    doubled = dataclasses.replace(cal, attention_scale=2.0)
    assert doubled.attention_efficiency(3072) == pytest.approx(2 * mid)


def _cost(layout: str, cal: Calibration) -> CostModel:
    spec = load_spec("qwen3-30b-a3b")
    resolved = Layout.parse(layout).resolve(spec, 16, 64, 4096)
    return CostModel(trace(spec, 4096), load("dgx-h100", gpus=16), resolved, 64, "bf16", 1.0, cal)


def test_constants_act_on_the_parts_they_name():
    prior = Calibration.prior()
    base = _cost("tp=2,ep=8,mbs=1", prior)
    e = base.estimate("m")
    assert e.breakdown_s["tp_comm"] > 0 and e.breakdown_s["ep_comm"] > 0
    hidden = base.recalibrated(dataclasses.replace(prior, tp_exposed=0.0, ep_exposed=0.5))
    h = hidden.estimate("m")
    assert h.breakdown_s["tp_comm"] == 0
    assert h.breakdown_s["ep_comm"] == pytest.approx(e.breakdown_s["ep_comm"] / 2)
    slow_gemm = dataclasses.replace(prior, gemm_efficiency={**MAMF, "hopper/bf16": 0.4})
    assert (
        base.recalibrated(slow_gemm).estimate("m").breakdown_s["compute"]
        > (e.breakdown_s["compute"])
    )
    skinny = dataclasses.replace(prior, expert_rows_half=1e5)
    assert base.recalibrated(skinny).estimate("m").step_time_s > e.step_time_s
    # memory does not depend on the calibration
    assert hidden.estimate("m").peak_memory_gib == e.peak_memory_gib


def test_evaluate_uses_the_committed_calibration():
    e = evaluate("llama3-8b", "dgx-h100", "tp=1,mbs=1", 8, 4096, gpus=8)
    cost = _cost("tp=1,ep=8,mbs=1", Calibration.load())
    assert cost.cal == Calibration.load() and e.step_time_s > 0
