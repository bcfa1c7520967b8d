"""`tera-run`: train a plan on torch.distributed.

    tera-run plan.json [--steps N] [--seed S] [--data synthetic|PATH] [--checkpoint-dir D]
                       [--checkpoint-every K] [--resume] [--metrics out.jsonl] [--lr LR]
                       [--warmup-steps W] [--on-nonfinite stop|skip]

A thin layer over tera.runtime.launch (start or join the world) and tera.runtime.run (the
loop). Every input is checked before a process group starts: the plan (Plan.load), the
world size, the options (a checkpoint directory or metrics file that cannot be written
included), the data file and the checkpoint to resume (tera.runtime.run.check_options).
Exit status: 0 success; 2 bad input, as one line "error: <field>: <problem>; <fix>" and no
traceback (printed once: by the launcher, or by rank 0 of a torchrun/srun world), a
checkpoint whose files do not match its manifest included; 1 training failed: a rank
crashed (its traceback is above), or, under `--on-nonfinite stop`, a step's loss or
gradient norm was NaN or infinite (one line "error: step N: non-finite training ...",
nothing of that step applied). torch is imported after the plan and the world are
checked, so those refusals are quick.

Restarts: `--resume` starts at step 0 when the checkpoint directory holds no checkpoint
yet, so the same command line serves every attempt of a torchrun job with restarts:

    torchrun --standalone --nproc-per-node 2 --max-restarts 3 -m tera.runtime.cli \
        plan.json --steps N --checkpoint-dir D --checkpoint-every K --resume --metrics m.jsonl

A restarted attempt resumes from the latest complete checkpoint, and the metrics file
keeps each step once (tera.runtime.run).
"""

from __future__ import annotations

import argparse
import sys


class RankInputError(ValueError):
    """A bad input that only a rank could find; the message is the rank's one line."""


class TrainingStopped(RuntimeError):
    """The run stopped at a non-finite step (exit 1); the message is the rank's one line."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake in one line with exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _parsed(kind, text: str, ok, want: str):
    """`text` as a `kind` for which ok(value) holds, else an argparse error naming `want`."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _parsed(int, text, lambda v: v >= 1, "a positive integer")


def _non_negative_int(text: str) -> int:
    return _parsed(int, text, lambda v: v >= 0, "an integer >= 0")


def _seed(text: str) -> int:
    # numpy's legacy generator, which the runtime seeds, takes 32-bit seeds
    return _parsed(int, text, lambda v: 0 <= v < 2**32, "an integer in 0 .. 2^32-1")


def _positive_float(text: str) -> float:
    return _parsed(float, text, lambda v: 0 < v < float("inf"), "a positive number")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tera-run", description="Train the model of a plan with its layout.")
    p.add_argument("plan", help="plan.json written by tera-plan search -o")
    p.add_argument(
        "--steps", type=_positive_int, default=10, metavar="N",
        help="last step of the run, resumed or not (default 10)",
    )  # fmt: skip
    p.add_argument("--seed", type=_seed, default=0, metavar="S", help="(default 0)")
    p.add_argument(
        "--data", default="synthetic", metavar="synthetic|PATH",
        help="the synthetic stream (default) or a .bin token file",
    )  # fmt: skip
    p.add_argument("--checkpoint-dir", metavar="D", help="directory of the run's checkpoints")
    p.add_argument("--checkpoint-every", type=_positive_int, metavar="K", help="save every K steps")
    p.add_argument(
        "--resume", action="store_true",
        help="continue from the latest checkpoint in --checkpoint-dir; start at step 0 if it "
        "holds none yet (so one command line serves every attempt of a restarted job)",
    )  # fmt: skip
    p.add_argument("--metrics", metavar="PATH", help="write one JSON line per step (.jsonl)")
    p.add_argument(
        "--lr", type=_positive_float, default=3e-4, metavar="LR",
        help="peak learning rate (default 3e-4)",
    )  # fmt: skip
    p.add_argument(
        "--warmup-steps", type=_non_negative_int, default=10, metavar="W",
        help="linear warm-up steps before the cosine decay (default 10)",
    )  # fmt: skip
    p.add_argument(
        "--on-nonfinite", choices=("stop", "skip"), default="stop",
        help="a step with a NaN or infinite loss or gradient norm: stop the run before "
        "applying it (exit 1, naming the step; default) or skip its update and go on "
        "(logged with skipped: true)",
    )  # fmt: skip
    return p


def _input_errors() -> tuple[type[Exception], ...]:
    from tera.planner.errors import InputError

    return InputError, RankInputError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    reporting = True  # whether this process prints errors: one process per world does
    try:
        from tera.runtime import launch

        world = launch.joined_world()
        reporting = world is None or world.rank == 0
        return _main(args, world)
    except _input_errors() as err:
        if reporting:
            print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as err:
        if reporting:
            print(f"error: {err}", file=sys.stderr)
        return 1
    except Exception:  # a bug: say so, with the traceback a report needs
        import traceback

        traceback.print_exc()
        print("internal error: this is a bug in tera; please report it", file=sys.stderr)
        return 1


def _main(args, world) -> int:
    from tera.planner.plan import Plan
    from tera.runtime import launch

    plan = Plan.load(args.plan)
    if world is not None:
        if world.launcher == "srun":
            launch.adopt_slurm()
        launch.check_joined(plan.world_size, world)
        launch.check_local_rank(world, launch.local_gpus())
    from tera.runtime.run import RunOptions, check_options, worker

    options = RunOptions(
        steps=args.steps,
        seed=args.seed,
        data=args.data,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        metrics=args.metrics,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        on_nonfinite=args.on_nonfinite,
    )
    check_options(plan, options)
    if world is None:
        results = _launch_local(plan.world_size, args.plan, options, launch.local_gpus())
        if results is None:
            return 1
    else:
        results = {world.rank: worker(args.plan, options)}
    for kind, exception in (("error", RankInputError), ("stopped", TrainingStopped)):
        messages = [result[kind] for _, result in sorted(results.items()) if kind in result]
        if messages:
            raise exception(messages[0])
    return 0


def _launch_local(world_size: int, plan_path: str, options, gpus: int) -> dict | None:
    """{rank: worker result} of a local world, or None when a rank failed (reported)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from tera.runtime import launch
    from tera.runtime.run import worker

    try:
        return launch.launch_local(world_size, worker, plan_path, options, gpus=gpus)
    except ChildFailedError as exc:
        rank, failure = min(exc.failures.items())
        print(
            f"error: rank {rank} failed with exit code {failure.exitcode}; its traceback is above",
            file=sys.stderr,
        )
        return None


if __name__ == "__main__":
    sys.exit(main())
