"""The first cost model: invariants that must hold whatever the calibration."""

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tera.planner import evaluate
from tera.planner.cost.memory import in_flight_chunks
from tera.planner.cost.stages import chunk_bounds
from tera.planner.layout import LayoutError, even_partition


def test_done_when_deepseek_v3_on_h800():
    e = evaluate(
        "deepseek-v3",
        "hgx-h800",
        "tp=1,pp=16,ep=64,zero=1,mbs=1",
        15360,
        4096,
        gpus=2048,
        precision="fp8",
    )
    d = e.to_dict()
    assert d["gpus"] == 2048 and d["layout"]["dp"] == 128
    assert d["breakdown_s"]["ep_comm"] > 0 and d["breakdown_s"]["pp_comm"] > 0
    assert d["breakdown_s"]["tp_comm"] == 0  # tp=1
    assert d["step_time_s"] > d["breakdown_s"]["compute"]


def test_done_when_gpt3_on_a100():
    e = evaluate("gpt3-175b", "dgx-a100", "tp=8,pp=8,mbs=1,recompute=full", 1536, 2048, gpus=1024)
    assert e.fits and e.breakdown_s["tp_comm"] > 0 and e.breakdown_s["recompute"] > 0
    assert e.breakdown_s["ep_comm"] == 0


def test_chunk_bounds_cover_every_layer_once():
    for layers in (1, 7, 61, 126):
        for chunks in range(1, layers + 1, 5):
            bounds = chunk_bounds(even_partition(layers, chunks))
            covered = [x for a, b in bounds for x in range(a, b + 1)]
            assert covered == list(range(layers))
            sizes = [b - a + 1 for a, b in bounds]
            assert max(sizes) - min(sizes) <= 1


def test_in_flight_micro_batches_follow_the_schedules():
    assert [in_flight_chunks(s, 4, 1, 100) for s in range(4)] == [4, 3, 2, 1]
    assert in_flight_chunks(0, 4, 1, 2) == 2  # never more than the micro-batches
    # Megatron interleaved warm-up: 2*(pp-1) + (vpp-1)*pp + 1 chunks on stage 0
    assert in_flight_chunks(0, 4, 2, 100) == 2 * 3 + 4 + 1


def test_pipeline_bubble_shrinks_with_virtual_stages():
    common = dict(global_batch=64, seq_len=2048, gpus=64)
    flat = evaluate("llama3-8b", "dgx-h100", "tp=2,pp=4,mbs=1", **common)
    interleaved = evaluate(
        "llama3-8b", "dgx-h100", "tp=2,pp=4,vpp=2,schedule=interleaved,mbs=1", **common
    )
    assert interleaved.breakdown_s["bubble"] < flat.breakdown_s["bubble"]


def test_recompute_trades_memory_for_time():
    common = dict(global_batch=64, seq_len=4096, gpus=64)
    none = evaluate("llama3-70b", "dgx-h100", "tp=8,pp=4,mbs=1", **common)
    full = evaluate("llama3-70b", "dgx-h100", "tp=8,pp=4,mbs=1,recompute=full", **common)
    assert full.memory_gib["activations"] < none.memory_gib["activations"]
    assert full.step_time_s > none.step_time_s


def test_zero_shards_optimizer_state():
    common = dict(global_batch=64, seq_len=2048, gpus=64)
    z0 = evaluate("mixtral-8x7b", "dgx-h100", "tp=2,ep=8,zero=0", **common)
    z1 = evaluate("mixtral-8x7b", "dgx-h100", "tp=2,ep=8,zero=1", **common)
    z3 = evaluate("mixtral-8x7b", "dgx-h100", "tp=2,ep=8,zero=3", **common)
    assert z1.memory_gib["optimizer"] < z0.memory_gib["optimizer"]
    assert z1.memory_gib["params"] == pytest.approx(z0.memory_gib["params"])
    assert z3.memory_gib["params"] < z1.memory_gib["params"]


LAYOUTS = st.fixed_dictionaries(
    {
        "tp": st.sampled_from([1, 2, 4]),
        "pp": st.sampled_from([1, 2, 4]),
        "ep": st.sampled_from([1, 2, 4, 8]),
        "cp": st.sampled_from([1, 2]),
        "zero": st.sampled_from([0, 1, 2, 3]),
        "recompute": st.sampled_from(["none", "selective", "full"]),
    }
)


@settings(max_examples=40, deadline=None)
@given(layout=LAYOUTS, mbs=st.sampled_from([1, 2]), nodes=st.sampled_from([1, 2, 4]))
def test_memory_is_never_negative_and_grows_with_micro_batch(layout, mbs, nodes):
    text = ",".join(f"{k}={v}" for k, v in layout.items())
    gpus = 8 * nodes

    def run(micro):
        # the global batch grows with the micro-batch, so the number of micro-batches (which
        # caps those in flight) stays the same and only their size changes
        batch = 32 * micro
        return evaluate("mixtral-8x7b", "dgx-h100", f"{text},mbs={micro}", batch, 1024, gpus=gpus)

    try:
        small, large = run(mbs), run(2 * mbs)
    except LayoutError:
        assume(False)
    for e in (small, large):
        assert all(v >= 0 for v in e.memory_gib.values())
        assert all(v >= 0 for v in e.breakdown_s.values())
        assert e.step_time_s > 0
    assert large.memory_gib["activations"] > small.memory_gib["activations"]
    assert large.peak_memory_gib >= small.peak_memory_gib
