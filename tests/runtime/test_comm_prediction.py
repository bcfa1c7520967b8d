"""The bytes each kind of collective moves in a training step, measured on every rank by
CommCounter, equal the planner's prediction (planner/cost/comm_bytes.py) within 1%.

tiny-moe, fp32, with the model's balanced routing (every expert gets the same rows, the
case the cost model prices; learned routing moves a rank's expert all-to-all bytes by a
few percent either way). Step 2 is compared: step 1 also carries the pipeline schedule's
one-time shape exchange.
"""

import pytest

from .world import run_world, tiny_batch, tiny_plan

LAYOUTS = {  # name: (layout, ranks); the equivalence suite's layouts
    "tp2": ("tp=2,mbs=2", 2),
    "pp2-1f1b": ("pp=2,mbs=2", 2),
    "pp2-vpp2-interleaved": ("pp=2,vpp=2,schedule=interleaved,mbs=2", 2),
    "ep2": ("ep=2,mbs=2", 2),
    "dp2-fsdp-zero3": ("zero=3,mbs=2", 2),
    "dp2-zero1": ("zero=1,mbs=2", 2),
    "tp2-pp2-ep2-dp2": ("tp=2,pp=2,ep=2,mbs=2", 8),
    "tp2-etp2": ("tp=2,etp=2,mbs=2", 2),
    "tp2-ep2-etp2-dp2": ("tp=2,ep=2,etp=2,mbs=2", 4),
    "tp2-etp2-dp2-zero3": ("tp=2,etp=2,zero=3,mbs=2", 4),
    "tp2-pp2-ep2-etp2-dp2": ("tp=2,pp=2,ep=2,etp=2,mbs=2", 8),
}


def measure_worker(rank: int, world_size: int, plan) -> tuple[dict, dict]:
    from tera.planner.cost.comm_bytes import predicted_comm_bytes
    from tera.runtime.comm_stats import CommCounter
    from tera.runtime.mesh import Meshes
    from tera.runtime.trainer import Trainer

    meshes = Meshes.from_plan(plan)
    trainer = Trainer(plan, meshes, balanced_routing=True)
    counter = CommCounter(meshes)
    rows = plan.global_batch // meshes.dp_size
    mine = slice(meshes.dp_rank * rows, (meshes.dp_rank + 1) * rows)
    for step in range(2):
        counter.reset()
        with counter:
            trainer.train_step(tiny_batch(step, plan)[mine])
    return counter.step_bytes(), predicted_comm_bytes(plan, rank)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_measured_bytes_per_kind_equal_the_prediction(name):
    layout, ranks = LAYOUTS[name]
    plan = tiny_plan(layout, ranks)
    for rank, (measured, predicted) in enumerate(run_world(measure_worker, ranks, plan)):
        assert "other" not in measured, f"rank {rank}: a collective on an unknown group"
        assert set(measured) == set(predicted), f"rank {rank}"
        for kind, expected in predicted.items():
            assert measured[kind] == pytest.approx(expected, rel=0.01), f"rank {rank} {kind}"
        for axis in ("tp", "pp", "ep", "etp"):  # the layout's own parallelisms communicate
            degree = getattr(plan.layout, axis)
            assert (degree > 1) == (measured.get(axis, 0) > 0), f"rank {rank} {axis}"
