"""The Trainer beyond equivalence: load-time refusals, the learning-rate schedule, input
checks, and checkpoints through torch.distributed.checkpoint that load under another
plan (resharding)."""

import dataclasses
import math

import pytest

from tera.models import load_spec
from tera.planner import evaluate
from tera.planner.layout import Layout
from tera.planner.plan import Plan
from tera.runtime.trainer import MIN_LR_RATIO, UnsupportedPlan, check_supported, lr_factor
from tera.topologies import load

from .world import WorldError, run_world, tiny_batch, tiny_plan

SCHEDULE = dict(seed=0, lr=3e-5, warmup_steps=2, total_steps=4)


def plan_for(spec, layout: str, gpus: int):
    cluster = load("local-cpu", gpus=gpus)
    prediction = evaluate(spec, cluster, layout, 8, 32, precision="fp32").to_dict()
    resolved = Layout.parse(layout).resolve(spec, gpus, 8, 32)
    return Plan.build(spec, cluster, resolved, 8, 32, "fp32", prediction)


@pytest.mark.parametrize(
    ("layout", "field", "words"),
    [
        ("cp=2", "layout.cp", "context_parallel"),
        ("pp=2,mbs=8", "layout.pp", "at least one per stage"),
    ],
)
def test_unsupported_layouts_are_refused_at_load_time(layout, field, words):
    with pytest.raises(UnsupportedPlan) as info:
        check_supported(tiny_plan(layout, 2))
    assert info.value.field == field
    assert words in str(info.value) and str(info.value).startswith(f"plan.{field}:")


def test_expert_tensor_parallelism_is_accepted():
    for layout, gpus in (("etp=2", 2), ("tp=2,ep=2,etp=2", 4)):
        plan = tiny_plan(layout, gpus)
        assert plan.layout.etp == 2
        check_supported(plan)  # raises UnsupportedPlan if refused


def first_step_worker(rank: int, world_size: int, plan):
    """The first step's loss and (rank 0) gradients."""
    from tera.runtime.mesh import Meshes
    from tera.runtime.trainer import Trainer

    meshes = Meshes.from_plan(plan)
    trainer = Trainer(plan, meshes, **SCHEDULE)
    rows = plan.global_batch // meshes.dp_size
    loss = trainer.forward_backward(tiny_batch(0, plan)[meshes.dp_rank * rows :][:rows])
    grads = trainer.full_state_dict(grads=True)
    return loss, grads if rank == 0 else None


def test_a_capacity_factor_caps_each_micro_batch_as_one_rank_does():
    """Under expert parallelism each rank caps its own micro-batch's rows, as the 1-rank
    model does; under sequence parallelism a rank holds part of a micro-batch: refused."""
    spec = load_spec("tiny-moe")
    capped = dataclasses.replace(spec, moe=dataclasses.replace(spec.moe, capacity_factor=1.0))
    with pytest.raises(UnsupportedPlan, match="capacity factor"):
        check_supported(plan_for(capped, "tp=2,mbs=2", 2))
    loss, grads = run_world(first_step_worker, 1, plan_for(capped, "mbs=2", 1))[0]
    ep_loss, ep_grads = run_world(first_step_worker, 2, plan_for(capped, "ep=2,mbs=2", 2))[0]
    assert ep_loss == pytest.approx(loss, rel=1e-6)
    for name, grad in grads.items():
        assert (ep_grads[name] - grad).norm() <= 1e-5 * grad.norm(), name


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    factors = [lr_factor(step, 10, 100) for step in range(120)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert factors[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    assert factors[55] == pytest.approx(MIN_LR_RATIO + (1 - MIN_LR_RATIO) / 2)
    assert factors[100:] == pytest.approx([MIN_LR_RATIO] * 20)
    assert math.isclose(lr_factor(0, 0, 10), 1.0)


def steps_worker(rank: int, world_size: int, plan, first: int, last: int, load_from, save_to):
    """Steps first..last-1, after loading a checkpoint and before saving one."""
    import torch.distributed.checkpoint as dcp

    from tera.runtime.mesh import Meshes
    from tera.runtime.trainer import Trainer

    meshes = Meshes.from_plan(plan)
    trainer = Trainer(plan, meshes, **SCHEDULE)
    if load_from:
        dcp.load({"trainer": trainer}, checkpoint_id=load_from)
    rows = plan.global_batch // meshes.dp_size
    mine = slice(meshes.dp_rank * rows, (meshes.dp_rank + 1) * rows)
    losses = [trainer.train_step(tiny_batch(s, plan)[mine]).loss for s in range(first, last)]
    if save_to:
        dcp.save({"trainer": trainer}, checkpoint_id=save_to)
    return losses


def test_a_checkpoint_written_under_one_plan_resumes_under_another(tmp_path):
    """Save after 2 steps under tp2*pp2 (4 ranks), resume under ep2*dp2 (2 ranks): the
    losses are the uninterrupted 1-rank run's."""
    reference = run_world(steps_worker, 1, tiny_plan("mbs=2", 1), 0, 4, None, None)[0]
    before = run_world(steps_worker, 4, tiny_plan("tp=2,pp=2,mbs=2", 4), 0, 2, None, tmp_path)
    after = run_world(steps_worker, 2, tiny_plan("ep=2,mbs=2", 2), 2, 4, tmp_path, None)
    assert before[0] + after[0] == pytest.approx(reference, rel=1e-5)


def wrong_rows_worker(rank: int, world_size: int, plan):
    from tera.runtime.mesh import Meshes
    from tera.runtime.trainer import Trainer

    trainer = Trainer(plan, Meshes.from_plan(plan), **SCHEDULE)
    trainer.train_step(tiny_batch(0, plan))  # the global batch, not this rank's half


def test_a_batch_that_is_not_this_ranks_share_is_refused():
    with pytest.raises(WorldError, match="expected this rank's 4 rows of 33 tokens"):
        run_world(wrong_rows_worker, 2, tiny_plan("zero=1", 2))
