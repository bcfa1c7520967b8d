"""Cost-model fidelity on published training runs (issue 3). A benchmark, not a test.

Evaluates every usable point of ../shared/reference/published-runs.yaml with its own
layout, batch, sequence length and precision (bench/published.py says how each point
becomes tera inputs) and compares tera's tokens/s per GPU with the measured figure.

  python bench/fidelity.py          evaluate with planner/cost/calibration.yaml, print the
                                    table and summary, write bench/results/fidelity.md
  python bench/fidelity.py --fit    first refit the calibration on the verified points and
                                    write planner/cost/calibration.yaml

The summary gives the median and 90th-percentile absolute error per source group and over
all verified points; Kendall's tau between predicted and measured throughput inside every
group holding several layouts of one model on one cluster; the number of published layouts
predicted not to fit; and the leave-one-family-out error: for each family of sources
(all Megatron-Bridge releases are one family, so a model it saw under another release does
not leak into its own prediction), calibrate on the other families' verified points and
predict this one's. That last figure is the honest one for a model the calibration never saw.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

sys.path.insert(0, str(Path(__file__).parent))

from published import Case, Unusable, cluster_for, load_cases  # noqa: E402

from tera.models import load_spec  # noqa: E402
from tera.planner.cost import CostModel  # noqa: E402
from tera.planner.cost.calibration import CALIBRATION_FILE, Calibration  # noqa: E402
from tera.planner.layout import Layout, LayoutError  # noqa: E402
from tera.planner.trace import trace  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "fidelity.md"
RECOMPUTE_ORDER = ("none", "selective", "full")
GiB = 2**30


@dataclass
class Point:
    case: Case
    cost: CostModel
    measured: float  # tokens/s/GPU
    recompute_note: str  # how the recompute mode was chosen
    fits: bool
    memory_gib: float
    hbm_gib: float

    @property
    def family(self) -> str:
        return family(self.case.group)


def family(group: str) -> str:
    """A source group without its release, table number, GPU or remark."""
    while True:
        shorter = re.sub(r"\s+(\d[\d.]*|Table \d+|H100.*|\(.*\))$", "", group).strip()
        if shorter == group:
            return group
        group = shorter


def build_point(case: Case, prior: Calibration) -> Point | Unusable:
    """Cost model of one case; where the source leaves recompute open, the lightest mode
    whose memory fits is taken, because the run ran."""
    spec = load_spec(case.model)
    cluster = cluster_for(case)
    graph = trace(spec, case.seq_len)
    modes = RECOMPUTE_ORDER if not case.recompute_published else (None,)
    chosen = None
    for mode in modes:
        text = (
            case.layout
            if mode is None
            else re.sub(r"recompute=\w+", f"recompute={mode}", case.layout)
        )
        try:
            layout = Layout.parse(text).resolve(spec, case.gpus, case.global_batch, case.seq_len)
        except LayoutError as error:
            return Unusable(case.id, case.group, f"layout refused: {error}")
        cost = CostModel(
            graph, cluster, layout, case.global_batch, case.precision, calibration=prior
        )
        memories = [cost.stage_memory(s).total for s in cost.stages]
        chosen = (cost, max(memories))
        if max(memories) <= cluster.gpu.hbm_bytes:
            break
    cost, peak = chosen
    note = "published" if case.recompute_published else f"inferred: {cost.layout.recompute}"
    flops_per_token = sum(d["fwd_flops"] + d["bwd_flops"] for _, d in graph.nodes(data=True))
    flops_per_token /= case.seq_len
    measured = case.measured_tokens or case.measured_tflops * 1e12 / flops_per_token
    return Point(
        case,
        cost,
        measured,
        note,
        peak <= cluster.gpu.hbm_bytes,
        peak / GiB,
        cluster.gpu.hbm_bytes / GiB,
    )


def predict(point: Point, cal: Calibration) -> float:
    return point.cost.recalibrated(cal).estimate(point.case.model).tokens_per_s_per_gpu


# -- fitting -------------------------------------------------------------------------------
def fitted_keys(points: list[Point]) -> list[str]:
    """gemm_efficiency entries the points exercise, then the scalars."""
    keys = set()
    for p in points:
        fp8 = p.case.precision == "fp8" and p.cost.gpu.fp8_flops
        keys.add(f"{p.cost.gpu.arch}/{'fp8' if fp8 else 'bf16'}")
    return sorted(keys) + list(Calibration.SCALARS)


def _to_calibration(x: np.ndarray, keys: list[str], fitted_on: tuple[str, ...]) -> Calibration:
    gemm = dict(Calibration.prior().gemm_efficiency)
    values: dict = {}
    for key, raw in zip(keys, x, strict=True):
        if key == "expert_rows_half":
            values[key] = float(math.exp(raw))  # log-parametrised, > 0
        elif key == "attention_scale":
            values[key] = float(math.exp(raw))
        else:
            frac = float(1 / (1 + math.exp(-raw)))  # logistic: a fraction in (0, 1)
            if "/" in key:
                gemm[key] = frac
            else:
                values[key] = frac
    return Calibration(gemm_efficiency=gemm, fitted_on=fitted_on, **values)


def _from_calibration(cal: Calibration, keys: list[str]) -> np.ndarray:
    def logit(f: float) -> float:
        f = min(max(f, 1e-3), 1 - 1e-3)
        return math.log(f / (1 - f))

    out = []
    for key in keys:
        if key in ("expert_rows_half", "attention_scale"):
            out.append(math.log(max(getattr(cal, key), 1.0 if key == "expert_rows_half" else 1e-3)))
        elif "/" in key:
            out.append(logit(cal.gemm_efficiency[key]))
        else:
            out.append(logit(getattr(cal, key)))
    return np.array(out)


def fit(
    points: list[Point], start: Calibration, max_evals: int = 1500, restarts: int = 2
) -> Calibration:
    """Minimise the mean absolute log error of tokens/s over `points` (Nelder-Mead, restarted
    from its own result, which escapes the simplex collapses a single run ends in)."""
    keys = fitted_keys(points)
    groups = tuple(sorted({p.case.group for p in points}))
    logs = np.log([p.measured for p in points])

    def objective(x: np.ndarray) -> float:
        cal = _to_calibration(x, keys, groups)
        pred = np.log([predict(p, cal) for p in points])
        return float(np.mean(np.abs(pred - logs)))

    x = _from_calibration(start, keys)
    for _ in range(restarts + 1):  # a restart rebuilds the simplex around the best point
        x = minimize(objective, x, method="Nelder-Mead", options={"maxfev": max_evals}).x
    return _to_calibration(x, keys, groups)


# -- statistics -----------------------------------------------------------------------------
def kendall_tau(xs: list[float], ys: list[float]) -> float:
    """Kendall's tau-b."""
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(xs)):
        for j in range(i + 1, len(xs)):
            dx, dy = xs[i] - xs[j], ys[i] - ys[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif dx * dy > 0:
                concordant += 1
            else:
                discordant += 1
    denom = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denom if denom else float("nan")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summary_row(name: str, errors: list[float]) -> str:
    abs_err = [abs(e) for e in errors]
    return (
        f"| {name} | {len(errors)} | {statistics.median(abs_err):.1%} | "
        f"{percentile(abs_err, 90):.1%} |"
    )


# -- report -----------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", action="store_true", help="refit calibration.yaml first")
    parser.add_argument("--no-logo", action="store_true", help="skip leave-one-family-out")
    args = parser.parse_args()
    started = time.perf_counter()

    prior = Calibration.prior()
    points: list[Point] = []
    unusable: list[Unusable] = []
    for case in load_cases():
        built = case if isinstance(case, Unusable) else build_point(case, prior)
        (unusable if isinstance(built, Unusable) else points).append(built)
    verified = [p for p in points if p.case.verified]

    if args.fit:
        cal = fit(verified, prior)
        comment = (
            "Fitted by `python bench/fidelity.py --fit` on the verified points of\n"
            "../shared/reference/published-runs.yaml (mean absolute log error of tokens/s/GPU,\n"
            "Nelder-Mead from the prior of calibration.py). Do not edit by hand."
        )
        cal.save(CALIBRATION_FILE, comment)
    cal = Calibration.load()

    errors = {p.case.id: predict(p, cal) / p.measured - 1 for p in points}
    lines = [
        "# Cost-model fidelity on published training runs",
        "",
        "Written by `python bench/fidelity.py` (see its docstring). Error = predicted / "
        "measured tokens/s/GPU - 1.",
        f"Calibration: planner/cost/calibration.yaml, fitted on {len(cal.fitted_on)} groups.",
        "",
    ]
    lines += summary_section(points, verified, errors)
    if not args.no_logo:
        lines += logo_section(verified, cal)
    lines += tau_section(points, errors)
    lines += calibration_section(cal)
    lines += table_section(points, errors)
    lines += ["", "## Points not evaluated", "", "| point | group | reason |", "|---|---|---|"]
    lines += [f"| {u.id} | {u.group} | {u.reason} |" for u in unusable]
    lines += ["", f"Benchmark time: {time.perf_counter() - started:.0f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(text)


def summary_section(points, verified, errors) -> list[str]:
    lines = [
        "## Summary",
        "",
        "| points | n | median abs error | p90 abs error |",
        "|---|---|---|---|",
        summary_row("**all verified**", [errors[p.case.id] for p in verified]),
        summary_row("all (incl. unverified)", [errors[p.case.id] for p in points]),
    ]
    by_group = defaultdict(list)
    for p in verified:
        by_group[p.case.group].append(errors[p.case.id])
    lines += [summary_row(f"verified: {g}", e) for g, e in sorted(by_group.items())]
    not_fit = [p for p in points if not p.fits]
    lines += [
        "",
        f"Published layouts predicted not to fit: {len(not_fit)} of {len(points)}"
        + (": " + ", ".join(p.case.id for p in not_fit) if not_fit else "."),
        "",
    ]
    return lines


def logo_section(verified: list[Point], cal: Calibration) -> list[str]:
    lines = ["## Leave-one-family-out", "", "| family held out | n | median abs error | p90 |"]
    lines.append("|---|---|---|---|")
    all_errors = []
    for fam in sorted({p.family for p in verified}):
        train = [p for p in verified if p.family != fam]
        test = [p for p in verified if p.family == fam]
        held = fit(train, cal, max_evals=300, restarts=0)
        errs = [predict(p, held) / p.measured - 1 for p in test]
        all_errors += errs
        lines.append(summary_row(fam, errs))
    lines.append(summary_row("**all held-out points**", all_errors))
    return lines + [""]


def tau_section(points: list[Point], errors) -> list[str]:
    groups = defaultdict(list)
    for p in points:
        hw = p.case.hardware.preset
        groups[(p.case.group, p.case.model, hw, p.case.seq_len)].append(p)
    lines = [
        "## Ranking of layouts (Kendall's tau, predicted vs measured tokens/s/GPU)",
        "",
        "| group | model | cluster | seq | layouts | verified | tau |",
        "|---|---|---|---|---|---|---|",
    ]
    for (group, model, hw, seq), members in sorted(groups.items()):
        if len({m.case.layout + str(m.case.gpus) + m.case.precision for m in members}) < 2:
            continue
        measured = [m.measured for m in members]
        predicted = [m.measured * (1 + errors[m.case.id]) for m in members]
        ok = all(m.case.verified for m in members)
        tau = kendall_tau(predicted, measured)
        lines.append(
            f"| {group} | {model} | {hw} | {seq} | {len(members)} | {'yes' if ok else 'no'} "
            f"| {tau:.2f} |"
        )
    return lines + [""]


def calibration_section(cal: Calibration) -> list[str]:
    lines = ["## Calibration in use", "", "| constant | value |", "|---|---|"]
    lines += [f"| gemm_efficiency[{k}] | {v:.3f} |" for k, v in sorted(cal.gemm_efficiency.items())]
    lines += [f"| {name} | {getattr(cal, name):.3g} |" for name in Calibration.SCALARS]
    return lines + [""]


def table_section(points: list[Point], errors) -> list[str]:
    lines = [
        "## Every point",
        "",
        "| point | verified | layout | precision | measured | predicted | error | memory GiB "
        "(of HBM) | recompute |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        e = errors[p.case.id]
        lines.append(
            f"| {p.case.id} | {'yes' if p.case.verified else 'no'} | {p.cost.layout} "
            f"| {p.case.precision} | {p.measured:.0f} | {p.measured * (1 + e):.0f} | {e:+.1%} | "
            f"{p.memory_gib:.0f} ({p.hbm_gib:.0f}) | {p.recompute_note} |"
        )
    return lines


if __name__ == "__main__":
    main()
