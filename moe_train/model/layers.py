"""Dense building blocks of the LLaMA/Mixtral/DeepSeek family: rotary embeddings, grouped-query
attention, multi-head latent attention, SwiGLU.

Shape legend: B batch, T sequence, D model dim, H query heads, K key/value heads, Dh head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from moe_train.config import ModelConfig, RopeScalingConfig
from moe_train.model.documents import compiled_flex_attention


def rotary_tables(
    head_dim: int, max_seq_len: int, theta: float, scaling: RopeScalingConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (max_seq_len, head_dim), in the rotate-half layout of HF Llama."""
    wavelengths = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # / 2 pi
    inv_freq = 1.0 / wavelengths
    magnitude = 1.0
    if scaling is not None and scaling.type == "llama3":
        inv_freq = _llama3_scaled(inv_freq, scaling)
    elif scaling is not None and scaling.type == "yarn":
        inv_freq, magnitude = _yarn_scaled(wavelengths, theta, scaling)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (T, Dh/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, Dh)
    if magnitude == 1.0:
        return angles.cos(), angles.sin()
    return angles.cos() * magnitude, angles.sin() * magnitude


def _llama3_scaled(inv_freq: torch.Tensor, s: RopeScalingConfig) -> torch.Tensor:
    """Llama 3.1's scaling: long wavelengths divided by the factor, short ones kept, a smooth
    interpolation between (as Meta's reference code and transformers' llama3 rope type)."""
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = s.original_max_seq_len / s.low_freq_factor
    high_freq_wavelen = s.original_max_seq_len / s.high_freq_factor
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature term m = 1 + 0.1 mscale ln(factor) (1 without scaling)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_scaled(wavelengths: torch.Tensor, theta: float, s: RopeScalingConfig) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023, as its reference code, DeepSeek's and transformers' yarn rope
    type): dimension pairs whose frequency turns fewer than beta_slow times over the original
    context are interpolated (divided by factor), more than beta_fast times kept, a linear ramp
    between; and the magnitude that scales the cos/sin tables. Computed in transformers' order:
    at position 10^5 a last-bit difference in a frequency moves the angle by ~1e-2."""
    dim = 2 * wavelengths.numel()

    def pair_turning(rotations: float) -> float:  # the dimension whose frequency turns this often
        return dim * math.log(s.original_max_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(pair_turning(s.beta_fast)), 0)
    high = min(math.ceil(pair_turning(s.beta_slow)), dim - 1)
    width = high - low if high != low else 0.001
    kept = 1 - ((torch.arange(dim // 2, dtype=torch.float32) - low) / width).clamp(0, 1)
    inv_freq = 1.0 / (s.factor * wavelengths) * (1 - kept) + 1.0 / wavelengths * kept
    if s.mscale and s.mscale_all_dim:
        return inv_freq, yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim)
    return inv_freq, yarn_mscale(s.factor)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, Dh); cos and sin (T, Dh), or (B, 1, T, Dh) with positions per sequence."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


Mask = torch.Tensor | BlockMask | None  # documents.Documents.attention_mask: None is plain causal


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask, scale: float | None = None
) -> torch.Tensor:
    """q (B, H, T, Dq), k (B, K, T, Dq), v (B, K, T, Dv) -> (B, H, T, Dv): causal, or within the
    causal mask `mask` (packed documents kept apart): SDPA, or FlexAttention for a BlockMask."""
    gqa = k.shape[1] != q.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if isinstance(mask, BlockMask):  # compiled on CUDA; eager (forward only, the tests') on a CPU
        flex = compiled_flex_attention() if q.is_cuda else flex_attention
        return flex(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


class Attention(nn.Module):
    """Causal grouped-query self-attention through scaled_dot_product_attention."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = dim // num_heads
        self.wq = nn.Linear(dim, num_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(num_heads * self.head_dim, dim, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Mask = None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        k = self.wk(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, Dh)
        v = self.wv(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, Dh)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = causal_attention(q, k, v, mask)  # (B, H, T, Dh)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class LatentAttention(nn.Module):
    """Causal multi-head latent attention (MLA, DeepSeek-V2 sec. 2.1; V3): keys and values come up
    from a normalised latent of kv_lora_rank per token; each head's query and key are a part
    without position (nope) and a rotary part, whose key (one per token) all heads share. The query
    optionally passes through a latent of q_lora_rank. Training computes the full keys and values
    (the weight absorption that makes the latent the inference cache is an inference trick).
    Names follow DeepSeek's reference code; the latent norms use eps 1e-6 as it and transformers do.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kv_lora_rank: int,
        q_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        softmax_scale: float | None = None,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.softmax_scale = softmax_scale  # None: SDPA's 1 / sqrt(nope + rope)
        self.nope_dim, self.rope_dim, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.kv_lora_rank, self.q_lora = kv_lora_rank, q_lora_rank > 0
        qk_dim = qk_nope_head_dim + qk_rope_head_dim
        if q_lora_rank:
            self.wq_a = nn.Linear(dim, q_lora_rank, bias=False)
            self.q_norm = nn.RMSNorm(q_lora_rank, eps=1e-6)
            self.wq_b = nn.Linear(q_lora_rank, num_heads * qk_dim, bias=False)
        else:
            self.wq = nn.Linear(dim, num_heads * qk_dim, bias=False)
        self.wkv_a = nn.Linear(dim, kv_lora_rank + qk_rope_head_dim, bias=False)  # [latent | rotary key]
        self.kv_norm = nn.RMSNorm(kv_lora_rank, eps=1e-6)
        self.wkv_b = nn.Linear(kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.wo = nn.Linear(num_heads * v_head_dim, dim, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Mask = None
    ) -> torch.Tensor:
        """x (B, T, D); cos and sin (T, rope_dim) or (B, 1, T, rope_dim)."""
        B, T, _ = x.shape
        H = self.num_heads
        q = self.wq_b(self.q_norm(self.wq_a(x))) if self.q_lora else self.wq(x)  # (B, T, H * (nope + rope))
        q_nope, q_rope = q.view(B, T, H, -1).transpose(1, 2).split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.wkv_b(self.kv_norm(latent)).view(B, T, H, -1).transpose(1, 2)  # (B, H, T, nope + v)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q_rope = apply_rotary(q_rope, cos, sin)  # (B, H, T, rope)
        k_rope = apply_rotary(k_rope.unsqueeze(1), cos, sin).expand(B, H, T, self.rope_dim)  # (B, H, T, rope)
        q = torch.cat([q_nope, q_rope], dim=-1)  # (B, H, T, nope + rope)
        k = torch.cat([k_nope, k_rope], dim=-1)
        y = causal_attention(q, k, v, mask, self.softmax_scale)  # (B, H, T, v)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


def attention(config: ModelConfig) -> Attention | LatentAttention:
    """The attention block `config` asks for."""
    mla, rope = config.mla, config.rope_scaling
    if not mla.enabled:
        return Attention(config.dim, config.num_heads, config.num_kv_heads)
    softmax_scale = None
    if rope.type == "yarn" and rope.mscale_all_dim:  # DeepSeek-V2/V3 scale the logits, not the tables
        qk_dim, _ = config.attention_head_dims
        softmax_scale = qk_dim**-0.5 * yarn_mscale(rope.factor, rope.mscale_all_dim) ** 2
    return LatentAttention(
        config.dim,
        config.num_heads,
        mla.kv_lora_rank,
        mla.q_lora_rank,
        mla.qk_nope_head_dim,
        mla.qk_rope_head_dim,
        mla.v_head_dim,
        softmax_scale,
    )


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
