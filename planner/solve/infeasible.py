"""Why a search found no layout, and what would give one: computed, never guessed.

When `Searcher.run` finds nothing, `explain` searches nearby problems for a witness, a
layout that the cost model says fits (Searcher.first_fit: CP-SAT finds a partition and
recompute that fit):

  - GPUs: the fewest of the counts a cost search would try (scale-up domain x 2^k and
    1.5x that where it is whole nodes), up to MAX_GPU_FACTOR times the GPUs given;
  - sequence length: the longest that fits on the GPUs given, by halving to a length that
    fits and then bisecting (in multiples of SEQ_GRANULE where the sequence allows, the
    alignment attention kernels like); fitting is taken to be monotone in the sequence;
  - pins: each pinned key dropped on its own (a pinned ZeRO stage, for instance), to say
    which pin is in the way;
  - a deadline (objective gpus): the days the fastest layout on the most GPUs needs.

Recompute needs no line of its own: the search already gives every stage the choice of
none, selective and full. Every suggestion names its witness layout, and each question
gets EXPLAIN_SECONDS at most, so an explanation costs a bounded time; a question cut
short says so instead of claiming an answer.
"""

from __future__ import annotations

import dataclasses
import time

from tera.planner.solve.objective import Objective, gpu_counts
from tera.planner.solve.search import NoLayout, Searcher, SearchError, Stop
from tera.topologies import ClusterError

MAX_GPU_FACTOR = 4096  # the largest multiple of the given GPUs tried for a fit
SEQ_GRANULE = 128
EXPLAIN_SECONDS = 30.0  # per question (GPUs, sequence, pins)


def explain(
    searcher: Searcher, reason: NoLayout, workers: int = 1, tokens: float | None = None
) -> SearchError:
    """The SearchError for `searcher`'s problem, with the computed changes that fit;
    `tokens`: the tokens to train, for objective gpus."""
    gpus = max(searcher.clusters)
    if not reason.divides:
        return SearchError(
            f"no layout divides {searcher.spec.name} on {gpus} GPUs with global batch "
            f"{searcher.global_batch}" + _pins_text(searcher.pins),
            _divides_fix(searcher),
        )
    if reason.fits and searcher.objective.kind == "gpus":
        return _missed_deadline(searcher, workers, tokens)
    hbm = next(iter(searcher.clusters.values())).gpu.hbm_bytes / 2**30
    fixes = [
        _fewest_gpus(searcher, workers),
        _longest_sequence(searcher, workers),
        *_pins_in_the_way(searcher, workers),
    ]
    found = [f for f in fixes if f]
    return SearchError(
        f"no layout of {searcher.spec.name} fits in {hbm:.3g} GiB per GPU on {gpus} GPUs "
        f"at sequence length {searcher.seq_len}" + _pins_text(searcher.pins) + " (full "
        "recompute" + ("" if "zero" in searcher.pins else " and ZeRO-3") + " considered)",
        "; or ".join(found) if found else "no nearby change was found to fit",
    )


def _pins_text(pins: dict) -> str:
    return f" with --fix {_pins_string(pins)}" if pins else ""


def _pins_string(pins: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in pins.items())


def _short(plan) -> str:
    """The witness: its layout's degrees and its memory."""
    return f"{plan.layout.brief()}: {plan.estimate.peak_memory_gib:.3g} GiB"


def _fewest_gpus(searcher: Searcher, workers: int) -> str | None:
    full = searcher.clusters[max(searcher.clusters)]
    most = full.num_gpus * MAX_GPU_FACTOR
    counts = gpu_counts(most, full.scaleup_domain, full.gpus_per_node, "cost")
    stop = Stop(_deadline())
    for n in sorted(n for n in counts if n > full.num_gpus):
        try:
            cluster = full.resized(n)
        except ClusterError:  # beyond what the network holds
            return None
        plan, decided = searcher.sibling(clusters={n: cluster}).first_fit(stop, workers)
        if plan is not None:
            return f"{n} GPUs fit (e.g. {_short(plan)})"
        if not decided:
            return None
    return None


def _longest_sequence(searcher: Searcher, workers: int) -> str | None:
    stop = Stop(_deadline())
    granule = SEQ_GRANULE if searcher.seq_len >= 2 * SEQ_GRANULE else 1
    too_long, fits, witness = searcher.seq_len, None, None
    while too_long > granule:  # halve until one fits
        seq = max(granule, (too_long // 2) // granule * granule)
        plan, decided = searcher.sibling(seq_len=seq).first_fit(stop, workers)
        if not decided:
            return None
        if plan is not None:
            fits, witness = seq, plan
            break
        too_long = seq
    if fits is None:
        return None
    while too_long - fits > granule:  # bisect between a fit and a miss
        seq = (fits + too_long) // 2 // granule * granule
        plan, decided = searcher.sibling(seq_len=seq).first_fit(stop, workers)
        if not decided:
            break
        if plan is not None:
            fits, witness = seq, plan
        else:
            too_long = seq
    return f"--seq-len {fits} fits ({too_long} does not; e.g. {_short(witness)})"


def _pins_in_the_way(searcher: Searcher, workers: int) -> list[str]:
    fixes = []
    for key in searcher.pins:
        rest = {k: v for k, v in searcher.pins.items() if k != key}
        stop = Stop(_deadline())
        plan, _ = searcher.sibling(pins=rest).first_fit(stop, workers)
        if plan is not None:
            value = getattr(plan.layout, key, None)
            fixes.append(
                f"without the pin {key}={searcher.pins[key]}, {key}={value} fits "
                f"(e.g. {_short(plan)})"
            )
    return fixes


def _divides_fix(searcher: Searcher) -> str:
    """The nearest global batches for which some configuration divides, and the pins."""
    fixes = []
    batch, gpus = searcher.global_batch, max(searcher.clusters)
    deadline = _deadline()
    nearest = sorted(range(1, max(2 * batch, 8 * gpus) + 1), key=lambda b: (abs(b - batch), b))
    for candidate in nearest:
        if time.monotonic() > deadline:
            break
        if next(dataclasses.replace(searcher.space, global_batch=candidate).configs(), None):
            fixes.append(f"--global-batch {candidate} divides")
            break
    if searcher.pins:
        fixes.append(f"drop pins from --fix {_pins_string(searcher.pins)}")
    return "; or ".join(fixes) if fixes else "use another GPU count"


def _missed_deadline(searcher: Searcher, workers: int, tokens: float) -> SearchError:
    """No layout on up to the most GPUs meets the deadline: the days the fastest needs."""
    most = max(searcher.clusters)
    fastest = searcher.sibling(
        clusters={most: searcher.clusters[most]}, objective=Objective("step_time")
    )
    problem = f"no layout that fits in memory meets the deadline on up to {most} GPUs"
    try:
        result = fastest.run(1, EXPLAIN_SECONDS, workers, None)
    except (SearchError, NoLayout):
        return SearchError(problem, "allow more GPUs (--gpus), more days or fewer tokens")
    step_s = result.best.estimate.step_time_s
    days_needed = step_s * tokens / (searcher.global_batch * searcher.seq_len) / 86400
    return SearchError(
        problem,
        f"the fastest layout on {most} GPUs ({_short(result.best)}, {step_s:.3g} s/step) "
        f"needs {days_needed:.3g} days: allow that, more GPUs (--gpus) or fewer tokens",
    )


def _deadline() -> float:
    return time.monotonic() + EXPLAIN_SECONDS
