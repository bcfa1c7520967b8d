"""`tera-run`: every bad input exits 2 with one line naming the field and the fix (all in
process, a sample as whole processes), the metrics writer, and whole runs: the metrics
file, --resume continuing exactly, and a checkpoint resumed under another plan."""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from tera.models import load_spec
from tera.planner import evaluate
from tera.planner.layout import Layout
from tera.planner.plan import Plan
from tera.runtime import checkpoint
from tera.runtime.cli import main
from tera.runtime.metrics import MetricsWriter, peak_memory_bytes
from tera.runtime.run import Progress, RunOptions, run_settings
from tera.topologies import load

GLOBAL_BATCH, SEQ_LEN = 4, 16
# The fixtures save checkpoints in this process, without a process group, on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def make_plan(path, layout: str, gpus: int):
    spec = load_spec("tiny-moe")
    cluster = load("local-cpu", gpus=gpus)
    resolved = Layout.parse(layout).resolve(spec, gpus, GLOBAL_BATCH, SEQ_LEN)
    estimate = evaluate(spec, cluster, resolved, GLOBAL_BATCH, SEQ_LEN, precision="fp32")
    plan = Plan.build(spec, cluster, resolved, GLOBAL_BATCH, SEQ_LEN, "fp32", estimate.to_dict())
    plan.save(path)
    return plan


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 2-rank plan, broken plans, token files and checkpoint directories."""
    tmp = tmp_path_factory.mktemp("cli")
    plan = make_plan(tmp / "plan.json", "ep=2", gpus=2)
    (tmp / "garbage.json").write_text("{not json")
    data = json.loads((tmp / "plan.json").read_text())
    del data["seq_len"]
    (tmp / "no_seq_len.json").write_text(json.dumps(data))
    np.array([1, 2, 5000] + [0] * 40, dtype=np.uint16).tofile(tmp / "over_vocab.bin")
    # Checkpoints of a 4-step synthetic run (seed 0): one stopped at step 2, one complete.
    settings = run_settings(plan, RunOptions(steps=4), "synthetic")
    state = {"progress": Progress(2)}
    checkpoint.save(tmp / "partial", 2, state, {"settings": settings})
    checkpoint.save(tmp / "done", 4, state, {"settings": settings})
    make_plan(tmp / "cp2.json", "cp=2", gpus=2)  # valid, but the Trainer has no cp
    return tmp


BAD_INPUTS = {  # name -> (arguments, extra environment, the one line expected on stderr)
    "missing plan": (
        ["absent.json"],
        {},
        "error: plan.file: 'absent.json' not found; give the path of a plan written by "
        "tera-plan search -o",
    ),
    "plan not JSON": (["garbage.json"], {}, "error: plan.file: 'garbage.json' is not JSON"),
    "plan without seq_len": (["no_seq_len.json"], {}, "error: plan.seq_len: missing; add it"),
    "plan the runtime cannot run": (
        ["cp2.json"],
        {},
        "error: plan.layout.cp: cp=2: torch's context_parallel ring attention handles only",
    ),
    "steps zero": (["plan.json", "--steps", "0"], {}, "error: argument --steps: expected a"),
    "lr negative": (["plan.json", "--lr", "-1"], {}, "error: argument --lr: expected a positive"),
    "resume without directory": (
        ["plan.json", "--resume"],
        {},
        "error: --resume: needs a checkpoint directory; pass --checkpoint-dir DIR",
    ),
    "unknown non-finite policy": (
        ["plan.json", "--on-nonfinite", "ignore"],
        {},
        "error: argument --on-nonfinite: invalid choice: 'ignore'",
    ),
    "resume with another seed": (
        ["plan.json", "--resume", "--checkpoint-dir", "partial", "--steps", "4", "--seed", "1"],
        {},
        "error: --seed: the checkpoint's run used 0, this one 1; resume with the run's settings",
    ),
    "resume of a finished run": (
        ["plan.json", "--resume", "--checkpoint-dir", "done", "--steps", "4"],
        {},
        "error: --resume: the run is complete: its latest checkpoint is step 4 of 4",
    ),
    "new run over checkpoints": (
        ["plan.json", "--checkpoint-dir", "partial"],
        {},
        "error: --checkpoint-dir: 'partial' holds a run's checkpoints (latest step 2); "
        "pass --resume",
    ),
    "interval without directory": (
        ["plan.json", "--checkpoint-every", "2"],
        {},
        "error: --checkpoint-every: needs a directory",
    ),
    "missing data file": (
        ["plan.json", "--data", "absent.bin"],
        {},
        "error: --data: 'absent.bin' not found; pass --data synthetic or the path",
    ),
    "token over the vocabulary": (
        ["plan.json", "--data", "over_vocab.bin"],
        {},
        "error: --data: 'over_vocab.bin' holds token 5000 at index 2, outside the model's "
        "vocabulary of 2048",
    ),
    "torchrun world of another size": (
        ["plan.json"],
        {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0"},
        "error: plan.world_size: the plan is for 2 ranks but torchrun started 3; launch",
    ),
    "srun over nodes without MASTER_ADDR": (
        ["plan.json"],
        {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NNODES": "2"},
        "error: MASTER_ADDR: not set for an srun world over 2 nodes",
    ),
}
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "SLURM_PROCID")
# Also run as processes: the refusals before torch is imported, and one after.
IN_SUBPROCESS = (
    "missing plan",
    "plan not JSON",
    "steps zero",
    "torchrun world of another size",
    "srun over nodes without MASTER_ADDR",
    "missing data file",
)


def clean_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line(files, name, monkeypatch, capsys):
    arguments, env, expected = BAD_INPUTS[name]
    monkeypatch.chdir(files)
    for key in LAUNCHER_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    try:
        status = main(arguments)
    except SystemExit as exc:  # argparse
        status = exc.code
    out, err = capsys.readouterr()
    assert status == 2, err
    assert out == ""
    assert len(err.splitlines()) == 1, err
    assert err.startswith(expected)


def test_bad_input_in_a_process_prints_no_traceback(files):
    """The same refusals as whole processes, started together so that they overlap."""
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "tera.runtime.cli", *BAD_INPUTS[name][0]],
            cwd=files,
            env={**clean_environment(), **BAD_INPUTS[name][1]},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in IN_SUBPROCESS
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert (proc.returncode, out) == (2, ""), err
        assert len(err.splitlines()) == 1 and err.startswith(BAD_INPUTS[name][2]), err


def test_only_rank_0_of_a_joined_world_reports(files, monkeypatch, capsys):
    monkeypatch.chdir(files)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["absent.json"]) == 2
    assert capsys.readouterr().err == ""


def test_metrics_writer_writes_one_flushed_line_per_step(tmp_path):
    path = tmp_path / "m" / "metrics.jsonl"
    with MetricsWriter(path) as metrics:
        metrics.write(1, 7.5, 64, 0.5, grad_norm=1.0, lr=1e-3, comm_bytes={"ep": 10})
        # Readable before close: every line is flushed.
        assert json.loads(path.read_text())["comm_bytes"] == {"ep": 10}
        metrics.write(2, float("nan"), 64, 0.25, comm_bytes_predicted={"ep": 12.0})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    required = {"step", "loss", "tokens", "step_time_s", "peak_memory_bytes", "grad_norm", "lr"}
    assert required | {"comm_bytes", "comm_bytes_predicted"} <= lines[0].keys()
    assert lines[1]["tokens_per_s"] == 256 and lines[1]["comm_bytes_predicted"] == {"ep": 12.0}
    assert lines[1]["loss"] is None  # JSON has no NaN
    # On CPU: the peak RSS, which never falls, of a process that imported torch (> 10 MiB).
    assert 10 * 2**20 < lines[0]["peak_memory_bytes"] <= peak_memory_bytes()

    # A resumed run keeps the steps up to its checkpoint and drops the ones after it, a
    # line torn by a kill included, and leaves no temporary file.
    with open(path, "a") as f:
        f.write('{"step": 3, "lo')
    with MetricsWriter(path, resumed_step=1) as metrics:
        metrics.write(2, 6.5, 64, 0.25)
    assert [json.loads(line)["loss"] for line in path.read_text().splitlines()] == [7.5, 6.5]
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.jsonl"]
    with MetricsWriter(path) as metrics:  # a new run starts afresh
        pass
    assert path.read_text() == ""
    MetricsWriter(None).write(1, 1.0, 1, 1.0)  # no file: a no-op


def metrics_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def tera_run(plan, *arguments) -> int:
    arguments = [str(a) for a in arguments]
    common = ["--warmup-steps", "2", "--lr", "1e-2", "--steps", "5"]
    return main([str(plan), *common, *arguments])


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    """A 5-step run of the ep=2 plan, checkpointing every 3 steps (and at the end):
    (directory, metrics)."""
    tmp = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # as the launcher would set it, restored after
        status = tera_run(
            files / "plan.json",
            *("--checkpoint-dir", str(tmp / "ck"), "--checkpoint-every", "3"),
            *("--metrics", str(tmp / "metrics.jsonl")),
        )
    assert status == 0
    return tmp / "ck", metrics_lines(tmp / "metrics.jsonl")


def interrupted_after_step_3(reference, tmp_path):
    """A copy of the reference's checkpoints as if the run had stopped after step 3."""
    directory = tmp_path / "ck"
    shutil.copytree(reference[0], directory)
    shutil.rmtree(directory / "step_5")
    return directory


def test_run_writes_a_metrics_line_per_step_and_checkpoints(reference):
    directory, lines = reference
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5]
    assert all(line["tokens"] == GLOBAL_BATCH * SEQ_LEN for line in lines)
    assert all(np.isfinite(line["loss"]) and line["step_time_s"] > 0 for line in lines)
    assert lines[0]["lr"] < lines[1]["lr"] > lines[3]["lr"]  # warm-up, then cosine decay
    assert sum(lines[0]["comm_bytes"].values()) > 0  # measured on rank 0
    assert lines[0]["comm_bytes_predicted"]
    assert checkpoint.latest(directory) == 5 and checkpoint.is_complete(directory, 3)
    marker = checkpoint.read_marker(directory, 5)
    assert marker["world_size"] == 2 and marker["settings"]["steps"] == 5


def test_resume_continues_exactly(files, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    directory = interrupted_after_step_3(reference, tmp_path)
    metrics = tmp_path / "metrics.jsonl"
    # The metrics of the interrupted run, step 4 included (logged, then the run died
    # before its checkpoint): the resumed run replaces it.
    lines = reference[1]
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines[:4]))
    assert (
        tera_run(
            files / "plan.json",
            "--resume",
            "--checkpoint-dir",
            str(directory),
            "--metrics",
            metrics,
        )
        == 0
    )
    resumed = metrics_lines(metrics)
    assert [line["step"] for line in resumed] == [1, 2, 3, 4, 5]
    assert [line["loss"] for line in resumed] == [line["loss"] for line in lines]
    assert [line["grad_norm"] for line in resumed] == [line["grad_norm"] for line in lines]
    assert checkpoint.latest(directory) == 5


def test_checkpoint_resumes_under_another_plan(files, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    directory = interrupted_after_step_3(reference, tmp_path)
    tp2 = tmp_path / "tp2.json"
    make_plan(tp2, "tp=2", gpus=2)  # dp 1 and tp 2 where the checkpoint had dp 2 and ep 2
    metrics = tmp_path / "metrics.jsonl"
    assert tera_run(tp2, "--resume", "--checkpoint-dir", str(directory), "--metrics", metrics) == 0
    resumed = [line["loss"] for line in metrics_lines(metrics)]
    expected = [line["loss"] for line in reference[1][3:]]
    np.testing.assert_allclose(resumed, expected, rtol=1e-5)
    assert checkpoint.read_marker(directory, 5)["layout"].startswith("tp=2,")


def test_an_srun_task_joins_its_world_in_process(tmp_path, monkeypatch):
    """One srun task: Slurm's variables become torch.distributed's and the run happens in
    this process, without the elastic launcher."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key in (*LAUNCHER_VARIABLES, "MASTER_PORT", "OMP_NUM_THREADS"):
        monkeypatch.setenv(key, "")  # restored after the test; adopt_slurm sets some
        monkeypatch.delenv(key)
    slurm = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_NNODES": "1", "MASTER_PORT": port}
    for key, value in slurm.items():
        monkeypatch.setenv(key, str(value))
    plan = make_plan(tmp_path / "one.json", "tp=1", gpus=1)
    metrics = tmp_path / "metrics.jsonl"
    assert main([str(tmp_path / "one.json"), "--steps", "1", "--metrics", str(metrics)]) == 0
    assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1"
    (line,) = metrics_lines(metrics)
    assert line["step"] == 1 and line["tokens"] == plan.global_batch * plan.seq_len
    assert line["comm_bytes"] == {}  # one rank: no collective moves a byte
