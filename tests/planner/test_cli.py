"""tera-plan: outputs, and every class of bad input answered in one line with status 2."""

import json
import subprocess
import sys

import pytest

from tera.planner.cli import main

EVAL = [
    "evaluate",
    "tiny-moe",
    "--cluster",
    "dgx-h100",
    "--gpus",
    "8",
    "--global-batch",
    "16",
    "--seq-len",
    "128",
]


def run(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_evaluate_json_has_the_design_fields(capsys):
    code, out, _ = run(capsys, *EVAL, "--layout", "tp=2,pp=2,ep=2", "--json")
    assert code == 0
    result = json.loads(out)
    for key in (
        "layout",
        "fits",
        "step_time_s",
        "tokens_per_s_per_gpu",
        "model_tflops_per_gpu",
        "mfu",
        "peak_memory_gib",
        "breakdown_s",
        "memory_gib",
    ):
        assert key in result
    assert result["layout"]["dp"] == 2 and result["layout"]["schedule"] == "1f1b"
    for key in (
        "compute",
        "tp_comm",
        "cp_comm",
        "ep_comm",
        "dp_comm",
        "pp_comm",
        "bubble",
        "optimizer",
    ):
        assert result["breakdown_s"][key] >= 0
    for key in ("params", "grads", "optimizer", "activations", "buffers"):
        assert result["memory_gib"][key] >= 0
    assert result["step_time_s"] > 0 and 0 < result["mfu"] < 1


def test_evaluate_table(capsys):
    code, out, _ = run(capsys, *EVAL, "--layout", "tp=2,pp=2,ep=2")
    assert code == 0
    assert "step time" in out and "MFU" in out and "GiB" in out


def test_models_clusters_and_trace(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0 and "deepseek-v3" in out and "tiny-moe" in out
    code, out, _ = run(capsys, "clusters")
    assert code == 0 and "dgx-h100" in out and "gb200-nvl72" in out
    code, out, _ = run(capsys, "trace", "tiny-moe", "--seq-len", "64")
    assert code == 0 and "expert" in out and "attention" in out


def test_trace_json_is_node_link(capsys):
    code, out, _ = run(capsys, "trace", "tiny-moe", "--seq-len", "64", "--json")
    graph = json.loads(out)
    assert code == 0 and graph["nodes"] and graph["edges"]


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (
            [
                "evaluate",
                "deepseek-v9",
                "--cluster",
                "dgx-h100",
                "--layout",
                "tp=1",
                "--global-batch",
                "8",
                "--seq-len",
                "128",
            ],
            ["model", "deepseek-v9"],
        ),
        ([*EVAL[:3], "dgx-h900", *EVAL[4:], "--layout", "tp=1"], ["dgx-h900"]),
        ([*EVAL, "--layout", "tp=2,bogus=1"], ["layout.bogus", "unknown key"]),
        ([*EVAL, "--layout", "tp=3"], ["layout.tp"]),  # 8 GPUs
        ([*EVAL, "--layout", "ep=3,tp=1,pp=1"], ["layout.ep"]),  # 8 experts
        ([*EVAL, "--layout", "pp=8"], ["layout.pp"]),  # 4 layers
        ([*EVAL, "--layout", "tp=8"], ["layout.tp"]),  # 4 heads
        ([*EVAL, "--layout", "mbs=3"], ["layout.mbs"]),
        ([*EVAL, "--layout", "tp=1", "--precision", "fp4"], ["precision"]),
        ([*EVAL[:-1], "-5", "--layout", "tp=1"], ["seq-len"]),
        (["evaluate", "tiny-moe"], ["required"]),
        (["frobnicate"], ["frobnicate"]),
    ],
)
def test_bad_input_is_one_line_with_status_2(capsys, argv, needles):
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, *needles)


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("name: x\nlayers: [1\n", ["not valid YAML", "line"]),
        (
            "name: x\nlayers: 2\nhidden: 64\nvocab: 100\nffn: {kind: swiglu, hidden: 128}\n",
            ["attention", "missing"],
        ),
        (
            "name: x\nlayers: 2\nhidden: 64\nvocab: 100\nattention: {kind: gqa, heads: 4, "
            "kv_heads: 3, head_dim: 16}\nffn: {kind: swiglu, hidden: 128}\n",
            ["attention.kv_heads"],
        ),
        (
            "name: x\nlayers: 2\nhidden: 64\nvocab: 100\nattention: {kind: gqa, heads: 4, "
            "kv_heads: 2, head_dim: 16}\nffn: {kind: swiglu, hidden: 128}\nlayerz: 3\n",
            ["layerz", "unknown field"],
        ),
    ],
)
def test_bad_model_yaml_is_one_line_with_status_2(capsys, tmp_path, text, needles):
    path = tmp_path / "model.yaml"
    path.write_text(text)
    code, _, err = run(
        capsys,
        "evaluate",
        str(path),
        "--cluster",
        "dgx-h100",
        "--gpus",
        "8",
        "--layout",
        "tp=1",
        "--global-batch",
        "8",
        "--seq-len",
        "64",
    )
    assert_one_line_error(code, err, *needles)


def test_models_starts_without_importing_torch():
    code = (
        "import sys, tera.planner.cli as c; c.main(['models']); "
        "assert 'torch' not in sys.modules and 'networkx' not in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


SEARCH = [
    "search",
    "tiny-moe",
    "--cluster",
    "dgx-h100",
    "--gpus",
    "8",
    "--global-batch",
    "32",
    "--seq-len",
    "128",
]


def test_search_prints_ranked_plans_and_writes_a_plan_that_loads(capsys, tmp_path):
    from tera.planner.plan import Plan

    path = tmp_path / "plan.json"
    code, out, err = run(capsys, *SEARCH, "--top", "2", "-o", str(path))
    assert code == 0, err
    assert "OPTIMAL" in out and "top plans" in out and f"wrote {path}" in out
    plan = Plan.load(path)
    assert plan.certificate["status"] == "OPTIMAL" and plan.world_size == 8
    assert plan.prediction["fits"]


def test_search_json_has_the_certificate_and_the_plans(capsys):
    code, out, _ = run(capsys, *SEARCH, "--top", "2", "--json", "--fix", "pp=2")
    assert code == 0
    data = json.loads(out)
    assert {"status", "objective", "bound", "gap", "seconds"} <= set(data)
    assert [p["rank"] for p in data["plans"]] == [1, 2]
    assert all(p["layout"]["pp"] == 2 for p in data["plans"])
    assert data["plans"][0]["step_time_s"] <= data["plans"][1]["step_time_s"]


def test_search_for_the_fewest_gpus_writes_a_plan_on_that_many(capsys, tmp_path):
    from tera.planner.plan import Plan

    path = tmp_path / "plan.json"
    args = [*SEARCH, "--gpus", "32", "--objective", "gpus", "--tokens", "4M", "--days", "1"]
    code, out, err = run(capsys, *args, "-o", str(path))
    assert code == 0, err
    assert "GPUs" in out
    plan = Plan.load(path)
    assert plan.certificate["objective_kind"] == "gpus"
    # a loose deadline: the smallest count searched, one scale-up domain
    assert plan.world_size == plan.certificate["objective"] == 8


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--fix", "foo=2"], "foo"),
        (["--objective", "speed"], "objective"),
        (["--objective", "gpus", "--tokens", "1e9"], "--days"),
        (["--objective", "gpus", "--tokens", "3x", "--days", "1"], "tokens"),
    ],
)
def test_search_bad_input_is_one_line(capsys, extra, needle):
    code, _, err = run(capsys, *SEARCH, *extra)
    assert_one_line_error(code, err, needle)


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--fix", "tp=1,cp=1,pp=1,mbs=8"], ["global batch", "--global-batch 64 divides"]),
        (["--objective", "gpus", "--tokens", "1e12", "--days", "1e-9"], ["deadline", "days"]),
    ],
)
def test_an_infeasible_search_exits_3_with_the_change_that_fits(capsys, extra, needles):
    code, _, err = run(capsys, *SEARCH, *extra)
    lines = err.strip().splitlines()
    assert code == 3 and len(lines) == 1 and lines[0].startswith("infeasible: "), err
    assert all(needle in lines[0] for needle in needles), lines[0]


@pytest.mark.parametrize(
    ("command", "preset", "key"),
    [("models", "tiny-moe", "hidden"), ("clusters", "dgx-h100", "node")],
)
def test_preset_lists_print_json(capsys, command, preset, key):
    code, out, _ = run(capsys, command, "--json")
    assert code == 0 and key in json.loads(out)[preset]


def test_search_reports_its_progress_as_fractions():
    from tera.planner.solve import search
    from tera.planner.solve.search import PLAN_FOUND

    events = []
    search(
        "tiny-moe", "dgx-h100", 32, 128, gpus=8, top=3, progress=lambda m, f: events.append((m, f))
    )
    bounding = [f for m, f in events if m.startswith("bounding")]
    assert bounding and bounding == sorted(bounding) and all(0 <= f < 1 for f in bounding)
    assert all(0 <= f <= 1 for _, f in events if f is not None)
    assert sum(m.startswith(PLAN_FOUND) for m, _ in events) >= 3  # each plan entering the top 3


def test_the_progress_bar_prints_found_plans_to_stderr_only(capsys):
    from tera.planner.cli import _progress
    from tera.planner.solve.search import PLAN_FOUND

    with _progress(True) as progress:
        progress("bounding", 0.5)
        progress(f"{PLAN_FOUND} tp2 pp1  0.5 (1 solved)", None)
    with _progress(False) as progress:
        progress(f"{PLAN_FOUND} quiet", None)
    out, err = capsys.readouterr()
    assert out == "" and "tp2 pp1" in err and "quiet" not in err
