"""The Trainer: build the planned model, parallelize it as the plan says, train steps.

Order of parallelization (as torchtitan; each step sees the modules the previous left):
  0. refuse what the runtime cannot run exactly (`check_supported`, at load time);
  1. build the whole model, fp32, with torch.manual_seed(seed): the initial parameters are
     those of tera.models.build(spec) after the same seed whatever the layout (this needs
     the whole model in host memory once per rank, a known limitation for very large
     models, which would need meta-device init and a sharded load instead);
  2. pipeline split (pipeline.py): this pp rank's chunks, parameter FQNs unchanged;
  3. tensor + sequence parallelism (tensor_parallel.py);
  4. expert parallelism and expert tensor parallelism (expert_parallel.py);
  5. context parallelism: refused (check_supported says why);
  6. activation checkpointing by the stage's recompute mode (recompute.py);
  7. FSDP2 / ZeRO by the plan's zero stage (data_parallel.py).

Training step: the rank's rows of the global batch are cut into micro-batches of mbs
sequences (global_batch / (dp * mbs) of them) that run through the pipeline schedule
(pipeline.py) or, without pipeline parallelism, one after another. Each micro-batch's loss
is its mean token cross-entropy plus its MoE auxiliary losses, exactly as the 1-rank model
computes them for that micro-batch; the step's loss is the mean over all micro-batches of
the global batch, so gradients are those of that mean: every micro-batch's loss is divided
by the micro-batch count and data-parallel reductions average over dp.

MoE auxiliary loss: every MoE block's Switch loss reaches the backward where it is computed,
attached to the block's output (pipeline.AttachAuxLoss, as Megatron-LM's
MoEAuxLossAutoScaler), so pipeline stages need not send it on; under sequence parallelism
each tp rank computes its share of the whole sequence's loss (tensor_parallel.py). The
logged loss sums the aux values over tp and pp and the cross-entropy once per tp group.

ZeRO applies where there is data parallelism to shard over (dp > 1 or edp_full > 1); a
layout without any runs as zero=0, which is the same arithmetic without FSDP's copies.

Optimizer (defaults documented here, as the DESIGN asks): AdamW, betas (0.9, 0.95),
eps 1e-8, weight decay 0.1 on matrices only (parameters of 2 or more dims, experts' 3-D
stacks included; norms and biases take none), learning rate `lr` (3e-4) reached by a linear
warm-up over `warmup_steps` (10), then a cosine decay to 10 % of it at `total_steps`
(1000), flat after. Gradients are clipped to norm 1.0 by the true global norm: the squared
norms of every parameter's local shard, summed over the whole world with each shard
counted once (a shard held by k ranks, replicas, adds 1/k on each), so that DTensor
shards, pipeline stages and expert shards all count exactly once.

Precision: fp32 on CPU whatever the plan says (CPU runs are for checking, fp32 is exact
enough to compare layouts). On GPU with a bf16 or fp8 plan: bf16 mixed precision, through
FSDP2's MixedPrecisionPolicy (bf16 parameters in compute, fp32 gradient reduction and fp32
master weights) for zero >= 1, and torch.autocast for zero = 0.

Checkpoints: state_dict / load_state_dict (Stateful) use
torch.distributed.checkpoint.state_dict with the unsplit model's FQNs and flattened
optimizer state, plus the schedule's position (`step`), so that a checkpoint written under
one plan loads under another.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor

from tera.models import build
from tera.models.moe import MoE
from tera.planner.errors import InputError
from tera.runtime.data_parallel import GradientReducer, apply_fsdp, set_microbatch
from tera.runtime.expert_parallel import apply_expert_parallel
from tera.runtime.pipeline import build_schedule, split
from tera.runtime.recompute import apply_recompute
from tera.runtime.tensor_parallel import apply_tensor_parallel

BETAS = (0.9, 0.95)
EPS = 1e-8
WEIGHT_DECAY = 0.1
MIN_LR_RATIO = 0.1
MAX_GRAD_NORM = 1.0


@dataclass(frozen=True)
class StepResult:
    loss: float  # the global mean loss of the step, identical on every rank
    grad_norm: float  # the global gradient norm before clipping
    tokens: int  # tokens of the global batch


class UnsupportedPlan(InputError):
    """A valid plan the runtime cannot run exactly; one line naming the field and the fix."""

    prefix = "plan."


def check_supported(plan) -> None:
    """Refuse, at load time, what the runtime would run wrongly or not at all."""
    L, spec = plan.layout, plan.spec
    if L.cp > 1:
        raise UnsupportedPlan(
            "layout.cp",
            f"cp={L.cp}: torch's context_parallel ring attention handles only the CUDA "
            "SDPA kernels (flash, efficient, cudnn), so no path runs on CPU/gloo, and tera's "
            "attention derives RoPE positions from the local sequence",
            "use cp=1",
        )
    if L.tp > 1:
        a = spec.attention
        problems = [
            (a.kind == "mla", "multi-head latent attention under tp is not implemented"),
            (a.kv_heads % L.tp != 0, f"tp={L.tp} does not divide the {a.kv_heads} KV heads"),
            (spec.position in ("learned", "alibi"), f"{spec.position} positions under tp"),
            (spec.tie_embeddings, "tied embeddings under tp are not implemented"),
            (plan.seq_len % L.tp != 0, f"sequence {plan.seq_len} does not split over tp"),
            (
                spec.moe is not None and spec.moe.capacity_factor is not None,
                "a capacity factor under sequence parallelism would cap each sequence "
                "shard, not the micro-batch",
            ),
        ]
        for bad, problem in problems:
            if bad:
                raise UnsupportedPlan("layout.tp", problem, "use tp=1 or change the model")
    microbatches = plan.global_batch // (L.dp * L.mbs)
    if L.pp > 1 and microbatches < L.pp:
        raise UnsupportedPlan(
            "layout.pp",
            f"{microbatches} micro-batches (global_batch / (dp * mbs)) for pp={L.pp}: "
            "torch's 1F1B schedules need at least one per stage",
            "raise the global batch or lower mbs or dp",
        )
    if L.pp > 1 and spec.tie_embeddings:
        raise UnsupportedPlan(
            "layout.pp", "tied embeddings across pipeline stages are not implemented", "use pp=1"
        )


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to 1 over `warmup_steps`, cosine to MIN_LR_RATIO at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    def __init__(
        self,
        plan,
        meshes,
        seed: int = 0,
        lr: float = 3e-4,
        warmup_steps: int = 10,
        total_steps: int = 1000,
        device=None,
        balanced_routing: bool = False,
    ):
        """balanced_routing: the model's fixed balanced expert assignment instead of the
        learned top-k (tera.models.Transformer), so that every expert gets the same rows:
        the communication test compares measured bytes with the cost model's, which
        assumes balanced routing."""
        check_supported(plan)
        self.plan, self.meshes = plan, meshes
        L = plan.layout
        if device is None:
            cuda = meshes.dense.device_type == "cuda"
            device = torch.device("cuda", torch.cuda.current_device()) if cuda else "cpu"
        self.device = torch.device(device)
        self.dp = meshes.dp_size
        self.microbatches = plan.global_batch // (self.dp * L.mbs)
        bf16 = self.device.type == "cuda" and plan.precision != "fp32"
        sharded = meshes.size("dp") > 1 or meshes.size("edp_full") > 1
        self.zero = L.zero if sharded else 0

        torch.manual_seed(seed)
        model = build(
            plan.spec, device="cpu", dtype=torch.float32, balanced_routing=balanced_routing
        ).to(self.device)
        chunks, self.model = split(model, plan, meshes.pp_rank)
        self.chunks = [chunk for _, chunk in chunks]
        tp_partial: set[str] = set()
        if L.tp > 1:
            # FSDP2 warns when a module returns an autograd view, which an in-place op could
            # detach from its hooks; a tensor-parallel head's logits are one (to_local), and
            # nothing modifies them in place.
            warnings.filterwarnings("ignore", r"FSDP2-wrapped module .* returned a view tensor")
            for chunk in self.chunks:
                tp_partial |= apply_tensor_parallel(chunk, meshes.mesh("tp"))
        if L.ep > 1 or L.etp > 1:
            for block in self.model.layers.values():
                if isinstance(block.ffn, MoE):
                    apply_expert_parallel(block.ffn.experts, meshes.expert["ep", "etp"])
        recompute = plan.stages()[meshes.pp_rank]["recompute"]
        for chunk in self.chunks:
            apply_recompute(chunk, recompute)
        self._autocast = contextlib.nullcontext
        if self.zero > 0:
            mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if bf16 else None
            for chunk in self.chunks:
                apply_fsdp(chunk, meshes, self.zero, mp or MixedPrecisionPolicy())
        elif bf16:
            self._autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)
        self.reducer = GradientReducer(self.model, meshes, self.zero, tp_partial)

        self.optimizer = torch.optim.AdamW(_param_groups(self.model), lr=lr, betas=BETAS, eps=EPS)
        self.lr, self.warmup_steps, self.total_steps = lr, warmup_steps, total_steps
        self.step = 0  # optimizer steps taken: the schedule's position
        self._schedule_lr()
        self.schedule = None
        if L.pp > 1:
            hidden = torch.bfloat16 if bf16 and self.zero > 0 else torch.float32
            logits = torch.bfloat16 if bf16 else torch.float32
            self.schedule = build_schedule(
                chunks,
                plan,
                meshes.group("pp"),
                self.device,
                self._loss,
                self.microbatches,
                (hidden, logits),
            )
        self._ce: list[torch.Tensor] = []

    # ---- one step ------------------------------------------------------------------------
    def train_step(self, tokens_BS1: torch.Tensor) -> StepResult:
        """One optimizer step on this rank's rows [global_batch / dp, seq_len + 1]."""
        loss = self.forward_backward(tokens_BS1)
        grad_norm = self.optimizer_step()
        return StepResult(loss, grad_norm, self.plan.global_batch * self.plan.seq_len)

    def forward_backward(self, tokens_BS1: torch.Tensor) -> float:
        """Forward and backward of every micro-batch, gradients reduced as the layout
        needs (not clipped); returns the step's global mean loss."""
        rows = self.plan.global_batch // self.dp
        if tuple(tokens_BS1.shape) != (rows, self.plan.seq_len + 1):
            raise ValueError(
                f"expected this rank's {rows} rows of {self.plan.seq_len + 1} tokens, "
                f"got {tuple(tokens_BS1.shape)}"
            )
        tokens_BS1 = tokens_BS1.to(self.device)
        inputs_BS, targets_BS = tokens_BS1[:, :-1], tokens_BS1[:, 1:]
        self._ce.clear()
        for chunk in self.chunks:
            chunk.aux_values.clear()
            chunk.aux_scale = 1.0 / self.microbatches
        with self._autocast():
            if self.schedule is not None:
                self.schedule.step(inputs_BS, target=targets_BS)
            else:
                self._accumulate(inputs_BS, targets_BS)
        self.reducer.finish()
        return self._global_loss()

    def _accumulate(self, inputs_BS, targets_BS) -> None:
        mbs, (chunk,) = self.plan.layout.mbs, self.chunks
        for i in range(self.microbatches):
            set_microbatch([chunk], self.zero, last=i == self.microbatches - 1)
            rows = slice(i * mbs, (i + 1) * mbs)
            self._loss(chunk(inputs_BS[rows]), targets_BS[rows]).backward()

    def _loss(self, logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
        """A micro-batch's cross-entropy (as LMHead computes it), weighted for the mean."""
        ce = F.cross_entropy(logits_BSV.flatten(0, 1).float(), targets_BS.flatten())
        self._ce.append(ce.detach())
        return ce / self.microbatches

    def _global_loss(self) -> float:
        """Mean over the global batch's micro-batches of cross-entropy plus aux losses:
        the cross-entropy counted once per tp group (every tp rank holds it), aux shares
        summed over tp and pp."""
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        ce = sum(self._ce, zero) if self.meshes.local_rank("tp") == 0 else zero
        aux = sum((a for c in self.chunks for a in c.aux_values), zero)
        total = torch.stack([ce.double(), aux.double()])
        dist.all_reduce(total)
        return float(total.sum()) / (self.microbatches * self.dp)

    def optimizer_step(self) -> float:
        """Clip the gradients by their global norm, step AdamW and the schedule, clear the
        gradients; returns the norm before clipping."""
        grad_norm = self.clip_gradients()
        self.apply_gradients()
        return grad_norm

    def apply_gradients(self) -> None:
        """Step AdamW and the schedule with the gradients as they are, then clear them."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self._schedule_lr()

    def discard_gradients(self) -> None:
        """Clear the gradients without a step (a skipped step): parameters, optimizer state
        and the schedule's position stay as they are."""
        self.optimizer.zero_grad(set_to_none=True)

    def _schedule_lr(self) -> None:
        """Set the rate the next optimizer step applies (as torch's LR schedulers do, the
        param groups always hold it)."""
        factor = lr_factor(self.step, self.warmup_steps, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * factor

    def clip_gradients(self) -> float:
        """Scale the gradients to norm MAX_GRAD_NORM if above; returns the global norm before
        clipping, the same on every rank: NaN or inf when a gradient is not finite, and
        then the gradients are no use (the run loop skips or stops such a step)."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        stage_ranks = dist.get_world_size() // self.meshes.pp_size
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for g in grads:
            copies = stage_ranks
            if isinstance(g, DTensor):
                mesh = g.device_mesh
                # distinct shards: the product over non-replicated mesh dimensions (a
                # _StridedShard, FSDP over TP, is no `is_shard()` in torch 2.13)
                held = math.prod(
                    mesh.size(i) for i, p in enumerate(g.placements) if not p.is_replicate()
                )
                copies = stage_ranks // held
                g = g.to_local()
            total += g.detach().double().square().sum() / copies
        dist.all_reduce(total)
        norm = float(total.sqrt())
        scale = MAX_GRAD_NORM / (norm + 1e-6)
        if scale < 1.0:
            for g in grads:
                g.mul_(scale)
        return norm

    # ---- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        options = StateDictOptions(flatten_optimizer_state_dict=True)
        return {
            "model": get_model_state_dict(self.model, options=options),
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer, options=options),
            # the schedule's position alone: its shape is the Trainer's arguments, and
            # param groups differ between plans (one per DTensor mesh)
            "scheduler": {"step": self.step},
        }

    def load_state_dict(self, state: dict) -> None:
        options = StateDictOptions(flatten_optimizer_state_dict=True)
        set_model_state_dict(self.model, state["model"], options=options)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=options)
        self.step = int(state["scheduler"]["step"])
        self._schedule_lr()

    def full_state_dict(self, grads: bool = False) -> dict[str, torch.Tensor]:
        """Every parameter (or, with `grads`, its gradient), whole, fp32 on the CPU, keyed
        by the unsplit model's FQN, on every rank (for tests: collective over the world)."""
        mine = {}
        for name, p in self.model.named_parameters():
            t = p.grad if grads else p
            if t is None:
                continue
            whole = t.full_tensor() if isinstance(t, DTensor) else t
            mine[name] = whole.detach().float().cpu().clone()
        stages: list[dict] = [None] * self.meshes.pp_size
        dist.all_gather_object(stages, mine, group=self.meshes.group("pp"))
        return {name: t for stage in stages for name, t in stage.items()}


def _param_groups(model: torch.nn.Module) -> list[dict]:
    """AdamW groups: decay for matrices only; DTensors of one mesh together, so that each
    group's foreach kernels see one kind of tensor."""
    groups: dict[tuple, list] = {}
    for p in model.parameters():
        mesh = p.device_mesh if isinstance(p, DTensor) else None
        groups.setdefault((p.dim() >= 2, mesh), []).append(p)
    return [
        {"params": params, "weight_decay": WEIGHT_DECAY if decay else 0.0}
        for (decay, _), params in groups.items()
    ]
