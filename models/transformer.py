"""One pure-torch decoder-only transformer family, dense or Mixture-of-Experts.

Covers every architecture tera plans for: token embedding, learned / rotary / ALiBi
positions, RMSNorm, MHA, GQA and DeepSeek's multi-head latent attention (MLA), dense FFNs
(SwiGLU, GeGLU, GELU, ReLU, squared ReLU), MoE layers (tera.models.moe), and an LM head that
may be tied to the embedding. No torch.distributed here: the runtime parallelizes these
modules from outside.

Every module that executes tensor operations is small and named, because the planner's
tracer (tera.planner.trace) turns modules into operator nodes: Linear -> matmul,
CoreAttention -> attention, RMSNorm -> norm, FeedForward's own ops -> activation, Block's
own ops -> residual, LMHead's own ops -> loss.

Shape legend: B batch, S sequence, D model width, H query heads, G KV heads, Dh head width,
V vocabulary, F FFN hidden width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tera.models.ffn import FeedForward
from tera.models.moe import MoE
from tera.models.spec import AttentionSpec, ModelSpec


def _at_least_fp32(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


class _RMSNormFunction(torch.autograd.Function):
    """y = x * rstd * weight with rstd = 1/sqrt(mean(x^2) + eps), computed in fp32.

    Saves only the input and the fp32 rstd of each row, as a fused norm kernel does
    (Megatron-LM/Transformer Engine), not the fp32 copies eager autograd would keep."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x32 = x.to(_at_least_fp32(x))
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (x32 * rstd * weight.to(x32.dtype)).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.to(rstd.dtype) * rstd
        dy32 = dy.to(rstd.dtype)
        dweight = (dy32 * xhat).reshape(-1, xhat.shape[-1]).sum(0).to(weight.dtype)
        g = dy32 * weight.to(rstd.dtype)
        dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        return dx.to(x.dtype), dweight, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 for stability, as every production implementation does.
        return _RMSNormFunction.apply(x, self.weight, self.eps)


def rope_cos_sin(seq_len: int, dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    angles_SR = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles_SR.cos(), angles_SR.sin()


def apply_rope(x_BHSR: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved-halves pairs (x1, x2) of the last dim by the position angle."""
    x1, x2 = x_BHSR.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos_SR - x2 * sin_SR, x2 * cos_SR + x1 * sin_SR), dim=-1)
    return rotated.to(x_BHSR.dtype)


def alibi_slopes(heads: int) -> list[float]:
    """ALiBi head slopes (Press et al. 2022): a geometric sequence starting at 2^(-8/n)."""
    n = 2 ** math.floor(math.log2(heads))
    slopes = [2 ** (-8 * (i + 1) / n) for i in range(n)]
    if n < heads:  # non-power-of-two head counts interleave the slopes of 2n
        extra = [2 ** (-4 * (2 * i + 1) / n) for i in range(heads - n)]
        slopes += extra
    return slopes


class CoreAttention(nn.Module):
    """softmax(q kᵀ / sqrt(d) + causal mask [+ ALiBi]) v, with rotary positions applied to
    the `rope_dim` trailing channels of q and k (all of them for plain RoPE)."""

    def __init__(self, spec: ModelSpec, rope_dim: int | None):
        super().__init__()
        self.rope_dim = rope_dim
        self.theta = spec.rope_theta
        self.alibi = spec.position == "alibi"
        self.heads = spec.attention.heads
        self.window = spec.attention.sliding_window
        self.scale = spec.attention.qk_head_dim**-0.5

    def forward(self, q_BHSd: torch.Tensor, k_BGSd: torch.Tensor, v_BGSe: torch.Tensor):
        S = q_BHSd.shape[2]
        if self.rope_dim:
            cos, sin = rope_cos_sin(S, self.rope_dim, self.theta, q_BHSd.device)
            r = self.rope_dim
            q_BHSd = torch.cat((q_BHSd[..., :-r], apply_rope(q_BHSd[..., -r:], cos, sin)), -1)
            k_BGSd = torch.cat((k_BGSd[..., :-r], apply_rope(k_BGSd[..., -r:], cos, sin)), -1)
        mask = self._mask(S, q_BHSd.device, q_BHSd.dtype)
        # GQA: each KV head serves heads/kv_heads query heads; enable_gqa keeps k and v at
        # their own head count instead of materialising (and saving) repeated copies.
        return F.scaled_dot_product_attention(
            q_BHSd,
            k_BGSd,
            v_BGSe,
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.scale,
            enable_gqa=q_BHSd.shape[1] != k_BGSd.shape[1],
        )

    def _mask(self, S: int, device, dtype) -> torch.Tensor | None:
        if not self.alibi and self.window is None:
            return None
        pos = torch.arange(S, device=device)
        dist_SS = pos[:, None] - pos[None, :]  # query minus key position, >= 0 is visible
        visible = dist_SS >= 0
        if self.window is not None:
            visible = visible & (dist_SS < self.window)
        mask = torch.zeros(S, S, device=device, dtype=dtype).masked_fill(~visible, float("-inf"))
        if self.alibi:
            slopes_H = torch.tensor(alibi_slopes(self.heads), device=device, dtype=dtype)
            mask = mask - slopes_H[:, None, None] * dist_SS.clamp(min=0).to(dtype)
        return mask


class Attention(nn.Module):
    """Multi-head (kv_heads == heads) or grouped-query attention."""

    def __init__(self, spec: ModelSpec, device=None, dtype=None):
        super().__init__()
        a: AttentionSpec = spec.attention
        self.heads, self.kv_heads, self.head_dim = a.heads, a.kv_heads, a.head_dim
        kw = dict(device=device, dtype=dtype)
        D = spec.hidden
        self.q_proj = nn.Linear(D, a.heads * a.head_dim, bias=a.qkv_bias, **kw)
        self.k_proj = nn.Linear(D, a.kv_heads * a.head_dim, bias=a.qkv_bias, **kw)
        self.v_proj = nn.Linear(D, a.kv_heads * a.head_dim, bias=a.qkv_bias, **kw)
        self.q_norm = RMSNorm(a.head_dim, spec.norm_eps, **kw) if a.qk_norm else None
        self.k_norm = RMSNorm(a.head_dim, spec.norm_eps, **kw) if a.qk_norm else None
        self.core = CoreAttention(spec, a.head_dim if spec.position == "rope" else None)
        self.o_proj = nn.Linear(a.heads * a.head_dim, D, bias=False, **kw)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q = self.q_proj(x_BSD).view(B, S, self.heads, self.head_dim)
        k = self.k_proj(x_BSD).view(B, S, self.kv_heads, self.head_dim)
        v = self.v_proj(x_BSD).view(B, S, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        o_BHSd = self.core(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o_proj(o_BHSd.transpose(1, 2).reshape(B, S, -1))


class MLAttention(nn.Module):
    """DeepSeek-V2/V3 multi-head latent attention (arXiv 2405.04434 Sec 2.1): queries and
    keys/values pass through low-rank latents; a decoupled RoPE key of width
    qk_rope_head_dim is shared by all heads."""

    def __init__(self, spec: ModelSpec, device=None, dtype=None):
        super().__init__()
        a: AttentionSpec = spec.attention
        kw = dict(device=device, dtype=dtype)
        D, H = spec.hidden, a.heads
        self.heads, self.nope, self.rope, self.v_dim = (
            H,
            a.qk_nope_head_dim,
            a.qk_rope_head_dim,
            a.v_head_dim,
        )
        self.kv_rank = a.kv_lora_rank
        qk = a.qk_head_dim
        if a.q_lora_rank:
            self.q_a_proj = nn.Linear(D, a.q_lora_rank, bias=False, **kw)
            self.q_a_norm = RMSNorm(a.q_lora_rank, spec.norm_eps, **kw)
            self.q_b_proj = nn.Linear(a.q_lora_rank, H * qk, bias=False, **kw)
        else:
            self.q_proj = nn.Linear(D, H * qk, bias=False, **kw)
        self.kv_a_proj = nn.Linear(D, a.kv_lora_rank + self.rope, bias=False, **kw)
        self.kv_a_norm = RMSNorm(a.kv_lora_rank, spec.norm_eps, **kw)
        self.kv_b_proj = nn.Linear(a.kv_lora_rank, H * (self.nope + self.v_dim), bias=False, **kw)
        self.core = CoreAttention(spec, self.rope)
        self.o_proj = nn.Linear(H * self.v_dim, D, bias=False, **kw)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        H = self.heads
        if hasattr(self, "q_a_proj"):
            q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x_BSD)))
        else:
            q = self.q_proj(x_BSD)
        q_BHSd = q.view(B, S, H, self.nope + self.rope).transpose(1, 2)
        latent, k_rope = self.kv_a_proj(x_BSD).split([self.kv_rank, self.rope], dim=-1)
        kv = self.kv_b_proj(self.kv_a_norm(latent)).view(B, S, H, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k_rope = k_rope.view(B, S, 1, self.rope).expand(B, S, H, self.rope)
        k_BHSd = torch.cat((k_nope, k_rope), dim=-1).transpose(1, 2)
        o_BHSe = self.core(q_BHSd, k_BHSd, v.transpose(1, 2))
        return self.o_proj(o_BHSe.transpose(1, 2).reshape(B, S, H * self.v_dim))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + ffn(norm(x))."""

    def __init__(
        self, spec: ModelSpec, index: int, balanced_routing: bool, device=None, dtype=None
    ):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.attn_norm = RMSNorm(spec.hidden, spec.norm_eps, **kw)
        attention = MLAttention if spec.attention.kind == "mla" else Attention
        self.attn = attention(spec, **kw)
        self.ffn_norm = RMSNorm(spec.hidden, spec.norm_eps, **kw)
        if spec.is_moe_layer(index):
            self.ffn = MoE(spec, balanced_routing=balanced_routing, **kw)
        else:
            self.ffn = FeedForward(spec.hidden, spec.ffn.hidden, spec.ffn.kind, **kw)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        h = x_BSD + self.attn(self.attn_norm(x_BSD))
        return h + self.ffn(self.ffn_norm(h))


class LMHead(nn.Module):
    """Final norm, projection to the vocabulary and the next-token cross-entropy loss, to
    which the MoE layers' auxiliary losses are added.
    With tied embeddings the projection reuses the embedding matrix (no parameter here)."""

    def __init__(self, spec: ModelSpec, embedding: nn.Embedding, device=None, dtype=None):
        super().__init__()
        self.norm = RMSNorm(spec.hidden, spec.norm_eps, device=device, dtype=dtype)
        self.proj = None
        if not spec.tie_embeddings:
            self.proj = nn.Linear(spec.hidden, spec.vocab, bias=False, device=device, dtype=dtype)
        self._tied = [embedding] if spec.tie_embeddings else []  # list: not a submodule

    def forward(self, x_BSD: torch.Tensor, targets_BS=None, aux_losses=()):
        h = self.norm(x_BSD)
        logits_BSV = self.proj(h) if self.proj is not None else h @ self._tied[0].weight.T
        if targets_BS is None:
            return logits_BSV
        loss = F.cross_entropy(logits_BSV.flatten(0, 1).float(), targets_BS.flatten())
        return loss + sum(aux_losses) if aux_losses else loss


class Transformer(nn.Module):
    """The model. `forward(tokens, targets)` returns the mean next-token loss plus the MoE
    auxiliary load-balancing loss; `forward(tokens)` returns logits.

    balanced_routing=True replaces the learned top-k assignment by a fixed balanced one
    (token t's k-th choice goes to expert (t*K + k) mod E) while still computing the router:
    the tracer uses it so that every expert receives the same number of rows on `meta`.
    """

    def __init__(self, spec: ModelSpec, device=None, dtype=None, balanced_routing: bool = False):
        super().__init__()
        self.spec = spec
        kw = dict(device=device, dtype=dtype)
        self.embed = nn.Embedding(spec.vocab, spec.hidden, **kw)
        self.pos_embed = None
        if spec.position == "learned":
            self.pos_embed = nn.Embedding(spec.max_seq_len, spec.hidden, **kw)
        self.layers = nn.ModuleList(
            Block(spec, i, balanced_routing, **kw) for i in range(spec.layers)
        )
        self.head = LMHead(spec, self.embed, **kw)
        if device is None or torch.device(device).type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """GPT-2 style init: N(0, std) for matrices, ones for norms, output projections
        scaled by 1/sqrt(2 * layers)."""
        out_std = std / math.sqrt(2 * self.spec.layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or p.dim() == 1 and "norm" in name:
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            elif name.endswith(("o_proj.weight", "w2.weight", "w2_EFD")):
                p.normal_(0.0, out_std)
            else:
                p.normal_(0.0, std)

    def forward(self, tokens_BS: torch.Tensor, targets_BS: torch.Tensor | None = None):
        S = tokens_BS.shape[1]
        if S > self.spec.max_seq_len and self.pos_embed is not None:
            raise ValueError(f"sequence of {S} exceeds max_seq_len {self.spec.max_seq_len}")
        x = self.embed(tokens_BS)
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(S, device=tokens_BS.device))
        for layer in self.layers:
            x = layer(x)
        if targets_BS is None:
            return self.head(x)
        aux = [m.aux_loss for m in self.modules() if isinstance(m, MoE) and m.aux_loss is not None]
        return self.head(x, targets_BS, aux)
