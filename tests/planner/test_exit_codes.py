"""Exit status, one test per class (issue 8, item 1): tera-plan exits 0 on success, 2 on bad
input, 3 when valid inputs admit no layout and 1 on an internal error, the only case with a
traceback; every numeric flag refuses what it cannot mean; and tera-run refuses a plan whose
model digest, schema version or layout was edited (item 5), in one line naming the field.
(The world-size refusals are in tests/runtime/test_cli.py and test_launch.py.)"""

import json

import pytest
import yaml

from tera.models import load_spec
from tera.planner import cli, evaluate
from tera.planner.layout import Layout
from tera.planner.plan import Plan
from tera.runtime import cli as run_cli
from tera.topologies import load

EVALUATE = ["evaluate", "tiny-moe", "--cluster", "dgx-h100", "--gpus", "8", "--seq-len", "64"]
EVALUATE += ["--global-batch", "8", "--layout", "tp=1"]


def run(capsys, argv, main=cli.main):
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_success_exits_0(capsys):
    code, out, err = run(capsys, [*EVALUATE, "--json"])
    assert code == 0 and err == ""
    assert json.loads(out)["layout"]["tp"] == 1


def test_bad_input_exits_2_in_one_line(capsys):
    code, _, err = run(capsys, [*EVALUATE, "--layout", "tp=3"])
    assert code == 2
    assert one_line(err).startswith("error: layout.tp: tp*cp*pp = 3 does not divide 8 GPUs; ")


def test_infeasible_exits_3_with_the_change_that_fits(capsys, tmp_path):
    """GPUs of 1 MB hold no layout of tiny-moe on 8 of them; more GPUs do."""
    data = load("dgx-h100", gpus=8).to_dict()
    data["node"]["gpu"]["hbm_gb"] = 0.001
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(data))
    argv = ["search", "tiny-moe", "--cluster", str(path), "--global-batch", "8", "--seq-len", "64"]
    code, _, err = run(capsys, argv)
    assert code == 3
    line = one_line(err)
    assert line.startswith("infeasible: no layout of tiny-moe fits in ") and "GPUs fit" in line


def test_internal_error_exits_1_with_the_traceback(capsys, monkeypatch):
    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_models", broken)
    code, _, err = run(capsys, ["models"])
    assert code == 1
    assert err.startswith("Traceback (most recent call last):")
    assert "RuntimeError: a bug" in err
    assert err.strip().splitlines()[-1].startswith("internal error: this is a bug in tera")


# ---- numeric flags: refused by the parser, before anything runs -----------------------------
SEARCH = ["search", "m", "--cluster", "c", "--global-batch", "8", "--seq-len", "8"]
ESTIMATE = ["estimate", "m", "--cluster", "c", "--tokens", "1T", "--global-batch", "8"]
ESTIMATE += ["--seq-len", "8"]
BAD_FLAGS = [
    ([*SEARCH, "--time-limit", "nan"], "--time-limit", "expected a positive number, got 'nan'"),
    ([*SEARCH, "--time-limit", "-1"], "--time-limit", "expected a positive number"),
    ([*SEARCH, "--time-limit", "inf"], "--time-limit", "expected a positive number"),
    ([*SEARCH, "--price-per-gpu-hour", "0"], "--price-per-gpu-hour", "a positive number"),
    ([*SEARCH, "--reserve-gib", "-3"], "--reserve-gib", "expected a number >= 0, got '-3'"),
    ([*SEARCH, "--reserve-gib", "nan"], "--reserve-gib", "expected a number >= 0"),
    ([*SEARCH, "--tokens", "1e400"], "--tokens", "expected a positive count"),
    ([*SEARCH, "--tokens", "infT"], "--tokens", "expected a positive count"),
    ([*SEARCH, "--days", "inf"], "--days", "expected a positive number"),
    ([*SEARCH, "--imbalance", "0.5"], "--imbalance", "expected a number >= 1, got '0.5'"),
    ([*SEARCH, "--imbalance", "nan"], "--imbalance", "expected a number >= 1"),
    ([*SEARCH, "--seq-len", "99999999"], "--seq-len", "expected at most 16777216 tokens"),
    ([*ESTIMATE, "--gpus", "8", "--grid-gco2-per-kwh", "-1"], "--grid-gco2-per-kwh", ">= 0"),
    ([*ESTIMATE, "--gpus", "8", "--restart-minutes", "-5"], "--restart-minutes", ">= 0"),
    ([*ESTIMATE, "--gpus", "8", "--pue", "0.9"], "--pue", "expected a number >= 1"),
    ([*ESTIMATE, "--gpus", "8", "--node-power-kw", "inf"], "--node-power-kw", "positive"),
    ([*ESTIMATE, "--gpus", "8", "--max-gpus", "64"], "--max-gpus", "needs --days"),
    (["trace", "m", "--seq-len", "16777217"], "--seq-len", "expected at most 16777216 tokens"),
]


@pytest.mark.parametrize(
    ("argv", "flag", "problem"), BAD_FLAGS, ids=[f"{f} {a[-1]}" for a, f, _ in BAD_FLAGS]
)
def test_a_bad_flag_value_exits_2_naming_the_flag(capsys, argv, flag, problem):
    code, _, err = run(capsys, argv)
    assert code == 2
    line = one_line(err)
    assert line.startswith(f"error: argument {flag}: ") and problem in line, line


def test_flags_at_the_edge_of_their_range_parse():
    args = cli.build_parser().parse_args(
        [*ESTIMATE, "--days", "30", "--max-gpus", "64", "--pue", "1", "--restart-minutes", "0"]
        + ["--grid-gco2-per-kwh", "0"]
    )
    assert (args.max_gpus, args.pue, args.restart_minutes, args.grid_gco2_per_kwh) == (64, 1, 0, 0)
    args = cli.build_parser().parse_args([*SEARCH, "--reserve-gib", "0", "--imbalance", "1"])
    assert (args.reserve_gib, args.imbalance) == (0.0, 1.0)


def test_an_imbalance_past_experts_over_top_k_exits_2(capsys):
    """A check the parser cannot make: tiny-moe routes each token to 2 of 8 experts, so the
    busiest expert carries at most 4 times the mean."""
    code, _, err = run(capsys, [*EVALUATE, "--imbalance", "4.5"])
    assert code == 2
    assert one_line(err).startswith("error: layout.imbalance: 4.5 is not the busiest expert's")


# ---- tera-run: a plan edited by hand -----------------------------------------------------------
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS")


@pytest.fixture(scope="module")
def plan_data(tmp_path_factory) -> dict:
    """A 2-rank tiny-moe plan (ep=2) on local-cpu, as JSON."""
    spec, cluster = load_spec("tiny-moe"), load("local-cpu", gpus=2)
    layout = Layout.parse("ep=2").resolve(spec, 2, 4, 16)
    estimate = evaluate(spec, cluster, layout, 4, 16, precision="fp32")
    plan = Plan.build(spec, cluster, layout, 4, 16, "fp32", estimate.to_dict())
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    plan.save(path)
    return json.loads(path.read_text())


def set_key(data: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        data = data[part]
    data[last] = value


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("model.hidden", 256, "plan.model_digest: does not match the model: the model was edited"),
        ("cluster.gpus", 4, "plan.cluster_digest: does not match the cluster"),
        ("schema_version", 99, "plan.schema_version: 99 is not a version this tera reads (2)"),
        ("layout.tp", 2, "plan.layout.dp: dp=2 but gpus/(tp*cp*pp) = 1; drop dp or set dp=1"),
        ("layout.ep", 3, "plan.layout.ep: ep=3 does not divide 8 experts"),
        ("layout.mbs", 3, "plan.layout.mbs: global batch 4 is not a multiple of dp*mbs = 6"),
    ],
)
def test_tera_run_refuses_an_edited_plan_in_one_line(
    plan_data, tmp_path, monkeypatch, capsys, key, value, message
):
    for variable in LAUNCHER_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    data = json.loads(json.dumps(plan_data))
    set_key(data, key, value)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    code, out, err = run(capsys, [str(path), "--steps", "1"], main=run_cli.main)
    assert (code, out) == (2, "")
    assert one_line(err).startswith(f"error: {message}")
