"""`tera-plan`: a thin command line over tera.planner's Python API.

Exit status: 0 success; 2 bad input (one line naming the field and the fix, no traceback);
3 infeasible: the inputs are valid but admit no layout (one line saying what would make
one fit); 1 an internal error, a bug in tera: the only case that prints a traceback.
Heavy imports (torch, networkx) happen inside the commands that need them, so
`tera-plan models` starts fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys

GiB = 2**30
# tera.planner.exports.FORMATS (a test keeps them equal), here so --help imports nothing
EXPORT_FORMATS = ("megatron", "torchtitan", "deepspeed", "torchrun", "slurm", "kubernetes")


def _input_errors() -> tuple[type[Exception], ...]:
    from tera.models import SpecError
    from tera.planner.errors import InputError
    from tera.topologies import ClusterError

    return SpecError, ClusterError, InputError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake in one line with exit status 2."""

    needs: dict[str, str] = {}  # dest of a flag -> dest of the flag it needs (see build_parser)

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")

    def parse_known_args(self, args=None, namespace=None):
        namespace, rest = super().parse_known_args(args, namespace)
        for flag, needed in self.needs.items():
            if getattr(namespace, flag, None) is not None and getattr(namespace, needed) is None:
                dashed = f"--{flag.replace('_', '-')}"
                self.error(f"argument {dashed}: needs --{needed.replace('_', '-')}")
        return namespace, rest


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


_TOKEN_SUFFIXES = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def _token_count(text: str) -> float:
    """A token count: a number with an optional K, M, B (or G) or T suffix, e.g. 15T."""
    number, scale = text.strip(), 1.0
    if number[-1:].upper() in _TOKEN_SUFFIXES:
        number, scale = number[:-1], _TOKEN_SUFFIXES[number[-1].upper()]
    try:
        value = float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count like 15T, got {text!r}") from None
    if not 0 < value < math.inf:  # refuses nan and inf too
        raise argparse.ArgumentTypeError(f"expected a positive count, got {text!r}")
    return value


def _number(least: float, strict: bool, want: str):
    """An argparse type: a finite number > `least` (strict) or >= `least`."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > least if strict else value >= least)):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return value

    return parse


_positive_float = _number(0.0, True, "a positive number")
_non_negative_float = _number(0.0, False, "a number >= 0")
_at_least_one = _number(1.0, False, "a number >= 1")  # a ratio over its ideal: imbalance, PUE


def _seq_len(text: str) -> int:
    """A positive integer up to the longest sequence the planner takes."""
    from tera.planner.inputs import MAX_SEQ_LEN

    value = _positive_int(text)
    if value > MAX_SEQ_LEN:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_SEQ_LEN} tokens, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tera-plan", description="Plan the parallel layout of MoE training.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("models", help="list model presets")
    p.add_argument("--json", action="store_true", help="print each preset's model as JSON")
    p = sub.add_parser("clusters", help="list cluster presets")
    p.add_argument("--json", action="store_true", help="print each preset's cluster as JSON")

    p = sub.add_parser("trace", help="trace a model to the Graph IR and summarise it")
    p.add_argument("model", help="preset name or model YAML path")
    p.add_argument("--seq-len", type=_seq_len, default=4096)
    p.add_argument("--json", action="store_true", help="print the graph as node-link JSON")

    p = sub.add_parser("evaluate", help="cost one layout")
    _problem_arguments(p)
    p.add_argument("--layout", required=True, help="e.g. tp=2,pp=4,ep=8,zero=1,mbs=1")

    p = sub.add_parser("search", help="find the fastest layouts, with a certificate")
    _problem_arguments(p)
    p.add_argument("--fix", default="", help="pin keys, e.g. tp=2,ep=8")
    p.add_argument("--top", type=_positive_int, default=3, help="plans to rank (default 3)")
    p.add_argument(
        "--time-limit", type=_positive_float, help="seconds; the best plan so far and its gap"
    )
    p.add_argument(
        "--objective",
        choices=("step_time", "cost", "gpus"),
        default="step_time",
        help="step_time (default); cost: USD per token; gpus: the fewest GPUs (up to --gpus) "
        "that train --tokens within --days",
    )
    p.add_argument("--tokens", type=_token_count, help="tokens to train, e.g. 15T (gpus)")
    p.add_argument("--days", type=_positive_float, help="the deadline in days (gpus)")
    p.add_argument(
        "--price-per-gpu-hour", type=_positive_float, default=2.5, help="USD (default 2.5)"
    )
    p.add_argument(
        "--reserve-gib", type=_non_negative_float, default=0.0, help="HBM kept free per GPU"
    )
    p.add_argument("-o", "--output", help="write the best plan as plan.json")

    p = sub.add_parser("show", help="summarise a plan; --html writes a page with charts")
    p.add_argument("plan", help="plan.json written by tera-plan search -o")
    p.add_argument("--html", metavar="FILE", help="write a self-contained HTML report")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")

    p = sub.add_parser("export", help="write a plan as another stack's config or launch file")
    p.add_argument("plan", help="plan.json written by tera-plan search -o")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="the target")
    p.add_argument("-o", "--output", help="write to FILE instead of standard output")
    p = sub.add_parser("estimate", help="days, GPU-hours, cost, energy and goodput of a run")
    p.add_argument("model", nargs="?", help="preset name or model YAML path (not with --table)")
    p.add_argument("--tokens", type=_token_count, required=True, help="tokens to train, e.g. 15T")
    p.add_argument("--cluster", required=True, help="preset name or cluster YAML path")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--gpus", type=_positive_int, help="train on N GPUs")
    size.add_argument("--days", type=_positive_float, help="the fewest GPUs for this deadline")
    p.add_argument("--max-gpus", type=_positive_int, help="with --days: the most GPUs to try")
    p.needs = {"max_gpus": "days"}
    p.add_argument("--layout", help="cost this layout (default: search the fastest)")
    p.add_argument("--global-batch", type=_positive_int, required=True, help="sequences per step")
    p.add_argument("--seq-len", type=_seq_len, required=True)
    p.add_argument("--precision", choices=("bf16", "fp8", "fp32"), default="bf16")
    p.add_argument("--price-per-gpu-hour", type=_positive_float, help="USD (default 2.5, sourced)")
    p.add_argument("--pue", type=_at_least_one, help="default 1.56 (Uptime 2024 average)")
    p.add_argument(
        "--grid-gco2-per-kwh", type=_non_negative_float, help="grid intensity; no default, no CO2"
    )
    p.add_argument("--restart-minutes", type=_non_negative_float, help="restart time (default 10)")
    p.add_argument("--checkpoint-gbps-per-node", type=_positive_float, help="default 40")
    p.add_argument("--gpu-hours-per-interruption", type=_positive_float, help="default 50700")
    p.add_argument("--node-power-kw", type=_positive_float, help="node max power")
    p.add_argument("--time-limit", type=_positive_float, default=20.0, help="search seconds")
    p.add_argument("--table", action="store_true", help="10B, 100B dense and 1T MoE table")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _problem_arguments(p: argparse.ArgumentParser) -> None:
    """The model, cluster, batch and precision that `evaluate` and `search` both take."""
    p.add_argument("model", help="preset name or model YAML path")
    p.add_argument("--cluster", required=True, help="preset name or cluster YAML path")
    p.add_argument("--gpus", type=_positive_int, help="size the cluster to N GPUs")
    p.add_argument("--global-batch", type=_positive_int, required=True, help="sequences per step")
    p.add_argument("--seq-len", type=_seq_len, required=True)
    p.add_argument("--precision", choices=("bf16", "fp8", "fp32"), default="bf16")
    p.add_argument(
        "--imbalance",
        type=_at_least_one,
        default=1.0,
        help="busiest expert's load over the mean (1.0: balanced routing)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = {
        "models": _models,
        "clusters": _clusters,
        "trace": _trace,
        "evaluate": _evaluate,
        "search": _search,
        "export": _export,
        "estimate": _estimate,
        "show": _show,
    }
    from tera.planner.errors import InfeasibleError

    try:
        return command[args.command](args)
    except _input_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except InfeasibleError as err:
        print(f"infeasible: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:  # a bug: say so, with the traceback a report needs
        import traceback

        traceback.print_exc()
        print("internal error: this is a bug in tera; please report it", file=sys.stderr)
        return 1


def _interactive(args) -> bool:
    """Whether to draw progress: a person watches standard error, and no --json."""
    return not getattr(args, "json", False) and sys.stderr.isatty()


@contextlib.contextmanager
def _progress(enabled: bool):
    """A search.Progress callback that draws one transient bar on standard error while
    the work runs (so standard output stays clean for --json and pipes); plans entering
    the top K are printed above the bar. A no-op when not enabled."""
    if not enabled:
        yield lambda message, fraction=None: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from tera.planner.solve.search import PLAN_FOUND

    bar = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = bar.add_task("starting", total=None)

    def update(message: str, fraction: float | None = None) -> None:
        if message.startswith(PLAN_FOUND):
            bar.console.print(f"  {message}", highlight=False)
            return
        total = None if fraction is None else 1.0
        bar.update(task, description=message, total=total, completed=fraction or 0.0)

    with bar:
        yield update


def _console():
    from rich.console import Console

    # Piped output (files, tests, CI logs) gets a width that does not truncate names.
    return Console(width=None if sys.stdout.isatty() else 160)


def _table(title: str, columns: list[str]):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right", no_wrap=i == 0)
    return table


def _models(args) -> int:
    import yaml

    from tera.models.spec import PRESET_DIR, preset_names

    if args.json:
        from tera.models import load_spec

        print(json.dumps({name: load_spec(name).to_dict() for name in preset_names()}, indent=2))
        return 0
    table = _table(
        "model presets",
        ["name", "layers", "hidden", "attention", "experts", "top-k", "params (B)", "active (B)"],
    )
    for name in preset_names():
        data = yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text())
        moe = data.get("moe") or {}
        published = data.get("published") or {}
        table.add_row(
            name,
            str(data["layers"]),
            str(data["hidden"]),
            data["attention"]["kind"],
            str(moe.get("experts", "-")),
            str(moe.get("top_k", "-")),
            str(published.get("params_total_b", "-")),
            str(published.get("params_active_b", "-")),
        )
    _console().print(table)
    print("params: published figures; `tera-plan trace MODEL` counts them from the model.")
    return 0


def _clusters(args) -> int:
    from tera.topologies import load, preset_names

    if args.json:
        print(json.dumps({name: load(name).to_dict() for name in preset_names()}, indent=2))
        return 0
    for name in preset_names():
        print(load(name).describe())
    return 0


def _trace(args) -> int:
    from tera.models import load_spec
    from tera.planner.inputs import check_traceable
    from tera.planner.trace import trace

    spec = load_spec(args.model)
    check_traceable(spec)
    with _progress(_interactive(args)) as progress:
        progress(f"tracing {spec.name} at {args.seq_len} tokens", None)
        graph = trace(spec, args.seq_len)
    if args.json:
        import networkx as nx

        print(json.dumps(nx.node_link_data(graph, edges="edges"), default=str))
        return 0
    tokens = args.seq_len
    kinds: dict[str, dict[str, float]] = {}
    for _, node in graph.nodes(data=True):
        row = kinds.setdefault(node["kind"], dict(nodes=0, fwd=0, bwd=0, params=0, saved=0))
        row["nodes"] += 1
        row["fwd"] += node["fwd_flops"]
        row["bwd"] += node["bwd_flops"]
        row["params"] += node["params"]
        row["saved"] += node["saved_bytes"]
    table = _table(
        f"{spec.name}: {graph.number_of_nodes()} operators, {graph.number_of_edges()} edges, "
        f"one sequence of {tokens} tokens (bf16)",
        ["kind", "nodes", "fwd GFLOP/token", "bwd GFLOP/token", "params (M)", "saved (MiB)"],
    )
    for kind, row in sorted(kinds.items(), key=lambda kv: -kv[1]["fwd"]):
        table.add_row(
            kind,
            str(row["nodes"]),
            f"{row['fwd'] / tokens / 1e9:.3f}",
            f"{row['bwd'] / tokens / 1e9:.3f}",
            f"{row['params'] / 1e6:,.1f}",
            f"{row['saved'] / 2**20:,.1f}",
        )
    total = {k: sum(r[k] for r in kinds.values()) for k in ("fwd", "bwd", "params", "saved")}
    table.add_row(
        "total",
        str(graph.number_of_nodes()),
        f"{total['fwd'] / tokens / 1e9:.3f}",
        f"{total['bwd'] / tokens / 1e9:.3f}",
        f"{total['params'] / 1e6:,.1f}",
        f"{total['saved'] / 2**20:,.1f}",
    )
    _console().print(table)
    return 0


def _evaluate(args) -> int:
    from tera.planner import evaluate

    estimate = evaluate(
        args.model,
        args.cluster,
        args.layout,
        args.global_batch,
        args.seq_len,
        gpus=args.gpus,
        precision=args.precision,
        imbalance=args.imbalance,
    )
    if args.json:
        print(json.dumps(estimate.to_dict(), indent=2))
        return 0
    e = estimate
    console = _console()
    console.print(
        f"[bold]{e.model}[/] on {e.cluster}, {e.gpus} GPUs, {e.precision}, "
        f"global batch {e.global_batch} x {e.seq_len} tokens, {e.microbatches} micro-batches"
    )
    console.print(f"layout: {e.layout}")
    summary = _table("prediction", ["metric", "value"])
    summary.add_row("step time", f"{e.step_time_s:.3f} s")
    summary.add_row("tokens/s per GPU", f"{e.tokens_per_s_per_gpu:,.0f}")
    summary.add_row("model TFLOP/s per GPU", f"{e.model_tflops_per_gpu:.1f}")
    summary.add_row("MFU (of dense BF16 peak)", f"{e.mfu:.1%}")
    fits = "fits" if e.fits else "DOES NOT FIT"
    summary.add_row(
        "peak memory per GPU", f"{e.peak_memory_gib:.1f} GiB of {e.hbm_gib:.1f} ({fits})"
    )
    console.print(summary)
    times = _table("step time breakdown (slowest stage, seconds per step)", ["part", "s", "share"])
    for part, seconds in e.breakdown_s.items():
        times.add_row(part, f"{seconds:.3f}", f"{seconds / e.step_time_s:.1%}")
    console.print(times)
    memory = _table("memory on the fullest stage (GiB)", ["part", "GiB"])
    for part, gib in e.memory_gib.items():
        memory.add_row(part, f"{gib:.2f}")
    console.print(memory)
    return 0


def _search(args) -> int:
    from tera.planner.solve import search

    if args.objective == "gpus" and (args.tokens is None or args.days is None):
        print("error: --objective gpus needs --tokens and --days (the deadline)", file=sys.stderr)
        return 2
    console = _console()
    with _progress(_interactive(args)) as progress:
        progress(f"tracing {args.model}", None)
        result = search(
            args.model,
            args.cluster,
            args.global_batch,
            args.seq_len,
            gpus=args.gpus,
            precision=args.precision,
            fix=args.fix,
            top=args.top,
            time_limit=args.time_limit,
            objective=args.objective,
            price_per_gpu_hour=args.price_per_gpu_hour,
            reserve_gib=args.reserve_gib,
            imbalance=args.imbalance,
            progress=progress,
            tokens=args.tokens,
            deadline_days=args.days,
        )
    if args.output:
        result.to_plan().save(args.output)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    c = result.certificate
    unit = {"step_time": "s/step", "cost": "USD per million tokens", "gpus": "GPUs"}[
        c.objective_kind
    ]
    console.print(
        f"[bold]{c.status}[/] objective {c.objective:.4g} {unit}, bound {c.bound:.4g}, "
        f"gap {c.gap:.2%}, {c.seconds:.1f} s; {result.space_size} configurations, "
        f"{result.solved} solved by CP-SAT, the rest bounded out",
        highlight=False,
    )
    table = _table(
        "top plans",
        ["#", "GPUs", "layout", "step s", "MFU", "tokens/s/GPU", "peak GiB", "vs #1"]
        + ["largest parts"],
    )
    first = result.best.estimate.step_time_s
    for plan in result.plans:
        e = plan.estimate
        parts = sorted(e.breakdown_s.items(), key=lambda kv: -kv[1])[:3]
        table.add_row(
            str(plan.rank),
            str(plan.config.gpus),
            plan.layout.brief(),
            f"{e.step_time_s:.4g}",
            f"{e.mfu:.1%}",
            f"{e.tokens_per_s_per_gpu:,.0f}",
            f"{e.peak_memory_gib:.1f}",
            f"+{e.step_time_s / first - 1:.1%}",
            ", ".join(f"{k} {v:.3g}" for k, v in parts),
        )
    console.print(table)
    if args.output:
        console.print(f"wrote {args.output}")
    return 0


def _export(args) -> int:
    from pathlib import Path

    from tera.planner.exports import export
    from tera.planner.plan import Plan

    text = export(Plan.load(args.plan), args.format, plan_path=args.plan)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _show(args) -> int:
    """`tera-plan show`: the plan's summary as text (or --json), and --html the page."""
    from pathlib import Path

    from tera.planner import report
    from tera.planner.errors import InputError
    from tera.planner.plan import Plan

    plan = Plan.load(args.plan)
    if args.html:
        page = report.render_html(plan)
        try:
            Path(args.html).write_text(page, encoding="utf-8")
        except OSError as exc:
            raise InputError(
                "html", f"cannot write {args.html!r} ({exc.strerror})", "give a writable path"
            ) from exc
    if args.json:
        print(json.dumps(report.summary(plan), indent=2))
        return 0
    console = _console()
    report.print_summary(plan, console)
    if args.html:
        console.print(f"wrote {args.html} ({len(page.encode()) / 2**10:,.0f} KiB)")
    return 0


def _estimate(args) -> int:
    """`tera-plan estimate`: see tera.planner.capacity for the model and its sources."""
    import dataclasses

    from tera.planner import capacity

    if args.table == (args.model is not None):
        print("error: give MODEL or --table, not both and not neither", file=sys.stderr)
        return 2
    if args.table and args.layout:
        print("error: --table searches each model's layout; drop --layout", file=sys.stderr)
        return 2
    given = {
        "price_per_gpu_hour": args.price_per_gpu_hour,
        "pue": args.pue,
        "grid_gco2_per_kwh": args.grid_gco2_per_kwh,
        "restart_minutes": args.restart_minutes,
        "checkpoint_gbps_per_node": args.checkpoint_gbps_per_node,
        "gpu_hours_per_interruption": args.gpu_hours_per_interruption,
        "node_power_kw": args.node_power_kw,
    }
    assumptions = capacity.Assumptions(**{k: v for k, v in given.items() if v is not None})
    console = _console()
    models = list(capacity.TABLE_MODELS) if args.table else [args.model]
    results = []
    with _progress(_interactive(args)) as progress:
        for i, model in enumerate(models):
            name = f"{model} ({i + 1}/{len(models)})" if args.table else model

            def step(message: str, fraction: float | None = None, i=i, name=name) -> None:
                # a sweep shows how many models are done; one model shows its search
                shown = i / len(models) if args.table else fraction
                progress(f"{name}: {message}", shown)

            step("tracing", None)
            results.append(
                capacity.estimate(
                    capacity.table_spec(model) if args.table else model,
                    args.cluster,
                    args.tokens,
                    args.global_batch,
                    args.seq_len,
                    gpus=args.gpus if args.days is None else args.max_gpus,
                    days=args.days,
                    layout=args.layout,
                    precision=args.precision,
                    assumptions=assumptions,
                    time_limit=args.time_limit,
                    progress=step,
                )
            )
    if args.json:
        rows = [r.to_dict() for r in results]
        print(json.dumps({"table": rows} if args.table else rows[0], indent=2))
        return 0
    if args.table:
        table = _table(
            f"planning table: {args.tokens / 1e12:g}T tokens on {args.cluster}, "
            f"{args.global_batch} x {args.seq_len} tokens per step",
            ["model", "GPUs", "layout", "MFU", "GiB/GPU", "ideal days", "goodput", "days"]
            + ["GPU-hours", "cost $M", "MWh", "t CO2"],
        )
        for r in results:
            d = r.to_dict()
            table.add_row(
                r.model,
                str(r.gpus),
                r.layout,
                f"{r.mfu:.1%}",
                f"{r.peak_memory_gib:.1f}",
                f"{d['ideal_days']:.1f}",
                f"{r.goodput.fraction:.1%}",
                f"{d['effective_days']:.1f}",
                f"{r.gpu_hours:,.0f}",
                f"{r.cost_usd / 1e6:,.2f}",
                f"{r.energy_mwh:,.0f}",
                "-" if r.co2_t is None else f"{r.co2_t:,.0f}",
            )
        console.print(table)
        return 0
    r, d = results[0], results[0].to_dict()
    g, a = r.goodput, dataclasses.asdict(r.assumptions)
    console.print(
        f"[bold]{r.model}[/] on {r.cluster}, {r.gpus} GPUs, {r.tokens / 1e12:g}T tokens; "
        f"layout {r.layout}" + ("" if r.fits else " (DOES NOT FIT in memory)"),
        highlight=False,
    )
    t = _table("estimate", ["metric", "value"])
    t.add_row("step time", f"{r.step_time_s:.3f} s (MFU {r.mfu:.1%})")
    t.add_row("tokens/s", f"{r.tokens_per_s:,.0f}")
    t.add_row("ideal time", f"{d['ideal_days']:.1f} days")
    t.add_row(
        "goodput",
        f"{g.fraction:.1%}: MTBF {g.mtbf_s / 3600:.2f} h, checkpoint {g.checkpoint_s:.1f} s "
        f"every {g.interval_s / 60:.1f} min, restart {g.restart_s / 60:.0f} min",
    )
    t.add_row("effective time", f"{d['effective_days']:.1f} days")
    t.add_row("GPU-hours", f"{r.gpu_hours:,.0f}")
    t.add_row("cost", f"${r.cost_usd:,.0f} at ${a['price_per_gpu_hour']:g}/GPU-hour")
    t.add_row(
        "power per GPU",
        f"{r.wall_w_per_gpu:,.0f} W = ({r.gpu_w:,.0f} GPU + {r.overhead_w:,.0f} node) x PUE "
        f"{a['pue']:g}",
    )
    t.add_row("energy", f"{r.energy_mwh:,.0f} MWh")
    co2 = "- (give --grid-gco2-per-kwh)" if r.co2_t is None else f"{r.co2_t:,.0f} t CO2"
    t.add_row("CO2", co2)
    console.print(t)
    console.print("sources: " + "; ".join(f"{k}: {v}" for k, v in r.sources.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
