"""The plan file: round trip, derived views (mesh, rank map, stages) and every refusal."""

import copy
import dataclasses
import hashlib
import json

import pytest

from tera.models import load_spec
from tera.planner.layout import Layout
from tera.planner.plan import SCHEMA_VERSION, Plan, PlanError, provenance
from tera.topologies import load

CERTIFICATE = {
    "status": "OPTIMAL",
    "objective": 0.0018,
    "objective_kind": "step_time",
    "bound": 0.0017,
    "gap": 0.05,
}


def prediction(layout: Layout, gpus: int, global_batch: int, seq_len: int) -> dict:
    """The shape of Estimate.to_dict(), numbers made up (the cost model is not under test)."""
    return {
        "model": "tiny-moe",
        "cluster": "dgx-h100",
        "gpus": gpus,
        "layout": layout.to_dict(),
        "global_batch": global_batch,
        "seq_len": seq_len,
        "precision": "bf16",
        "fits": True,
        "step_time_s": 0.0018,
        "tokens_per_s_per_gpu": 5.6e5,
        "mfu": 0.0043,
        "peak_memory_gib": 0.0067,
        "breakdown_s": {"compute": 0.0002, "ep_comm": 0.0012, "bubble": 6.4e-5},
        "memory_gib": {"params": 0.0008, "grads": 0.0016, "activations": 0.0024},
        "stage_memory_gib": (0.0056, 0.0067),  # a tuple: stored as a JSON list
    }


def alternative(rank: int, layout: Layout, gpus: int) -> dict:
    """An alternatives entry (plan.ALTERNATIVE_KEYS), numbers made up."""
    return {
        "rank": rank,
        "gpus": gpus,
        "layout_string": str(layout),
        "step_time_s": 0.0018 * rank,
        "tokens_per_s_per_gpu": 5.6e5 / rank,
        "mfu": 0.0043 / rank,
        "peak_memory_gib": 0.0067,
        "fits": True,
    }


def make_plan(
    text="tp=2,pp=2,ep=4,etp=1",
    spec=None,
    gpus=16,
    global_batch=64,
    seq_len=256,
    certificate=CERTIFICATE,
):
    """A plan of `text`; with a certificate it is the best of two searched alternatives."""
    spec = spec or load_spec("tiny-moe")
    cluster = load("dgx-h100", gpus=gpus)
    layout = Layout.parse(text).resolve(spec, gpus, global_batch, seq_len)
    runner_up = Layout.parse("tp=1,pp=1").resolve(spec, gpus, global_batch, seq_len)
    alternatives = [alternative(1, layout, gpus), alternative(2, runner_up, gpus)]
    return Plan.build(
        spec, cluster, layout, global_batch, seq_len, "bf16",
        prediction(layout, gpus, global_batch, seq_len), certificate,
        alternatives if certificate else None,
    )  # fmt: skip


@pytest.fixture(scope="module")
def plan():
    return make_plan()


@pytest.fixture
def saved(plan, tmp_path):
    path = tmp_path / "plan.json"
    plan.save(path)
    return path


def test_round_trip_gives_an_equal_plan(plan, saved):
    loaded = Plan.load(saved)
    assert loaded == plan
    assert loaded.prediction["stage_memory_gib"] == [0.0056, 0.0067]
    assert Plan.from_dict(plan.to_dict()) == plan
    text = saved.read_text()
    assert text.endswith("}\n") and json.loads(text) == plan.to_dict()


def test_round_trip_without_certificate(tmp_path):
    plan = make_plan(certificate=None)
    plan.save(tmp_path / "p.json")
    loaded = Plan.load(tmp_path / "p.json")
    assert loaded == plan and loaded.certificate is None and loaded.alternatives == []


def test_the_same_plan_saves_the_same_bytes(tmp_path):
    """A plan holds no clock time, so building it twice writes identical files."""
    make_plan().save(tmp_path / "a.json")
    make_plan().save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_digests_and_layout_string(plan):
    data = plan.to_dict()
    blob = json.dumps(plan.spec.to_dict(), sort_keys=True, separators=(",", ":"))
    assert data["model_digest"] == hashlib.sha256(blob.encode()).hexdigest()
    assert data["cluster_digest"] == plan.cluster.digest()
    assert data["schema_version"] == SCHEMA_VERSION == 2
    assert data["layout_string"].startswith("tp=2,pp=2,vpp=1,ep=4,etp=1,cp=1,dp=4")


def test_worked_example_mesh_and_rank_map(plan):
    """DESIGN.md: 16 ranks, tp2 pp2 ep4 etp1, so dp4 and edp2, on 2 DGX H100 nodes."""
    assert plan.world_size == 16
    assert plan.mesh() == {
        "dense": [["tp", 2], ["cp", 1], ["dp_shard", 4], ["dp_replicate", 1], ["pp", 2]],
        "expert": [["etp", 1], ["ep", 4], ["edp", 2], ["dp_replicate", 1], ["pp", 2]],
    }
    ranks = plan.rank_map()
    assert len(ranks) == 16 and ranks[9] == [1, 1]
    assert ranks[0] == [0, 0] and ranks[7] == [0, 7] and ranks[15] == [1, 7]


def test_stages_of_a_non_uniform_interleaved_partition():
    spec = dataclasses.replace(load_spec("tiny-moe"), name="tiny-moe-6", layers=6)
    plan = make_plan("tp=2,pp=2,vpp=2,schedule=interleaved,partition=1:2:2:1", spec=spec)
    stages = plan.stages()
    assert stages == [
        {"stage": 0, "recompute": "none", "chunks": [
            {"chunk": 0, "first_layer": 0, "last_layer": 0},
            {"chunk": 2, "first_layer": 3, "last_layer": 4}]},
        {"stage": 1, "recompute": "none", "chunks": [
            {"chunk": 1, "first_layer": 1, "last_layer": 2},
            {"chunk": 3, "first_layer": 5, "last_layer": 5}]},
    ]  # fmt: skip
    owner = {}
    for stage in stages:
        for chunk in stage["chunks"]:
            assert chunk["chunk"] % 2 == stage["stage"]
            for block in range(chunk["first_layer"], chunk["last_layer"] + 1):
                assert block not in owner
                owner[block] = stage["stage"]
    assert sorted(owner) == list(range(6))


def test_stages_carry_per_stage_recompute():
    plan = make_plan("tp=2,pp=2,recompute=full:none")
    assert [s["recompute"] for s in plan.stages()] == ["full", "none"]
    assert [s["chunks"] for s in plan.stages()] == [
        [{"chunk": 0, "first_layer": 0, "last_layer": 1}],
        [{"chunk": 1, "first_layer": 2, "last_layer": 3}],
    ]


def test_provenance_fields(plan):
    prov = provenance()
    assert set(prov) == {"tera", "python", "torch", "ortools", "networkx"}
    assert prov["tera"] and prov["python"].count(".") == 2
    assert plan.provenance.keys() == prov.keys()


def test_large_world_keeps_the_rank_map_compact(tmp_path):
    plan = make_plan("tp=1,pp=1", gpus=16384, global_batch=16384, certificate=None)
    path = tmp_path / "big.json"
    plan.save(path)
    lines = path.read_text().splitlines()
    rank_lines = [line for line in lines if line.startswith("  [") and line[3].isdigit()]
    assert len(rank_lines) == 16384 // 8  # one line per 8-GPU node, not one per number
    assert len(lines) < 2048 + 400
    assert "  [2047,0],[2047,1],[2047,2],[2047,3],[2047,4],[2047,5],[2047,6],[2047,7]" in lines
    assert Plan.load(path) == plan


DELETE = object()


def edit(key, value):
    """Set (or DELETE) the dotted `key` of a plan's JSON object; list indices are numbers."""

    def apply(data):
        *parents, last = key.split(".")
        target = data
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if value is DELETE:
            del target[last]
        elif isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value

    return apply


def swap_rank_9(data):
    data["ranks"][9] = [1, 2]


def truncate_ranks(data):
    data["ranks"] = data["ranks"][:8]


def retile_tp(data):
    """tp=4 with dp=2 still resolves, so only the layout string gives the edit away."""
    data["layout"].update(tp=4, dp=2)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (edit("schema_version", 1), "schema_version"),
        (edit("schema_version", 3), "schema_version"),
        (edit("schema_version", "1"), "schema_version"),
        (edit("schema_version", DELETE), "schema_version"),
        (edit("stages", DELETE), "stages"),
        (edit("certficate", None), "certficate"),
        (edit("ranks", "all"), "ranks"),
        (edit("global_batch", "64"), "global_batch"),
        (edit("precision", "fp16"), "precision"),
        (edit("model.hidden", 256), "model_digest"),
        (edit("model.attention.heads", 0), "model.attention.heads"),
        (edit("cluster.node.nics.gbps", 200), "cluster_digest"),
        (edit("cluster.gpus", "sixteen"), "cluster.gpus"),
        (edit("layout.tp", 1), "layout.dp"),
        (edit("layout.tp", "2"), "layout.tp"),
        (edit("layout.foo", 1), "layout.foo"),
        (edit("layout.dp", None), "layout"),
        (retile_tp, "layout_string"),
        (edit("mesh.dense.0.1", 4), "mesh"),
        (swap_rank_9, "ranks"),
        (truncate_ranks, "ranks"),
        (edit("stages.1.chunks.0.first_layer", 1), "stages"),
        (edit("stages.0.recompute", "full"), "stages"),
        (edit("prediction.step_time_s", DELETE), "prediction.step_time_s"),
        (edit("prediction.fits", "yes"), "prediction.fits"),
        (edit("prediction.gpus", 32), "prediction.gpus"),
        (edit("certificate.status", "UNKNOWN"), "certificate.status"),
        (edit("certificate.gap", -0.1), "certificate.gap"),
        (edit("certificate.seconds", 1.5), "certificate.seconds"),
        (edit("certificate.bound", DELETE), "certificate.bound"),
        (edit("certificate.iterations", 3), "certificate.iterations"),
        (edit("certificate.objective_kind", "tokens"), "certificate.objective_kind"),
        (edit("alternatives", {}), "alternatives"),
        (edit("alternatives.1.mfu", "high"), "alternatives[1].mfu"),
        (edit("alternatives.1.rank", 3), "alternatives[1].rank"),
        (edit("alternatives.0.layout_string", "tp=8"), "alternatives"),
        (edit("alternatives.0.cost", 1.0), "alternatives[0].cost"),
        (edit("alternatives.0.fits", DELETE), "alternatives[0].fits"),
        (edit("provenance.torch", 2), "provenance.torch"),
        (edit("a\u2028b", 1), "'a\\u2028b'"),  # a key holding a line break: its repr
        (edit("layout.t\x1ep", 1), "layout.'t\\x1ep'"),
        (edit("certificate.\x85", 1), "certificate.'\\x85'"),
    ],
)
def test_an_edited_plan_is_refused_naming_the_field(saved, change, field):
    data = json.loads(saved.read_text())
    change(data)
    saved.write_text(json.dumps(data))
    with pytest.raises(PlanError) as info:
        Plan.load(saved)
    assert info.value.field == field
    assert str(info.value).startswith(f"plan.{field}: ")
    assert "; " in str(info.value)
    assert len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", "not JSON"),
        ('{"schema_version": NaN}', "NaN"),
        ("", "not JSON"),
        ("[" * 5000 + "]" * 5000, "nests too deeply"),
        ("\udcff", "cannot read"),  # a byte that is not UTF-8
    ],
)
def test_a_file_that_is_not_json_is_refused(tmp_path, text, problem):
    path = tmp_path / "plan.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(PlanError, match=problem) as info:
        Plan.load(path)
    assert info.value.field == "file"


def test_a_missing_file_is_refused(tmp_path):
    with pytest.raises(PlanError, match="not found") as info:
        Plan.load(tmp_path / "absent.json")
    assert info.value.field == "file"
    with pytest.raises(PlanError, match="directory") as info:
        Plan.load(tmp_path)
    assert info.value.field == "file"
    with pytest.raises(PlanError, match="File name too long") as info:
        Plan.load("x" * 5000)
    assert info.value.field == "file"


def test_not_an_object_is_refused(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("[1, 2]")
    with pytest.raises(PlanError, match=r"^plan: expected a JSON object, got array") as info:
        Plan.load(path)
    assert info.value.field == ""


def test_where_prefixes_the_message(plan):
    data = copy.deepcopy(plan.to_dict())
    data["seq_len"] = 0
    with pytest.raises(PlanError, match=r"^runs\[3\]\.plan\.seq_len: ") as info:
        Plan.from_dict(data, where="runs[3].plan")
    assert info.value.field == "seq_len"


def test_build_refuses_an_unresolved_layout_and_a_bad_certificate():
    spec, cluster = load_spec("tiny-moe"), load("dgx-h100", gpus=16)
    layout = Layout.parse("tp=2,pp=2,ep=4")
    resolved = layout.resolve(spec, 16, 64, 256)
    pred = prediction(resolved, 16, 64, 256)
    with pytest.raises(PlanError) as info:
        Plan.build(spec, cluster, layout, 64, 256, "bf16", pred)
    assert info.value.field == "layout"
    with pytest.raises(PlanError) as info:
        Plan.build(spec, cluster, resolved, 64, 256, "bf16", pred, {**CERTIFICATE, "gap": -1})
    assert info.value.field == "certificate.gap"
    with pytest.raises(PlanError) as info:
        Plan.build(spec, cluster, resolved, 64, 256, "bf16", {**pred, "mfu": float("nan")})
    assert info.value.field == "prediction"


def test_precisions_and_objectives_are_the_cost_models_and_the_solvers():
    from tera.planner import cost, plan
    from tera.planner.solve import objective

    assert plan.PRECISIONS == cost.PRECISIONS
    assert plan.OBJECTIVE_KINDS == objective.OBJECTIVES


def test_build_refuses_a_prediction_or_certificate_of_the_wrong_type(plan):
    args = (plan.spec, plan.cluster, plan.layout, 64, 256, "bf16")
    with pytest.raises(PlanError) as info:
        Plan.build(*args, [plan.prediction])
    assert info.value.field == "prediction"
    with pytest.raises(PlanError) as info:
        Plan.build(*args, plan.prediction, "OPTIMAL")
    assert info.value.field == "certificate"
