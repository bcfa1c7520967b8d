"""The Megatron-LM `pretrain_gpt.py` arguments of a plan.

Every flag is spelled as Megatron-LM's argument parser spells it; the set tera may emit is
MEGATRON_FLAGS, and a test checks it against ../shared/reference/megatron-lm-flags.txt.
The output is a shell command: comment lines first, then `torchrun ... pretrain_gpt.py \\`
and one flag per line, backslash-continued. Data, tokenizer, optimizer and schedule flags
are the user's (a comment says so); tera owns the model shape and the layout.

Mapping decisions (Megatron-LM's documentation of each flag):
  - pipeline partition: an even split needs no flag (with vpp,
    --num-layers-per-virtual-pipeline-stage); with vpp=1 and equal middle stages, uneven
    first and last stages are --decoder-first/last-pipeline-num-layers; any other split is
    written exactly as --pipeline-model-parallel-layout, one `|`-separated segment per
    virtual chunk in chunk order (E: embedding, t: one transformer layer, L: loss head).
  - recompute: Megatron sets one granularity for all stages; per-stage modes that differ
    become the strongest mode with a comment (exports.strongest_recompute). full is
    --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
    (every layer checkpointed on its own), selective is --recompute-granularity selective.
  - ZeRO: 1 is --use-distributed-optimizer (dp_replicate > 1 as
    --num-distributed-optimizer-instances); 2 and 3 are Megatron FSDP with
    --data-parallel-sharding-strategy optim_grads / optim_grads_params.
  - rank order tp-cp-pp-dp is --use-tp-pp-dp-mapping; the default is Megatron's own.
"""

from __future__ import annotations

import shlex

from tera.planner.exports import MASTER_PORT, ExportError, strongest_recompute, summary
from tera.planner.plan import Plan

MEGATRON_FLAGS = (
    "--num-layers",
    "--hidden-size",
    "--num-attention-heads",
    "--ffn-hidden-size",
    "--seq-length",
    "--max-position-embeddings",
    "--kv-channels",
    "--group-query-attention",
    "--num-query-groups",
    "--multi-latent-attention",
    "--q-lora-rank",
    "--kv-lora-rank",
    "--qk-head-dim",
    "--qk-pos-emb-head-dim",
    "--v-head-dim",
    "--qk-layernorm",
    "--add-qkv-bias",
    "--disable-bias-linear",
    "--normalization",
    "--norm-epsilon",
    "--swiglu",
    "--squared-relu",
    "--position-embedding-type",
    "--rotary-base",
    "--untie-embeddings-and-output-weights",
    "--window-size",
    "--num-experts",
    "--moe-router-topk",
    "--moe-ffn-hidden-size",
    "--moe-shared-expert-intermediate-size",
    "--moe-layer-freq",
    "--moe-router-score-function",
    "--moe-router-enable-expert-bias",
    "--moe-router-topk-scaling-factor",
    "--moe-router-pre-softmax",
    "--moe-aux-loss-coeff",
    "--moe-expert-capacity-factor",
    "--moe-token-dispatcher-type",
    "--moe-grouped-gemm",
    "--tensor-model-parallel-size",
    "--pipeline-model-parallel-size",
    "--num-layers-per-virtual-pipeline-stage",
    "--decoder-first-pipeline-num-layers",
    "--decoder-last-pipeline-num-layers",
    "--pipeline-model-parallel-layout",
    "--context-parallel-size",
    "--expert-model-parallel-size",
    "--expert-tensor-parallel-size",
    "--sequence-parallel",
    "--use-tp-pp-dp-mapping",
    "--use-distributed-optimizer",
    "--num-distributed-optimizer-instances",
    "--use-megatron-fsdp",
    "--data-parallel-sharding-strategy",
    "--micro-batch-size",
    "--global-batch-size",
    "--recompute-granularity",
    "--recompute-method",
    "--recompute-num-layers",
    "--bf16",
    "--fp8-format",
)
ACTIVATIONS = {"swiglu": "--swiglu", "squared_relu": "--squared-relu", "gelu": None}
POSITIONS = {"rope": "rope", "learned": "learned_absolute", "none": "none"}


def megatron(plan: Plan) -> str:
    notes: list[str] = []
    flags = _model(plan, notes) + _parallel(plan, notes) + _training(plan, notes)
    unknown = [name for name, _ in flags if name not in MEGATRON_FLAGS]
    assert not unknown, f"flags missing from MEGATRON_FLAGS: {unknown}"
    c = plan.cluster
    lines = [
        f"# {summary(plan)}",
        *(f"# note: {note}" for note in notes),
        "# add your data, tokenizer, optimizer and schedule flags (--data-path, "
        "--tokenizer-type, --lr, --train-iters, ...).",
        f"# run on each of the {c.num_nodes} nodes with NODE_RANK set (0 on MASTER_ADDR).",
        f"torchrun --nnodes {c.num_nodes} --nproc-per-node {c.gpus_per_node} "
        f'--node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port {MASTER_PORT} '
        "pretrain_gpt.py \\",
    ]
    body = [f"    {name}" + ("" if value is None else f" {value}") for name, value in flags]
    return "\n".join(lines + [line + " \\" for line in body[:-1]] + body[-1:]) + "\n"


Flags = list[tuple[str, "str | None"]]


def _refuse(field: str, problem: str, fix: str):
    raise ExportError("megatron", field, problem, fix)


def _model(plan: Plan, notes: list[str]) -> Flags:
    s, a = plan.spec, plan.spec.attention
    f: Flags = [
        ("--num-layers", str(s.layers)),
        ("--hidden-size", str(s.hidden)),
        ("--num-attention-heads", str(a.heads)),
        ("--ffn-hidden-size", str(s.ffn.hidden)),
        ("--seq-length", str(plan.seq_len)),
        ("--max-position-embeddings", str(s.max_seq_len)),
    ]
    if a.kind == "mla":
        f.append(("--multi-latent-attention", None))
        if a.q_lora_rank is not None:
            f.append(("--q-lora-rank", str(a.q_lora_rank)))
        f += [
            ("--kv-lora-rank", str(a.kv_lora_rank)),
            ("--qk-head-dim", str(a.qk_nope_head_dim)),
            ("--qk-pos-emb-head-dim", str(a.qk_rope_head_dim)),
            ("--v-head-dim", str(a.v_head_dim)),
        ]
    else:
        if a.head_dim * a.heads != s.hidden:
            f.append(("--kv-channels", str(a.head_dim)))
        if a.kv_heads != a.heads:
            f += [("--group-query-attention", None), ("--num-query-groups", str(a.kv_heads))]
    if a.qk_norm:
        f.append(("--qk-layernorm", None))
    if a.qkv_bias:
        f.append(("--add-qkv-bias", None))
    if a.sliding_window is not None:  # Megatron's window is (left, right) tokens
        f.append(("--window-size", shlex.quote(f"({a.sliding_window}, 0)")))
    f += [
        ("--disable-bias-linear", None),  # tera's linears have no bias (but qkv_bias)
        ("--normalization", "RMSNorm"),
        ("--norm-epsilon", f"{s.norm_eps:g}"),
    ]
    if s.ffn.kind not in ACTIVATIONS:
        _refuse(
            "ffn.kind",
            f"Megatron-LM has no {s.ffn.kind} flag",
            "export a swiglu, squared_relu or gelu model",
        )
    if ACTIVATIONS[s.ffn.kind]:
        f.append((ACTIVATIONS[s.ffn.kind], None))
    if s.position not in POSITIONS:
        _refuse("position", f"Megatron-LM has no {s.position} position embedding", "use rope")
    f.append(("--position-embedding-type", POSITIONS[s.position]))
    if s.position == "rope":
        f.append(("--rotary-base", f"{s.rope_theta:g}"))
    if not s.tie_embeddings:
        f.append(("--untie-embeddings-and-output-weights", None))
    if s.moe is not None:
        f += _moe(plan, notes)
    return f


def _moe(plan: Plan, notes: list[str]) -> Flags:
    s, m = plan.spec, plan.spec.moe
    pattern = [int(s.is_moe_layer(i)) for i in range(s.layers)]
    f: Flags = [
        ("--num-experts", str(m.experts)),
        ("--moe-router-topk", str(m.top_k)),
        ("--moe-ffn-hidden-size", str(m.expert_hidden)),
        ("--moe-layer-freq", shlex.quote("[" + ",".join(map(str, pattern)) + "]")),
        ("--moe-router-score-function", m.score),
        ("--moe-aux-loss-coeff", f"{m.aux_loss_coeff:g}"),
        ("--moe-token-dispatcher-type", "alltoall"),
        ("--moe-grouped-gemm", None),
    ]
    if m.shared_experts:
        f.append(("--moe-shared-expert-intermediate-size", str(m.shared_experts * m.shared_hidden)))
    if m.expert_bias:
        f.append(("--moe-router-enable-expert-bias", None))
    if m.route_scale != 1.0:
        f.append(("--moe-router-topk-scaling-factor", f"{m.route_scale:g}"))
    if m.capacity_factor is not None:
        f.append(("--moe-expert-capacity-factor", f"{m.capacity_factor:g}"))
    if not m.normalize_top_k:
        if m.score == "softmax":  # softmax over all experts, then top-k: not renormalised
            f.append(("--moe-router-pre-softmax", None))
        else:
            notes.append(
                "the plan's sigmoid router does not renormalise the top-k weights; "
                "check Megatron's sigmoid top-k normalisation for your version"
            )
    return f


def _parallel(plan: Plan, notes: list[str]) -> Flags:
    lay = plan.layout
    f: Flags = [
        ("--tensor-model-parallel-size", str(lay.tp)),
        ("--pipeline-model-parallel-size", str(lay.pp)),
        ("--context-parallel-size", str(lay.cp)),
        ("--expert-model-parallel-size", str(lay.ep)),
        ("--expert-tensor-parallel-size", str(lay.etp)),
    ]
    f += _partition(plan)
    if lay.tp > 1:
        f.append(("--sequence-parallel", None))
    if lay.order == "tp-cp-pp-dp":
        f.append(("--use-tp-pp-dp-mapping", None))
    if lay.zero == 1:
        f.append(("--use-distributed-optimizer", None))
        if lay.dp_replicate > 1:
            f.append(("--num-distributed-optimizer-instances", str(lay.dp_replicate)))
    elif lay.zero in (2, 3):
        if lay.dp_replicate > 1:
            _refuse(
                "dp_replicate",
                f"zero={lay.zero} with dp_replicate={lay.dp_replicate} "
                "(hybrid-sharded FSDP) is not mapped to Megatron",
                "use zero=1 or dp_replicate=1",
            )
        strategy = "optim_grads" if lay.zero == 2 else "optim_grads_params"
        f += [("--use-megatron-fsdp", None), ("--data-parallel-sharding-strategy", strategy)]
    elif lay.dp_replicate > 1:
        notes.append("zero=0: dp_replicate needs no flag (plain data parallelism)")
    return f


def _partition(plan: Plan) -> Flags:
    lay, layers = plan.layout, plan.spec.layers
    parts = list(lay.partition)
    if len(set(parts)) == 1:
        return [("--num-layers-per-virtual-pipeline-stage", str(parts[0]))] if lay.vpp > 1 else []
    middle = parts[1:-1]
    if lay.vpp == 1 and len(set(middle)) <= 1:
        return [
            ("--decoder-first-pipeline-num-layers", str(parts[0])),
            ("--decoder-last-pipeline-num-layers", str(parts[-1])),
        ]
    assert sum(parts) == layers
    segments = ["t" * n for n in parts]
    segments[0], segments[-1] = "E" + segments[0], segments[-1] + "L"
    return [("--pipeline-model-parallel-layout", shlex.quote("|".join(segments)))]


def _training(plan: Plan, notes: list[str]) -> Flags:
    f: Flags = [
        ("--micro-batch-size", str(plan.layout.mbs)),
        ("--global-batch-size", str(plan.global_batch)),
    ]
    mode, note = strongest_recompute(plan)
    if note:
        notes.append(note)
    if mode == "selective":
        f.append(("--recompute-granularity", "selective"))
    elif mode == "full":
        f += [
            ("--recompute-granularity", "full"),
            ("--recompute-method", "uniform"),
            ("--recompute-num-layers", "1"),
        ]
    if plan.precision in ("bf16", "fp8"):
        f.append(("--bf16", None))
    if plan.precision == "fp8":
        f.append(("--fp8-format", "hybrid"))  # e4m3 forward, e5m2 gradients
    return f
