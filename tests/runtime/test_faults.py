"""Training faults (issue 8, item 6), on CPU with gloo: a rank killed mid-step under torchrun
with restarts, a rank killed during a checkpoint write, a corrupt checkpoint, a NaN or
infinite loss under each policy, and an unwritable checkpoint directory.

Faults are injected by the TERA_FAULT_INJECT test hook (tera.runtime.faults). The whole
jobs run as processes: `torchrun --standalone --nproc-per-node 2 -m tera.runtime.cli`, or
`python -m tera.runtime.cli` (its own local world), so that the hook's variable reaches
every worker; a 2-rank ep=2 plan of tiny-moe, 6 steps, a checkpoint every 3.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch.distributed as dist

from tera.runtime import checkpoint, faults
from tera.runtime.cli import main
from tera.runtime.run import (
    NonFiniteLoss,
    Progress,
    RunError,
    RunOptions,
    check_options,
    check_resume,
    train_step,
)

from .test_cli import clean_environment, make_plan, metrics_lines
from .world import run_world, tiny_batch, tiny_plan

STEPS, EVERY = 6, 3
SCHEDULE = ["--warmup-steps", "2", "--lr", "1e-2"]  # --steps apart: the NaN runs take fewer
TRAINING = ["--steps", STEPS, *SCHEDULE]
# Loading checkpoints in this process, without a process group, is on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def environment(fault: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in clean_environment().items() if k != faults.VARIABLE}
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback: no network needed
    return {**env, faults.VARIABLE: fault} if fault else env


def torchrun(tmp, directory: str, restarts: int, fault: str | None = None):
    """A resumable job: the same command line for every attempt, as a job script has it."""
    arguments = [
        *("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"),
        *("--max-restarts", restarts, "-m", "tera.runtime.cli", "plan.json", *TRAINING),
        *("--checkpoint-every", EVERY, "--resume", "--checkpoint-dir", directory),
        *("--metrics", f"{directory}.jsonl"),
    ]
    return subprocess.run(
        [sys.executable, *map(str, arguments)],
        cwd=tmp,
        env=environment(fault),
        capture_output=True,
        text=True,
        timeout=300,
    )


def losses(path) -> list[tuple[int, float]]:
    return [(line["step"], line["loss"]) for line in metrics_lines(path)]


def without_launcher_variables(mp: pytest.MonkeyPatch) -> None:
    """This process as a plain `tera-run`: it starts its own local world, with one thread
    per rank as torchrun gives each worker (the same arithmetic, so the same losses)."""
    mp.setenv("OMP_NUM_THREADS", "1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "SLURM_PROCID"):
        mp.delenv(key, raising=False)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The plan and the uninterrupted run, in this process (its local world is the
    quickest to start): (directory, the run's (step, loss) sequence)."""
    tmp = tmp_path_factory.mktemp("faults")
    make_plan(tmp / "plan.json", "ep=2", gpus=2)
    with pytest.MonkeyPatch.context() as mp:
        without_launcher_variables(mp)
        mp.chdir(tmp)
        arguments = ["plan.json", *TRAINING, "--checkpoint-every", EVERY]
        arguments += ["--checkpoint-dir", "reference", "--metrics", "reference.jsonl"]
        assert main([str(a) for a in arguments]) == 0
    expected = losses(tmp / "reference.jsonl")
    assert [step for step, _ in expected] == list(range(1, STEPS + 1))
    assert all(np.isfinite(loss) for _, loss in expected)
    return tmp, expected


@pytest.mark.slow
def test_a_rank_killed_mid_step_restarts_from_the_checkpoint_and_matches(job):
    """Rank 1 (not rank 0, which writes the metrics and publishes checkpoints: its lines
    of the steps after the checkpoint must go) dies by SIGKILL at step 5, after its backward
    and before the optimizer step, while rank 0 waits in the gradient norm's all-reduce.
    torchrun restarts both; the same command line resumes from step 3."""
    tmp, expected = job
    done = torchrun(tmp, "killed", restarts=1, fault="kill:step=5:where=backward:rank=1")
    assert done.returncode == 0, done.stderr
    assert "exitcode: -9" in done.stderr  # the kill happened: SIGKILL
    out = done.stdout.splitlines()
    # The first attempt started afresh (--resume without a checkpoint) and logged step 4,
    # which the checkpoint of step 3 does not hold; the second resumed from 3 and redid it.
    assert out.count("no checkpoint in killed yet: starting at step 0") == 1
    assert out.count("resuming from the checkpoint of step 3 in killed") == 1
    assert sum(line.startswith("step 4/6 ") for line in out) == 2
    assert losses(tmp / "killed.jsonl") == expected  # every step once, the same losses


@pytest.mark.slow
def test_a_rank_killed_during_a_checkpoint_write_leaves_the_previous_one(job):
    """Rank 0 dies after writing its share of the checkpoint of step 6, before publishing
    it. The checkpoint of step 3 is still the latest and loads; the rerun resumes from it."""
    tmp, expected = job
    failed = torchrun(tmp, "write", restarts=0, fault="kill:step=6:where=checkpoint:rank=0")
    assert failed.returncode != 0 and "exitcode: -9" in failed.stderr
    directory = tmp / "write"
    assert (directory / "step_6.tmp").is_dir() and not (directory / "step_6").exists()
    assert checkpoint.latest(directory) == 3
    progress = Progress()
    checkpoint.load(directory, 3, {"progress": progress})  # verifies the manifest first
    assert progress.step == 3

    done = torchrun(tmp, "write", restarts=0)
    assert done.returncode == 0, done.stderr
    assert "resuming from the checkpoint of step 3 in write" in done.stdout.splitlines()
    assert losses(tmp / "write.jsonl") == expected
    assert checkpoint.latest(directory) == 6 and not (directory / "step_6.tmp").exists()


def corrupt_copy(job, tmp_path, change) -> str:
    """A copy of the reference's checkpoints, as if stopped after step 3, with `change`
    applied to rank 1's file of step 3; returns the directory."""
    directory = tmp_path / "ck"
    shutil.copytree(job[0] / "reference", directory)
    shutil.rmtree(directory / "step_6")
    change(directory / "step_3" / "__1_0.distcp")
    return str(directory)


def truncate(path):
    path.write_bytes(path.read_bytes()[:1000])


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(data)


CORRUPTIONS = {  # name -> (change, the problem named after "is corrupt: ")
    "truncated": (truncate, "__1_0.distcp holds 1000 bytes, the manifest "),
    "deleted": (lambda path: path.unlink(), "__1_0.distcp is missing"),
    "a flipped byte": (flip_a_byte, "__1_0.distcp differs from the manifest's sha256"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_a_corrupt_checkpoint_is_one_line_and_exit_2(job, tmp_path, name, monkeypatch, capsys):
    """A size change or a missing file is refused before any process starts; a changed
    byte (same size) by the ranks, which hash a share of the files each and agree."""
    change, problem = CORRUPTIONS[name]
    directory = corrupt_copy(job, tmp_path, change)
    without_launcher_variables(monkeypatch)
    status = main([str(job[0] / "plan.json"), *map(str, TRAINING), "--resume",
                   "--checkpoint-dir", directory])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: checkpoint: step_3 in {directory!r} is corrupt: {problem}")
    assert err.rstrip().endswith(f"delete {directory}/step_3 to start afresh")


def policy_worker(rank: int, world_size: int, plan):
    """Steps under each policy: one normal, a NaN loss skipped, a NaN gradient skipped,
    a NaN loss stopped; the state around each."""
    from tera.runtime.mesh import Meshes
    from tera.runtime.trainer import Trainer

    meshes = Meshes.from_plan(plan)
    trainer = Trainer(plan, meshes, lr=1e-2, warmup_steps=2, total_steps=6)
    rows = plan.global_batch // meshes.dp_size

    def batch(step):
        return tiny_batch(step, plan)[meshes.dp_rank * rows :][:rows]

    def state():
        optim = {
            (id(p), key): value.clone()
            for p, values in trainer.optimizer.state.items()
            for key, value in values.items()
        }
        lr = trainer.optimizer.param_groups[0]["lr"]
        return trainer.full_state_dict(), optim, trainer.step, lr

    def same(a, b) -> bool:
        params_equal = all((a[0][k] == b[0][k]).all() for k in a[0])
        optim_equal = a[1].keys() == b[1].keys() and all((a[1][k] == b[1][k]).all() for k in a[1])
        return bool(params_equal and optim_equal and a[2:] == b[2:])

    results = {"normal": train_step(trainer, batch(1), 1, "skip")}
    before = state()
    os.environ[faults.VARIABLE] = "nan:step=2"
    results["nan loss"] = train_step(trainer, batch(2), 2, "skip")
    results["unchanged after nan loss"] = same(before, state())
    # A finite loss with a non-finite gradient (a backward overflow): the norm tells.
    param = next(trainer.model.parameters())
    hook = param.register_hook(lambda grad: grad * float("nan"))
    results["nan gradient"] = train_step(trainer, batch(3), 3, "skip")
    hook.remove()
    results["unchanged after nan gradient"] = same(before, state())
    results["gradients cleared"] = all(p.grad is None for p in trainer.model.parameters())
    os.environ[faults.VARIABLE] = "inf:step=4"
    try:
        train_step(trainer, batch(4), 4, "stop")
    except NonFiniteLoss as exc:
        results["stopped"] = (exc.step, str(exc))
    results["unchanged after stop"] = same(before, state())
    train_step(trainer, batch(5), 5, "stop")
    results["applied after"] = not same(before, state())
    dist.barrier()
    return results


def test_nonfinite_steps_are_skipped_or_stopped_alike_on_every_rank():
    # zero=0: plain parameters, on which a gradient hook acts (FSDP2 sets sharded gradients)
    for rank, r in enumerate(run_world(policy_worker, 2, tiny_plan("ep=2,zero=0", 2))):
        assert r["normal"][2] is False and np.isfinite(r["normal"][0]), rank
        loss, grad_norm, skipped = r["nan loss"]
        assert np.isnan(loss) and np.isfinite(grad_norm) and skipped
        loss, grad_norm, skipped = r["nan gradient"]
        assert np.isfinite(loss) and np.isnan(grad_norm) and skipped
        assert r["unchanged after nan loss"] and r["unchanged after nan gradient"]
        assert r["gradients cleared"] and r["unchanged after stop"] and r["applied after"]
        step, message = r["stopped"]
        assert step == 4 and message.startswith("step 4: non-finite training (loss inf")


def tera_run_process(tmp, name: str, fault: str, policy: str) -> subprocess.Popen:
    """`tera-run` of 3 steps as a process (its workers see the fault hook's variable)."""
    arguments = ["plan.json", "--steps", 3, *SCHEDULE, "--on-nonfinite", policy]
    arguments += ["--metrics", f"{name}.jsonl", "--checkpoint-dir", name, "--checkpoint-every", 1]
    return subprocess.Popen(
        [sys.executable, "-m", "tera.runtime.cli", *map(str, arguments)],
        cwd=tmp,
        env=environment(fault),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_nonfinite_loss_policies_end_to_end(job):
    """`--on-nonfinite stop` (the default) exits 1 with one line naming the step and
    checkpoints nothing of it; `skip` logs the step as skipped and trains on. The two runs
    overlap."""
    tmp, expected = job
    stop = tera_run_process(tmp, "stop", "nan:step=2", "stop")
    skip = tera_run_process(tmp, "skip", "inf:step=2", "skip")
    out, err = stop.communicate(timeout=300)
    assert stop.returncode == 1, err
    (line,) = err.splitlines()
    assert line.startswith("error: step 2: non-finite training (loss nan, gradient norm ")
    assert line.endswith("(--on-nonfinite stop): resume from the latest checkpoint with a "
                         "lower --lr, or pass --on-nonfinite skip to skip such steps")  # fmt: skip
    assert losses(tmp / "stop.jsonl") == expected[:1]
    assert checkpoint.latest(tmp / "stop") == 1

    out, err = skip.communicate(timeout=300)
    assert skip.returncode == 0, err
    lines = metrics_lines(tmp / "skip.jsonl")
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert [line["skipped"] for line in lines] == [False, True, False]
    assert lines[1]["loss"] is None  # inf, written as null
    assert (lines[0]["step"], lines[0]["loss"]) == expected[0]  # before any update: the same
    assert np.isfinite(lines[2]["loss"])
    assert lines[2]["lr"] == lines[1]["lr"]  # the schedule did not advance on the skip
    assert "step 2/3 loss inf" in out and "(non-finite: skipped)" in out


UNWRITABLE = {  # name -> (--checkpoint-dir under tmp, what the one line says)
    "a file in its place": ("file", "is a file, not a directory"),
    "a file on its path": ("file/ck", "is a file, not a directory"),
    "a read-only directory": ("read-only/ck", "this user cannot write into"),
}


@pytest.mark.parametrize("name", UNWRITABLE)
def test_an_unwritable_checkpoint_directory_is_refused_before_training(
    tmp_path, name, monkeypatch, capsys
):
    if name == "a read-only directory" and os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    (tmp_path / "file").write_text("")
    (tmp_path / "read-only").mkdir(mode=0o555)
    make_plan(tmp_path / "plan.json", "ep=2", gpus=2)
    monkeypatch.chdir(tmp_path)
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)

    def no_world(*args, **kwargs):
        raise AssertionError("a world started")

    monkeypatch.setattr("tera.runtime.launch.launch_local", no_world)
    directory, problem = UNWRITABLE[name]
    status = main(["plan.json", "--resume", "--checkpoint-dir", directory])
    err = capsys.readouterr().err
    assert status == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: --checkpoint-dir: {directory!r} cannot be written: ")
    assert problem in err and not dist.is_initialized()


def test_resume_without_a_checkpoint_starts_at_step_0(tmp_path):
    """One command line serves every attempt of a restarted job, the first included."""
    options = RunOptions(steps=4, resume=True, checkpoint_dir=str(tmp_path / "absent"))
    assert check_resume(tiny_plan("ep=2", 2), options) == 0


def test_an_unknown_policy_is_refused_through_the_python_api():
    with pytest.raises(RunError) as info:
        check_options(tiny_plan("ep=2", 2), RunOptions(on_nonfinite="ignore"))
    assert str(info.value) == "--on-nonfinite: unknown policy 'ignore'; use one of stop, skip"


def test_the_fault_hook_is_inert_unless_armed_in_a_first_attempt(monkeypatch):
    monkeypatch.delenv(faults.VARIABLE, raising=False)
    assert faults.loss(2, 1.5) == 1.5
    faults.kill_point("backward", 2)  # unarmed: returns
    monkeypatch.setenv(faults.VARIABLE, "nan:step=2")
    assert np.isnan(faults.loss(2, 1.5)) and faults.loss(3, 1.5) == 1.5
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # a restarted attempt
    assert faults.loss(2, 1.5) == 1.5
    assert faults.parse("kill:step=5:where=backward:rank=1") == faults.Fault(
        "kill", 5, "backward", 1
    )
    for bad in ("kill:step=5", "nan:where=backward", "boom:step=1", "nan:step=1:when=now"):
        with pytest.raises(ValueError, match=faults.VARIABLE):
            faults.parse(bad)
