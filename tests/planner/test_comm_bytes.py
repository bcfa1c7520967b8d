"""Predicted bytes per collective kind: hand-computed tiny-moe cases and invariants.

The hand computations use tiny-moe's shapes directly (models/presets/tiny-moe.yaml), not
the cost model: hidden D=128, vocab V=2048, 4 blocks (block 0 dense, 1-3 MoE), GQA with 4
heads and 2 KV heads of 32, SwiGLU FFN of 256, 8 experts of 128 (top-2) plus one shared
expert of 128. fp32: 4 bytes per element. Global batch 8, sequence 32, mbs 1.
"""

import functools

import pytest

from tera.models import load_spec
from tera.planner import evaluate
from tera.planner.cost.comm_bytes import (
    chunk_actions,
    predicted_collectives,
    predicted_comm_bytes,
    predicted_comm_ops,
    unit_gathers,
)
from tera.planner.layout import Layout
from tera.planner.plan import Plan
from tera.topologies import load

B = 4  # bytes per element in fp32
D, V, S = 128, 2048, 32
A = S * D * B  # one block input of a micro-batch (mbs 1), before sequence sharding
LOGITS = S * V * B  # one micro-batch's logits
ATTENTION = D * D + 2 * (D * 64) + D * D  # q, k, v (2 KV heads of 32), o
DENSE_BLOCK = ATTENTION + 3 * D * 256  # + SwiGLU w1, w3, w2
SHARED = 3 * D * 128  # the shared expert of an MoE block
MOE_BLOCK = ATTENTION + SHARED
EXPERTS = 8 * 3 * D * 128  # routed experts of one MoE block
NORMS, ROUTER = 2 * D, 8 * D  # two norms per block, the router gate
DENSE = V * D + DENSE_BLOCK + NORMS + 3 * (MOE_BLOCK + NORMS + ROUTER) + V * D + D
COUNTS = 8 * 4  # one MoE block's expert counts: 8 int32 (ep) or fp32 (tp)
WORLD = {"all_reduce": 2 * 8 + 8}  # the trainer's loss and grad norm, float64


@functools.cache
def plan(text: str, gpus: int, global_batch: int = 8) -> Plan:
    spec = load_spec("tiny-moe")
    cluster = load("local-cpu", gpus=gpus)
    layout = Layout.parse(text).resolve(spec, gpus, global_batch, S)
    estimate = evaluate(spec, cluster, layout, global_batch, S, precision="fp32")
    return Plan.build(spec, cluster, layout, global_batch, S, "fp32", estimate.to_dict())


def test_tp2_gathers_and_scatters_every_tensor_parallel_sublayer():
    m = 8  # dp = 1
    # per micro-batch: 4 attentions and 1 dense FFN forward and backward (MoE blocks run
    # on the sequence shard), the embedding's reduce-scatter and the head's gather, each
    # mirrored; the head also gathers the logits
    around = m * (2 * (4 + 1) + 2) * A
    # partial gradients of what every tp rank holds whole: norms, routers, shared experts
    whole = NORMS + 3 * (NORMS + ROUTER + SHARED) + D
    assert predicted_comm_ops(plan("tp=2", 2), rank=1) == {
        "tp": {
            "all_gather": around + m * LOGITS,
            "reduce_scatter": around,
            "all_reduce": m * 3 * COUNTS + whole * B,
        },
        # experts are not tensor-parallel (etp=1): replicated on both tp ranks, their
        # gradients reduce over edp = tp*dp/ep = 2 (zero=1: scatter, then gather)
        "edp": {"reduce_scatter": 3 * EXPERTS * B, "all_gather": 3 * EXPERTS * B},
        "world": WORLD,
    }


def test_full_recompute_repeats_the_forward_tensor_parallel_collectives():
    m = 8
    ops = predicted_comm_ops(plan("tp=2,recompute=full", 2))["tp"]
    # recompute re-runs the 5 gathers and the reduce-scatters but the dense FFN's
    assert ops["all_gather"] == m * (2 * 5 + 2 + 5) * A + m * LOGITS
    assert ops["reduce_scatter"] == m * (2 * 5 + 2 + 4) * A
    plain = predicted_comm_ops(plan("tp=2", 2))["tp"]
    assert ops["all_reduce"] - plain["all_reduce"] == m * 3 * COUNTS  # routers run twice


def test_fsdp2_sums_the_sequence_parallel_norms_at_each_of_its_reductions():
    m = 4  # tp 2, dp 2
    norms = 4 * NORMS + D  # attn_norm and ffn_norm of 4 blocks, the final norm
    others = 3 * (ROUTER + SHARED)  # summed once by the trainer, a zero shard of dp = 2
    ops = predicted_comm_ops(plan("tp=2,zero=3", 4))["tp"]
    assert ops["all_reduce"] == m * 3 * COUNTS + (m * norms + others // 2) * B
    ops = predicted_comm_ops(plan("tp=2,zero=1", 4))["tp"]  # one reduction a step
    assert ops["all_reduce"] == m * 3 * COUNTS + (norms + others // 2) * B


def test_pp2_sends_one_activation_or_gradient_per_microbatch():
    m = 8
    for rank in (0, 1):  # stage 0 sends activations, stage 1 gradients
        assert predicted_comm_ops(plan("pp=2", 2), rank) == {"pp": {"send": m * A}, "world": WORLD}


def test_interleaved_stage_sends_for_each_chunk_boundary():
    # chunks 0..3 of one block; stage 0 holds 0 and 2: sends forward from 0 and 2 and
    # backward from 2; stage 1 holds 1 and 3: forward from 1, backward from 1 and 3
    layout = "pp=2,vpp=2,schedule=interleaved"
    for rank in (0, 1):
        assert predicted_comm_bytes(plan(layout, 2), rank)["pp"] == 8 * 3 * A


def test_ep2_dispatches_and_combines_every_routed_row():
    m = 4  # dp = 2
    rows = S * 2 * D * B  # every token of the micro-batch, top-2
    assert predicted_comm_ops(plan("ep=2", 2)) == {
        # 3 MoE blocks: counts, then dispatch and combine forward and backward
        "ep": {"all_to_all": m * 3 * (COUNTS + 4 * rows)},
        "dp": {"reduce_scatter": DENSE * B, "all_gather": DENSE * B},
        # edp = dp/ep = 1: each rank owns its 4 experts alone, nothing to reduce
        "world": WORLD,
    }


def test_etp2_sends_every_row_to_each_peer_and_sums_the_partial_outputs():
    m = 8  # dp = 1
    rows = S // 2 * 2 * D * B  # a tp rank's half of the tokens, top-2
    # per MoE block and micro-batch, forward: the received counts to both etp peers (itself
    # included, 2 copies of 8 int32), its rows to both (2 copies), the partial outputs of
    # both peers' rows back to them (2 ranks' rows); backward the two row exchanges mirrored
    ops = predicted_comm_ops(plan("tp=2,etp=2", 2))
    assert ops["etp"] == {"all_to_all": m * 3 * (2 * COUNTS + 2 * 4 * rows)}
    # the experts' F is split over the two ranks: no expert data parallelism is left
    assert set(ops) == {"tp", "etp", "world"}
    assert ops["tp"] == predicted_comm_ops(plan("tp=2", 2))["tp"]
    # full recompute runs each MoE block's forward twice: counts and two row exchanges
    full = predicted_comm_ops(plan("tp=2,etp=2,recompute=full", 2))["etp"]
    assert full == {"all_to_all": m * 3 * (2 * 2 * COUNTS + 2 * 6 * rows)}


def test_ep2_etp2_exchanges_over_both_expert_axes():
    m = 4  # tp 2, dp 2: ep * etp = 4 = tp * dp, so edp = 1
    rows = S // 2 * 2 * D * B
    ops = predicted_comm_ops(plan("tp=2,ep=2,etp=2", 4), rank=3)
    assert ops["ep"] == {"all_to_all": m * 3 * (COUNTS + 4 * rows)}
    # balanced routing: the ep dispatch brings each rank as many rows as it sent
    assert ops["etp"] == {"all_to_all": m * 3 * (2 * COUNTS + 2 * 4 * rows)}
    assert "edp" not in ops


@pytest.mark.parametrize(
    "zero, expected",
    [
        (0, {"dp": {"all_reduce": DENSE * B}, "edp": {"all_reduce": 3 * EXPERTS * B}}),
        (
            1,
            {
                "dp": {"reduce_scatter": DENSE * B, "all_gather": DENSE * B},
                "edp": {"reduce_scatter": 3 * EXPERTS * B, "all_gather": 3 * EXPERTS * B},
            },
        ),
        (
            2,  # 4 micro-batches, each reduce-scattering its gradients
            {
                "dp": {"reduce_scatter": 4 * DENSE * B, "all_gather": DENSE * B},
                "edp": {"reduce_scatter": 4 * 3 * EXPERTS * B, "all_gather": 3 * EXPERTS * B},
            },
        ),
        (
            3,  # 4 micro-batches: gathered for forward and backward, reduced every time
            {
                "dp": {"all_gather": 2 * 4 * DENSE * B, "reduce_scatter": 4 * DENSE * B},
                "edp": {
                    "all_gather": 2 * 4 * 3 * EXPERTS * B,
                    "reduce_scatter": 4 * 3 * EXPERTS * B,
                },
            },
        ),
    ],
)
def test_dp2_reduces_gradients_as_the_zero_stage_says(zero, expected):
    assert predicted_comm_ops(plan(f"zero={zero}", 2)) == expected | {"world": WORLD}


def test_hsdp_adds_an_all_reduce_of_each_reduced_shard():
    ops = predicted_comm_ops(plan("zero=3,dp_replicate=2", 4))
    # dp_shard = 2: each rank's reduce-scattered half is all-reduced over the 2 replicas
    assert ops["dp"]["all_reduce"] == ops["dp"]["reduce_scatter"] // 2
    assert ops["edp"]["all_reduce"] == ops["edp"]["reduce_scatter"] // 2


def test_stages_and_ranks_of_a_combined_layout_differ_as_their_blocks_do():
    p = plan("tp=2,pp=2,ep=2", 8)  # dp 2, m 4; stage 0 = blocks 0 (dense), 1; stage 1 = 2, 3
    first, last = predicted_comm_ops(p, rank=0), predicted_comm_ops(p, rank=7)
    rows = S // 2 * 2 * D * B  # a tp rank's half of the tokens, top-2
    assert first["ep"] == {"all_to_all": 4 * 1 * (COUNTS + 4 * rows)}
    assert last["ep"] == {"all_to_all": 4 * 2 * (COUNTS + 4 * rows)}
    # stage 0: 2 attentions, 1 dense FFN, the embedding; stage 1: 2 attentions, the head
    assert first["tp"]["reduce_scatter"] == first["tp"]["all_gather"] == 4 * (2 * 3 + 1) * A
    assert last["tp"]["reduce_scatter"] == 4 * (2 * 2 + 1) * A
    assert last["tp"]["all_gather"] == 4 * (2 * 2 + 1) * A + 4 * LOGITS
    # gradients of what every tp rank holds whole: FSDP2 sums the norms whole, the
    # trainer the zero=1 shards (dp = 2) of routers and shared experts
    first_whole = NORMS + (NORMS + ROUTER + SHARED)
    assert first["tp"]["all_reduce"] == 4 * COUNTS + (2 * NORMS + (ROUTER + SHARED) // 2) * B
    last_norms = 2 * NORMS + D
    assert last["tp"]["all_reduce"] == 4 * 2 * COUNTS + (last_norms + ROUTER + SHARED) * B
    assert first["pp"] == last["pp"] == {"send": 4 * A // 2}
    # dense parameters per tp rank: tp-sharded halves plus what the rank holds whole
    stage0 = (V * D + DENSE_BLOCK + ATTENTION) // 2 + first_whole
    assert first["dp"] == {"reduce_scatter": stage0 * B, "all_gather": stage0 * B}
    # edp = tp*dp/ep = 2; each rank holds 4 of the 8 experts of its stage's MoE blocks
    experts = 2 * EXPERTS // 2 * B
    assert last["edp"] == {"reduce_scatter": experts, "all_gather": experts}


def test_zero3_under_pipelining_gathers_as_the_schedule_orders():
    p = plan("pp=2,zero=3", 4)  # dp 2, m 4
    stage0 = V * D + DENSE_BLOCK + NORMS + MOE_BLOCK + NORMS + ROUTER
    # stage 0 runs F F B F B F B B: gathered by the first F, the second F and the
    # backwards that follow a forward; reduce-scattered once, after the last backward
    assert chunk_actions(Layout(pp=2), 4, 0) == [list("FFBFBFBB")]
    assert unit_gathers(list("FFBFBFBB")) == 5
    assert predicted_comm_ops(p, rank=0)["dp"] == {
        "all_gather": 5 * stage0 * B,
        "reduce_scatter": stage0 * B,
    }


@pytest.mark.parametrize(
    "text, gpus",
    [
        ("tp=2", 2),
        ("pp=2", 2),
        ("ep=2", 2),
        ("zero=0", 2),
        ("zero=3", 2),
        ("tp=2,pp=2,ep=2", 8),
        ("tp=2,etp=2", 2),
        ("tp=2,pp=2,ep=2,etp=2", 8),
    ],
)
def test_invariants(text, gpus):
    one, two = plan(text, gpus), plan(text, gpus, global_batch=16)
    layout = one.layout
    for rank in range(gpus):
        totals = predicted_comm_bytes(one, rank)
        ops = predicted_comm_ops(one, rank)
        assert totals == {kind: sum(by_op.values()) for kind, by_op in ops.items()}
        assert all(isinstance(n, int) and n > 0 for n in totals.values())
        for kind in ("tp", "ep", "etp", "pp"):  # a parallelism of degree 1 moves nothing
            assert (kind in totals) == (getattr(layout, kind) > 1)
        # twice the micro-batches: per-micro-batch kinds double, once-a-step ones stay
        doubled = predicted_comm_ops(two, rank)
        for kind in ("ep", "etp", "pp"):
            if kind in totals:
                assert predicted_comm_bytes(two, rank)[kind] == 2 * totals[kind]
        if "tp" in ops:
            for op in ("all_gather", "reduce_scatter"):
                assert doubled["tp"][op] == 2 * ops["tp"][op]
        for kind in ("dp", "edp"):
            if kind in ops and layout.zero < 2:
                assert doubled[kind] == ops[kind]
            elif kind in ops:
                assert doubled[kind] == {op: 2 * n for op, n in ops[kind].items()}
        assert doubled["world"] == ops["world"] == WORLD
        assert all(c.nbytes > 0 and c.what for c in predicted_collectives(one, rank))


def test_one_rank_moves_nothing():
    assert predicted_comm_bytes(plan("tp=1", 1)) == {}


def test_bf16_moves_two_byte_elements():
    spec, gpus = load_spec("tiny-moe"), 2
    cluster = load("local-cpu", gpus=gpus)
    layout = Layout.parse("tp=2").resolve(spec, gpus, 8, S)
    estimate = evaluate(spec, cluster, layout, 8, S, precision="bf16")
    bf16 = predicted_comm_ops(Plan.build(spec, cluster, layout, 8, S, "bf16", estimate.to_dict()))
    fp32 = predicted_comm_ops(plan("tp=2", 2))
    for op in ("all_gather", "reduce_scatter"):
        assert bf16["tp"][op] == fp32["tp"][op] // 2
    assert bf16["edp"] == {op: n // 2 for op, n in fp32["edp"].items()}
    assert bf16["world"] == fp32["world"]  # float64 scalars whatever the precision
