"""An infeasible search says what would fit, and each suggestion is checked by searching
again: the suggested change finds a layout, the next-nearest one does not."""

import re

import pytest

from tera.planner.solve import SearchError, search
from tera.planner.solve.objective import gpu_counts
from tests.planner.test_solve import TINY, small_cluster

# tiny-moe on 8 GPUs of 6 MB with ZeRO pinned off: nothing fits, and three changes would
# (more GPUs, a shorter sequence, another ZeRO stage)
HBM_GB, GPUS, BATCH, SEQ = 0.006, 8, 16, 128


def fails(**changes) -> bool:
    problem = dict(gpus=GPUS, batch=BATCH, seq=SEQ, fix="zero=0") | changes
    try:
        search(
            TINY,
            small_cluster(problem["gpus"], HBM_GB),
            problem["batch"],
            problem["seq"],
            fix=problem["fix"],
            workers=1,
        )
    except SearchError:
        return True
    return False


@pytest.fixture(scope="module")
def message() -> str:
    with pytest.raises(SearchError) as info:
        search(TINY, small_cluster(GPUS, HBM_GB), BATCH, SEQ, fix="zero=0", workers=1)
    return str(info.value)


def test_the_problem_is_named(message):
    gib = f"{HBM_GB * 1e9 / 2**30:.3g}"  # 6 MB
    assert message.startswith(f"no layout of tiny-moe fits in {gib} GiB per GPU on {GPUS} GPUs")
    assert "with --fix zero=0" in message


def test_the_fewest_gpus_fit_and_fewer_do_not(message):
    fewest = int(re.search(r"(\d+) GPUs fit", message).group(1))
    assert not fails(gpus=fewest)
    tried = gpu_counts(fewest, 8, 8, "cost")  # the counts between: none fits
    assert all(fails(gpus=n) for n in tried if GPUS <= n < fewest)


def test_the_longest_sequence_fits_and_one_more_does_not(message):
    fits, too_long = map(int, re.search(r"--seq-len (\d+) fits \((\d+) does not", message).groups())
    assert fits < SEQ and too_long == fits + 1  # below 256 the search steps by one token
    assert not fails(seq=fits) and fails(seq=too_long)


def test_the_pin_in_the_way_is_named_with_a_setting_that_fits(message):
    zero = int(re.search(r"without the pin zero=0, zero=(\d) fits", message).group(1))
    assert zero > 0 and not fails(fix=f"zero={zero}")


def test_a_batch_that_divides_is_the_nearest_one():
    with pytest.raises(SearchError) as info:
        search(TINY, small_cluster(8, 1.0), 16, 128, fix="tp=1,cp=1,pp=1,mbs=8", workers=1)
    message = str(info.value)
    assert message.startswith("no layout divides tiny-moe on 8 GPUs with global batch 16")
    batch = int(re.search(r"--global-batch (\d+) divides", message).group(1))
    assert batch == 64  # dp=8 and mbs=8 on 8 GPUs: multiples of 64
    assert "drop pins from --fix tp=1,cp=1,pp=1,mbs=8" in message
    assert search(TINY, small_cluster(8, 1.0), batch, 128, fix="tp=1,cp=1,pp=1,mbs=8", workers=1)


def test_a_missed_deadline_says_how_many_days_the_fastest_layout_needs():
    tokens = 1e12
    with pytest.raises(SearchError) as info:
        search(
            TINY, small_cluster(8, 1.0), 16, 128, objective="gpus", tokens=tokens,
            deadline_days=1e-6, workers=1,
        )  # fmt: skip
    days = float(re.search(r"needs ([\d.e+-]+) days", str(info.value)).group(1))

    def meets(deadline: float) -> bool:
        try:
            search(
                TINY, small_cluster(8, 1.0), 16, 128, objective="gpus", tokens=tokens,
                deadline_days=deadline, workers=1,
            )  # fmt: skip
        except SearchError:
            return False
        return True

    assert meets(days * 1.01) and not meets(days * 0.99)  # 3 significant digits printed
