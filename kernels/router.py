"""Fused MoE gating: scores, top-k selection, weight normalisation, per-expert counts.

Shape legend: T tokens, E experts, K top-k.

  scores_TE      softmax over experts of the fp32 logits (Mixtral, Qwen), or a sigmoid per
                 expert (DeepSeek-V3, arXiv 2412.19437 Sec 2.1.2)
  select_TE      scores_TE + bias_E: the optional bias steers selection (DeepSeek-V3's
                 auxiliary-loss-free balancing) but never enters the weights
  expert_idx_TK  the K experts of largest select_TE, best first (int64)
  weight_TK      scores_TE at those experts, divided by their sum when `normalize`, times
                 `scale` (fp32)
  counts_E       rows routed to each expert (int32); they sum to T*K

Only weight_TK is differentiable (with respect to the logits); the choice is not.

The kernel runs one program per block of tokens with every expert of a token in registers,
picks the top K by K rounds of argmax (a tie goes to the lower expert index) and adds the
block's per-expert counts to counts_E with one atomic per expert, not one per choice, so
that a skewed routing does not serialise on the hot expert's counter.
"""

from __future__ import annotations

import torch

from tera.kernels._triton import jit, next_power_of_2, tl

SCORES = ("softmax", "sigmoid")
_MIN_SUM = 1e-20  # floor of the normaliser (k sigmoid scores can all underflow to 0);
# the kernels spell it out: a @triton.jit function reads no Python globals


# -- Triton -----------------------------------------------------------------------------
@jit
def _scores(logits, SIGMOID: tl.constexpr):
    """Gate scores of a (BLOCK_T, BLOCK_E) tile whose padding experts hold -inf."""
    if SIGMOID:
        return 1.0 / (1.0 + tl.exp(-logits))
    p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    return p / tl.sum(p, axis=1)[:, None]


@jit
def _load_scores(logits_ptr, tokens, experts, T, E, SIGMOID: tl.constexpr):
    in_e = experts < E
    mask = (tokens < T)[:, None] & in_e[None, :]
    offsets = tokens[:, None].to(tl.int64) * E + experts[None, :]
    logits = tl.load(logits_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    return _scores(tl.where(in_e[None, :], logits, -float("inf")), SIGMOID)


@jit
def _route_kernel(
    logits_ptr,
    bias_ptr,
    idx_ptr,
    weight_ptr,
    counts_ptr,
    T,
    E,
    K,
    scale,
    SIGMOID: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, BLOCK_E)
    choices = tl.arange(0, BLOCK_K)
    in_t = tokens < T
    in_e = experts < E
    scores = _load_scores(logits_ptr, tokens, experts, T, E, SIGMOID)
    select = scores
    if HAS_BIAS:
        select = select + tl.load(bias_ptr + experts, mask=in_e, other=0.0).to(tl.float32)[None, :]
    select = tl.where(in_e[None, :], select, -float("inf"))
    idx = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    weight = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for k in range(K):
        best = tl.argmax(select, axis=1)
        hit = experts[None, :] == best[:, None]
        column = choices[None, :] == k
        idx = tl.where(column, best[:, None], idx)
        weight = tl.where(column, tl.sum(tl.where(hit, scores, 0.0), axis=1)[:, None], weight)
        counts += tl.sum((hit & in_t[:, None]).to(tl.int32), axis=0)
        select = tl.where(hit, -float("inf"), select)
    if NORMALIZE:
        weight = weight / tl.maximum(tl.sum(weight, axis=1), 1e-20)[:, None]
    out = tokens[:, None].to(tl.int64) * K + choices[None, :]
    mask = in_t[:, None] & (choices < K)[None, :]
    tl.store(idx_ptr + out, idx.to(tl.int64), mask=mask)
    tl.store(weight_ptr + out, weight * scale, mask=mask)
    tl.atomic_add(counts_ptr + experts, counts, mask=in_e & (counts > 0))


@jit
def _route_backward_kernel(
    logits_ptr,
    idx_ptr,
    dweight_ptr,
    dlogits_ptr,
    T,
    E,
    K,
    scale,
    SIGMOID: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, BLOCK_E)
    in_t = tokens < T
    scores = _load_scores(logits_ptr, tokens, experts, T, E, SIGMOID)
    # First pass: the raw weights' sum and the gradient's projection on them, which
    # normalisation couples into every choice's gradient.
    total = tl.zeros((BLOCK_T,), dtype=tl.float32)
    projection = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for k in range(K):
        chosen = tl.load(idx_ptr + tokens.to(tl.int64) * K + k, mask=in_t, other=0)
        grad = tl.load(dweight_ptr + tokens.to(tl.int64) * K + k, mask=in_t, other=0.0)
        raw = tl.sum(tl.where(experts[None, :] == chosen[:, None], scores, 0.0), axis=1)
        total += raw
        projection += grad * raw
    denominator = tl.maximum(total, 1e-20)
    # Below the floor the normaliser is a constant, through which no gradient flows.
    projection = tl.where(total > 1e-20, projection / denominator, 0.0)
    dscores = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for k in range(K):
        chosen = tl.load(idx_ptr + tokens.to(tl.int64) * K + k, mask=in_t, other=0)
        grad = tl.load(dweight_ptr + tokens.to(tl.int64) * K + k, mask=in_t, other=0.0)
        if NORMALIZE:
            draw = scale * (grad - projection) / denominator
        else:
            draw = scale * grad
        dscores += tl.where(experts[None, :] == chosen[:, None], draw[:, None], 0.0)
    if SIGMOID:
        dlogits = dscores * scores * (1.0 - scores)
    else:
        dlogits = scores * (dscores - tl.sum(dscores * scores, axis=1)[:, None])
    offsets = tokens[:, None].to(tl.int64) * E + experts[None, :]
    tl.store(dlogits_ptr + offsets, dlogits, mask=in_t[:, None] & (experts < E)[None, :])


def _block_t(T: int, block_e: int) -> int:
    # About 4K scores per program: a GPU program holds them in registers, and the CPU
    # interpreter, whose cost is per program, gets few programs on small tests.
    return max(1, min(next_power_of_2(T), 4096 // block_e))


def _check(logits_TE: torch.Tensor, top_k: int, score: str, bias_E) -> None:
    if logits_TE.dim() != 2:
        raise ValueError(f"logits_TE must be 2-D (tokens, experts), got {tuple(logits_TE.shape)}")
    if not 1 <= top_k <= logits_TE.shape[1]:
        raise ValueError(f"top_k={top_k} must be in 1..{logits_TE.shape[1]} (the experts)")
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if bias_E is not None and bias_E.shape != (logits_TE.shape[1],):
        raise ValueError(f"bias_E must have shape ({logits_TE.shape[1]},)")


def route_triton(logits_TE, top_k, score="softmax", bias_E=None, normalize=True, scale=1.0):
    """The Triton router (CUDA tensors, or CPU ones under TRITON_INTERPRET=1)."""
    _check(logits_TE, top_k, score, bias_E)
    return RouteFunction.apply(logits_TE, bias_E, top_k, score, normalize, float(scale))


class RouteFunction(torch.autograd.Function):
    """Triton forward and backward; gradients reach the logits through weight_TK only."""

    @staticmethod
    def forward(ctx, logits_TE, bias_E, top_k, score, normalize, scale):
        logits_TE = logits_TE.contiguous()
        T, E = logits_TE.shape
        device = logits_TE.device
        expert_idx_TK = torch.empty(T, top_k, dtype=torch.int64, device=device)
        weight_TK = torch.empty(T, top_k, dtype=torch.float32, device=device)
        counts_E = torch.zeros(E, dtype=torch.int32, device=device)  # atomics add into it
        block_e = next_power_of_2(E)
        block_t = _block_t(T, block_e)
        if T:
            _route_kernel[(-(-T // block_t),)](
                logits_TE,
                logits_TE if bias_E is None else bias_E.contiguous(),  # unread without a bias
                expert_idx_TK,
                weight_TK,
                counts_E,
                T,
                E,
                top_k,
                scale,
                SIGMOID=score == "sigmoid",
                HAS_BIAS=bias_E is not None,
                NORMALIZE=normalize,
                BLOCK_T=block_t,
                BLOCK_E=block_e,
                BLOCK_K=next_power_of_2(top_k),
            )
        ctx.save_for_backward(logits_TE, expert_idx_TK)
        ctx.options = (score == "sigmoid", normalize, scale, block_t, block_e)
        ctx.mark_non_differentiable(expert_idx_TK, counts_E)
        return expert_idx_TK, weight_TK, counts_E

    @staticmethod
    def backward(ctx, _didx, dweight_TK, _dcounts):
        logits_TE, expert_idx_TK = ctx.saved_tensors
        sigmoid, normalize, scale, block_t, block_e = ctx.options
        T, E = logits_TE.shape
        dlogits_TE = torch.empty(T, E, dtype=torch.float32, device=logits_TE.device)
        if T:
            _route_backward_kernel[(-(-T // block_t),)](
                logits_TE,
                expert_idx_TK,
                dweight_TK.float().contiguous(),
                dlogits_TE,
                T,
                E,
                expert_idx_TK.shape[1],
                scale,
                SIGMOID=sigmoid,
                NORMALIZE=normalize,
                BLOCK_T=block_t,
                BLOCK_E=block_e,
            )
        return dlogits_TE.to(logits_TE.dtype), None, None, None, None, None


# -- torch reference ---------------------------------------------------------------------
def gate_scores(logits_TE: torch.Tensor, score: str) -> torch.Tensor:
    """scores_TE in fp32."""
    logits_TE = logits_TE.float()
    return logits_TE.softmax(-1) if score == "softmax" else logits_TE.sigmoid()


def gate_weights(scores_TE, expert_idx_TK, normalize=True, scale=1.0) -> torch.Tensor:
    """weight_TK from the scores for a given choice of experts (differentiable)."""
    weight_TK = scores_TE.gather(1, expert_idx_TK)
    if normalize:
        weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True).clamp_min(_MIN_SUM)
    return weight_TK * scale


def expert_counts(expert_idx_TK: torch.Tensor, experts: int) -> torch.Tensor:
    """counts_E (int32). scatter_add rather than bincount: its output size is known without
    the data, so it also runs on `meta` tensors."""
    flat = expert_idx_TK.flatten()
    counts_E = torch.zeros(experts, dtype=torch.int32, device=flat.device)
    return counts_E.scatter_add(0, flat, torch.ones_like(flat, dtype=torch.int32))


def route_reference(logits_TE, top_k, score="softmax", bias_E=None, normalize=True, scale=1.0):
    """The router in torch ops: (expert_idx_TK, weight_TK, counts_E)."""
    _check(logits_TE, top_k, score, bias_E)
    scores_TE = gate_scores(logits_TE, score)
    select_TE = scores_TE if bias_E is None else scores_TE + bias_E.float()
    expert_idx_TK = select_TE.topk(top_k, dim=-1).indices
    weight_TK = gate_weights(scores_TE, expert_idx_TK, normalize, scale)
    return expert_idx_TK, weight_TK, expert_counts(expert_idx_TK, logits_TE.shape[1])
