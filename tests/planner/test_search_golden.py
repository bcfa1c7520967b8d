"""Golden plans: the search's answer for fixed cases is stored and diffed, so that a
change in the solver or the cost model shows in review. Regenerate deliberately with
TERA_UPDATE_GOLDEN=1 python -m pytest tests/planner/test_search_golden.py."""

import json
import os
from pathlib import Path

import pytest

from tera.planner.solve import search
from tera.topologies import from_dict, load

GOLDEN = Path(__file__).with_name("golden")


def small_hbm(gpus: int, hbm_gb: float):
    data = load("dgx-h100", gpus=8).to_dict()
    data["gpus"] = gpus
    data["node"]["gpu"]["hbm_gb"] = hbm_gb
    return from_dict(data)


CASES = {
    "tiny-moe-8xh100": dict(
        model="tiny-moe", cluster="dgx-h100", gpus=8, global_batch=32, seq_len=128
    ),
    "tiny-moe-memory-bound": dict(
        model="tiny-moe", cluster=small_hbm(8, 0.012), global_batch=32, seq_len=128
    ),
    "tiny-moe-cost-16": dict(
        model="tiny-moe",
        cluster="dgx-h100",
        gpus=16,
        global_batch=16,
        seq_len=128,
        objective="cost",
    ),
    "tiny-moe-pinned": dict(
        model="tiny-moe", cluster="dgx-h100", gpus=8, global_batch=32, seq_len=128, fix="pp=2,tp=1"
    ),
}


def summary(result) -> dict:
    return {
        "status": result.certificate.status,
        "objective": round(result.certificate.objective, 12),
        "plans": [{"layout": str(p.layout), "objective_ns": p.objective_ns} for p in result.plans],
    }


@pytest.mark.parametrize("name", sorted(CASES))
def test_search_matches_the_golden_plan(name):
    result = search(**CASES[name], top=2, workers=1)
    got = summary(result)
    path = GOLDEN / f"{name}.json"
    if os.environ.get("TERA_UPDATE_GOLDEN"):
        path.write_text(json.dumps(got, indent=1) + "\n")
    want = json.loads(path.read_text())
    assert got == want, f"search changed its answer for {name}; review, then regenerate"
