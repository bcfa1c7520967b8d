"""tera-plan export: each format against the rules of issue 7 item 1."""

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import tomllib
import yaml

from tera.models import load_spec
from tera.models.spec import FFNSpec
from tera.planner import cli
from tera.planner.exports import FORMATS, ExportError, export
from tera.planner.exports.frameworks import TORCHTITAN_KEYS
from tera.planner.exports.megatron import MEGATRON_FLAGS
from tera.planner.layout import Layout
from tera.planner.plan import Plan
from tera.topologies import load

from .test_plan import prediction

FLAGS_FILE = Path(__file__).parents[3] / "shared" / "reference" / "megatron-lm-flags.txt"


def make_plan(text, spec="tiny-moe", gpus=16, global_batch=64, seq_len=256, layers=None):
    spec = load_spec(spec) if isinstance(spec, str) else spec
    if layers is not None:
        spec = dataclasses.replace(spec, layers=layers)
    cluster = load("dgx-h100", gpus=gpus)
    layout = Layout.parse(text).resolve(spec, gpus, global_batch, seq_len)
    shape = prediction(layout, gpus, global_batch, seq_len)
    return Plan.build(spec, cluster, layout, global_batch, seq_len, "bf16", shape)


@pytest.fixture(scope="module")
def moe_plan():
    return make_plan("tp=2,pp=2,ep=4,etp=1,zero=1,mbs=2")


def megatron_flags(text: str) -> dict[str, str | None]:
    """The flags after `pretrain_gpt.py`, name -> value (None for a switch)."""
    body = text.split("pretrain_gpt.py \\\n", 1)[1]
    flags = {}
    for line in body.splitlines():
        name, _, value = line.strip().removesuffix("\\").strip().partition(" ")
        flags[name] = value or None
    return flags


# ---- megatron ---------------------------------------------------------------------------
def test_every_flag_tera_may_emit_is_megatron_lms():
    known = {ln.strip() for ln in FLAGS_FILE.read_text().splitlines() if ln.startswith("--")}
    assert len(known) > 500
    assert set(MEGATRON_FLAGS) <= known, sorted(set(MEGATRON_FLAGS) - known)


@pytest.mark.parametrize(
    "spec, gpus, text",
    [
        ("tiny-moe", 16, "tp=2,pp=2,ep=4,zero=1,mbs=2"),
        ("llama3-8b", 16, "tp=2,pp=2,cp=2,zero=3,recompute=full,order=tp-cp-pp-dp"),
        ("deepseek-v3", 64, "tp=1,pp=4,ep=16,zero=1,recompute=selective"),
    ],
)
def test_megatron_pastes_into_a_shell_and_uses_only_known_flags(spec, gpus, text):
    out = export(make_plan(text, spec=spec, gpus=gpus), "megatron")
    flags = megatron_flags(out)
    assert set(flags) <= set(MEGATRON_FLAGS)
    body = out.split("pretrain_gpt.py \\\n", 1)[1].splitlines()
    assert all(line.endswith(" \\") for line in body[:-1]) and not body[-1].endswith("\\")
    assert subprocess.run(["bash", "-n"], input=out, text=True).returncode == 0


def test_megatron_shape_and_layout_flags(moe_plan):
    flags = megatron_flags(export(moe_plan, "megatron"))
    assert flags["--num-layers"] == "4" and flags["--hidden-size"] == "128"
    assert flags["--num-query-groups"] == "2" and "--group-query-attention" in flags
    assert flags["--num-experts"] == "8" and flags["--moe-router-topk"] == "2"
    assert flags["--moe-layer-freq"] == "'[0,1,1,1]'"  # layer 0 dense
    assert flags["--moe-shared-expert-intermediate-size"] == "128"
    assert flags["--tensor-model-parallel-size"] == "2"
    assert flags["--pipeline-model-parallel-size"] == "2"
    assert flags["--expert-model-parallel-size"] == "4"
    assert "--sequence-parallel" in flags and "--use-distributed-optimizer" in flags
    assert flags["--micro-batch-size"] == "2" and flags["--global-batch-size"] == "64"
    assert "--use-tp-pp-dp-mapping" not in flags and "--recompute-granularity" not in flags


def test_megatron_mla_and_rank_order():
    flags = megatron_flags(export(make_plan("pp=4,ep=16", "deepseek-v3", gpus=64), "megatron"))
    assert "--multi-latent-attention" in flags
    assert (flags["--q-lora-rank"], flags["--kv-lora-rank"]) == ("1536", "512")
    assert (flags["--qk-head-dim"], flags["--qk-pos-emb-head-dim"]) == ("128", "64")
    assert "--moe-router-enable-expert-bias" in flags
    ordered = megatron_flags(export(make_plan("tp=2,pp=2,order=tp-cp-pp-dp"), "megatron"))
    assert "--use-tp-pp-dp-mapping" in ordered


def test_megatron_partitions():
    uneven = export(make_plan("pp=4,partition=2:3:3:2", layers=10), "megatron")
    flags = megatron_flags(uneven)
    assert flags["--decoder-first-pipeline-num-layers"] == "2"
    assert flags["--decoder-last-pipeline-num-layers"] == "2"
    # the middle stages differ (2 and 3 layers): the exact layout
    text = "pp=4,partition=1:2:3:2"
    flags = megatron_flags(export(make_plan(text, layers=8), "megatron"))
    assert flags["--pipeline-model-parallel-layout"] == "'Et|tt|ttt|ttL'"
    assert "--decoder-first-pipeline-num-layers" not in flags
    vpp = "pp=2,vpp=2,schedule=interleaved,partition=2:3:3:2"
    layout = megatron_flags(export(make_plan(vpp, layers=10), "megatron"))
    segments = layout["--pipeline-model-parallel-layout"].strip("'").split("|")
    assert segments == ["Ett", "ttt", "ttt", "ttL"]  # chunk order: chunk c on stage c % pp
    even = megatron_flags(export(make_plan("pp=2,vpp=2,schedule=interleaved"), "megatron"))
    assert even["--num-layers-per-virtual-pipeline-stage"] == "1"
    assert "--pipeline-model-parallel-layout" not in even


def test_megatron_recompute():
    full = megatron_flags(export(make_plan("pp=2,recompute=full"), "megatron"))
    assert full["--recompute-granularity"] == "full"
    assert (full["--recompute-method"], full["--recompute-num-layers"]) == ("uniform", "1")
    mixed = export(make_plan("pp=2,recompute=selective:none"), "megatron")
    assert megatron_flags(mixed)["--recompute-granularity"] == "selective"
    assert "# note: tera recomputes per stage (selective:none)" in mixed


def test_megatron_refuses_what_it_cannot_express():
    spec = load_spec("tiny-moe")
    geglu = dataclasses.replace(spec, ffn=FFNSpec("geglu", spec.ffn.hidden))
    with pytest.raises(ExportError, match=r"export\.megatron\.ffn\.kind: .*geglu"):
        export(make_plan("tp=1", spec=geglu), "megatron")
    with pytest.raises(ExportError, match="dp_replicate"):
        export(make_plan("tp=2,zero=3,dp_replicate=2"), "megatron")


# ---- torchtitan -------------------------------------------------------------------------
def test_torchtitan_is_toml_with_the_documented_keys(moe_plan):
    config = tomllib.loads(export(moe_plan, "torchtitan"))
    assert set(config) == set(TORCHTITAN_KEYS)
    for section, values in config.items():
        assert set(values) <= set(TORCHTITAN_KEYS[section]), section
    p, t = config["parallelism"], config["training"]
    product = 1
    for key in (
        "data_parallel_replicate_degree",
        "data_parallel_shard_degree",
        "tensor_parallel_degree",
        "pipeline_parallel_degree",
        "context_parallel_degree",
    ):
        product *= p[key]
    assert product == moe_plan.world_size
    assert p["expert_parallel_degree"] == 4 and p["pipeline_parallel_schedule"] == "1F1B"
    assert t["local_batch_size"] == 64 // 4 and t["global_batch_size"] == 64
    parts = p["module_fqns_per_model_part"]
    assert parts == [
        ["tok_embeddings", "layers.0", "layers.1"],
        ["layers.2", "layers.3", "norm", "output"],
    ]
    assert config["activation_checkpoint"]["mode"] == "none"


def test_torchtitan_refuses_expert_tensor_parallelism():
    with pytest.raises(ExportError, match="etp"):
        export(make_plan("tp=2,ep=4,etp=2"), "torchtitan")


def test_torchtitan_keys_are_its_config_fields(moe_plan):
    configs = pytest.importorskip(
        "torchtitan.config.configs", reason="torchtitan is not installed (optional)"
    )
    fields = {
        "training": configs.TrainingConfig,
        "parallelism": configs.ParallelismConfig,
    }
    config = tomllib.loads(export(moe_plan, "torchtitan"))
    for section, kind in fields.items():
        names = {f.name for f in dataclasses.fields(kind)}
        assert set(TORCHTITAN_KEYS[section]) <= names
        assert set(config[section]) <= names


# ---- deepspeed --------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["tp=2,pp=2,ep=4,zero=1,mbs=2", "tp=1,zero=3,dp_replicate=2"])
def test_deepspeed_batch_arithmetic(text):
    plan = make_plan(text)
    config = json.loads(export(plan, "deepspeed"))
    micro, accum = config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]
    assert config["train_batch_size"] == micro * accum * plan.layout.dp == plan.global_batch
    assert config["zero_optimization"]["stage"] == plan.layout.zero
    assert config["bf16"] == {"enabled": True} and config["gradient_clipping"] > 0


def test_deepspeed_refuses_what_it_cannot_run():
    with pytest.raises(ExportError, match="pipeline engine"):
        export(make_plan("pp=2,zero=2"), "deepspeed")
    with pytest.raises(ExportError, match="dp_replicate"):
        export(make_plan("zero=1,dp_replicate=2"), "deepspeed")


def test_deepspeed_config_class_loads_it(moe_plan, monkeypatch):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (optional)")
    import deepspeed.comm
    from deepspeed.runtime.config import DeepSpeedConfig

    monkeypatch.setattr(deepspeed.comm, "get_rank", lambda *a, **k: 0)

    class MPU:  # the data-parallel world DeepSpeed checks the batch arithmetic against
        def get_data_parallel_world_size(self):
            return moe_plan.layout.dp

    config = DeepSpeedConfig(json.loads(export(moe_plan, "deepspeed")), mpu=MPU())
    assert config.train_batch_size == moe_plan.global_batch
    assert config.gradient_accumulation_steps == 64 // (4 * 2)
    assert config.zero_optimization_stage == 1 and config.bfloat16_config.enabled
    assert config.gradient_clipping == 1.0


# ---- launchers --------------------------------------------------------------------------
def test_torchrun_one_line_per_node(moe_plan):
    lines = [ln for ln in export(moe_plan, "torchrun").splitlines() if ln.startswith("torchrun")]
    assert len(lines) == moe_plan.cluster.num_nodes == 2
    for node, line in enumerate(lines):
        assert f"--nnodes 2 --nproc-per-node 8 --node-rank {node} " in line
        assert line.endswith("--no-python tera-run plan.json")


def test_slurm_script_passes_bash_n(moe_plan):
    script = export(moe_plan, "slurm", plan_path="runs/plan.json")
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    sbatch = dict(re.findall(r"^#SBATCH --([a-z-]+)=?(\S*)$", script, re.M))
    assert sbatch["nodes"] == "2" and sbatch["ntasks-per-node"] == "8"
    assert sbatch["gpus-per-node"] == "8"
    assert sbatch["switches"] == "1"  # 16 GPUs fit under one leaf of 4 nodes
    assert "scontrol show hostnames" in script and "srun" in script
    assert script.rstrip().endswith("tera-run runs/plan.json")
    big = export(make_plan("tp=8,pp=4", spec="llama3-8b", gpus=256), "slurm")
    assert "#SBATCH --switches=8\n" in big  # 32 nodes, 4 per leaf


def test_kubernetes_manifest_has_the_required_fields():
    plan = make_plan("tp=8,pp=4", spec="llama3-8b", gpus=128)  # a stage: 4 nodes, one leaf
    manifest = yaml.safe_load(export(plan, "kubernetes"))
    assert manifest["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and manifest["kind"] == "JobSet"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", manifest["metadata"]["name"])
    (job,) = manifest["spec"]["replicatedJobs"]
    assert job["replicas"] == 4 and job["template"]["spec"]["parallelism"] == 4
    annotations = job["template"]["metadata"]["annotations"]
    assert "alpha.jobset.sigs.k8s.io/exclusive-topology" in annotations
    pod = job["template"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] and container["name"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert job["replicas"] * job["template"]["spec"]["completions"] == plan.cluster.num_nodes
    assert "--nnodes 16 --nproc-per-node 8" in container["command"][-1]


# ---- command line -----------------------------------------------------------------------
def test_cli_formats_match():
    assert cli.EXPORT_FORMATS == FORMATS


def test_cli_writes_every_format(moe_plan, tmp_path, capsys):
    path = tmp_path / "plan.json"
    moe_plan.save(path)
    for fmt in FORMATS:
        out = tmp_path / f"out.{fmt}"
        assert cli.main(["export", str(path), "--format", fmt, "-o", str(out)]) == 0
        assert out.read_text() == export(moe_plan, fmt, plan_path=str(path))
    assert cli.main(["export", str(path), "--format", "deepspeed"]) == 0
    assert json.loads(capsys.readouterr().out)["train_batch_size"] == 64


@pytest.mark.parametrize(
    "args, message",
    [
        (["export", "PLAN", "--format", "nemo"], "invalid choice: 'nemo'"),
        (["export", "missing.json", "--format", "slurm"], "not found"),
        (["export", "ETP", "--format", "torchtitan"], "export.torchtitan.etp"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(args, message, tmp_path):
    plan = tmp_path / "plan.json"
    make_plan("tp=2,pp=2,ep=4").save(plan)
    etp = tmp_path / "etp.json"
    make_plan("tp=2,ep=4,etp=2").save(etp)
    args = [{"PLAN": str(plan), "ETP": str(etp)}.get(a, a) for a in args]
    tera_plan = shutil.which("tera-plan")
    assert tera_plan, "tera-plan is not installed"
    result = subprocess.run([tera_plan, *args], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_torchtitan_zero0_keeps_the_shard_axis_for_experts():
    text = export(make_plan("ep=8,zero=0"), "torchtitan")
    parallelism = tomllib.loads(text)["parallelism"]
    assert parallelism["data_parallel_shard_degree"] == 16  # EP borrows 8 of these ranks
    assert parallelism["fsdp_reshard_after_forward"] == "never"
    assert "# note: zero=0" in text
