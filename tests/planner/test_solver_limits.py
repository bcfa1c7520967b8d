"""Solver limits: the time limit holds, Ctrl-C returns the best plan so far with its gap,
and the same inputs give byte-identical plans."""

import os
import signal
import time

import pytest

from tera.planner.solve import SearchError, search
from tera.planner.solve.search import PLAN_FOUND

# kimi-k2 on 16,384 H100 needs about 8 s to prove its optimum (bench/results/solver.md) and
# about 3 s to trace and bound, so a 6 s limit binds after the set-up.
BIG = ("kimi-k2", "dgx-h100", 16384, 4096)
TIME_LIMIT = 6.0


def interrupt_when(needle: str):
    """A progress callback that sends this process SIGINT once a message holds `needle`."""
    sent = []

    def progress(message: str, fraction: float | None = None) -> None:
        if needle in message and not sent:
            sent.append(message)
            os.kill(os.getpid(), signal.SIGINT)

    return progress, sent


def test_the_time_limit_is_honoured_within_ten_percent():
    start = time.monotonic()
    try:
        result = search(*BIG, gpus=16384, time_limit=TIME_LIMIT)
    except SearchError as err:  # stopped before the first layout: still on time
        assert "time limit" in str(err)
    else:
        assert result.certificate.status == "FEASIBLE"
    assert time.monotonic() - start <= 1.1 * TIME_LIMIT


def test_ctrl_c_returns_the_best_plan_so_far_with_its_gap():
    progress, sent = interrupt_when(PLAN_FOUND)  # the first plan entered the top 3
    result = search("tiny-moe", "dgx-h100", 32, 128, gpus=8, top=3, progress=progress)
    assert sent, "the search found no plan to interrupt after"
    c = result.certificate
    assert c.status == "FEASIBLE" and 1 <= len(result.plans) < 3
    assert c.bound < c.objective and c.gap == pytest.approx((c.objective - c.bound) / c.objective)
    assert result.best.estimate.fits
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_ctrl_c_before_any_plan_is_a_clear_error():
    progress, _ = interrupt_when("may fit")  # bounding done, nothing solved yet
    with pytest.raises(SearchError, match="interrupted before any layout was found"):
        search("tiny-moe", "dgx-h100", 32, 128, gpus=8, progress=progress)


@pytest.mark.parametrize(
    "problem",
    [("tiny-moe", "dgx-h100", 32, 128, 8), ("deepseek-v3", "hgx-h800", 15360, 4096, 2048)],
)
def test_the_same_inputs_give_byte_identical_plans(tmp_path, problem):
    *args, gpus = problem
    paths = [tmp_path / f"plan-{i}.json" for i in range(2)]
    for path in paths:
        search(*args, gpus=gpus, top=3).to_plan().save(path)
    assert paths[0].read_bytes() == paths[1].read_bytes()
