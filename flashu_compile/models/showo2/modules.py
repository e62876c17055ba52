"""Show-o2 building blocks outside the LLM: patch embedders, time embedding, the flow head.

Attribute names follow the official checkpoint so that ``state_dict()`` keys match it exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .configuration import FlowHeadConfig


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the weight, as the official one."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class PatchEmbed(nn.Module):
    """Latent (B, C, H, W) -> tokens (B, H/p * W/p, D) through a strided convolution."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the raw flow time t in [0, 1] (cosine half first), then an MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size
        self.max_period = max_period

    def sinusoidal(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_embedding_size // 2
        exponent = torch.arange(half, dtype=torch.float32, device=t.device) / half
        freqs = torch.exp(-math.log(self.max_period) * exponent)
        args = t.float()[..., None] * freqs
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(self.sinusoidal(t).to(dtype))


def llama3_inv_freq(config: FlowHeadConfig) -> torch.Tensor:
    """Rotary inverse frequencies with llama3 long-context scaling (the flow head's RoPE)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    low_wavelen = config.rope_original_max_position / config.rope_low_freq_factor
    high_wavelen = config.rope_original_max_position / config.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    scaled = torch.where(wavelen > low_wavelen, inv_freq / config.rope_factor, inv_freq)
    smooth = (config.rope_original_max_position / wavelen - config.rope_low_freq_factor) / (
        config.rope_high_freq_factor - config.rope_low_freq_factor
    )
    blended = (1 - smooth) * scaled / config.rope_factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, blended, scaled)


def rotary_cos_sin(inv_freq: torch.Tensor, seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (1, S, head_dim) for positions 0..S-1, computed in fp32."""
    positions = torch.arange(seq_len, device=inv_freq.device, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq.float()[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos()[None].to(dtype), emb.sin()[None].to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, heads, S, d); cos/sin: (1, S, d) broadcast over heads.
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, kv_heads, S, d) -> (B, kv_heads * groups, S, d), each KV head serving `groups` queries."""
    if groups == 1:
        return x
    b, kv, s, d = x.shape
    return x[:, :, None].expand(b, kv, groups, s, d).reshape(b, kv * groups, s, d)


class FlowHeadAttention(nn.Module):
    """GQA self-attention with per-head q/k RMSNorm before RoPE; no biases."""

    def __init__(self, config: FlowHeadConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        rotary: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        b, s, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, s, -1, self.head_dim).transpose(1, 2)
        cos, sin = rotary
        q = apply_rotary(self.q_norm(q), cos, sin)
        k = apply_rotary(self.k_norm(k), cos, sin)
        groups = self.num_heads // self.num_kv_heads
        out = F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), attn_mask=attention_mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, image_span: torch.Tensor) -> torch.Tensor:
    """adaLN modulation in fp32, applied only where ``image_span`` (B, S, 1) is true.

    Outside the image spans the official code modulates with shift = scale = 0, which is the
    identity, so a select gives bit-identical results without building full-size tensors.
    """
    xf = x.float()
    modulated = xf * (1 + scale.float()[:, None]) + shift.float()[:, None]
    return torch.where(image_span, modulated, xf).to(x.dtype)


def gated(residual: torch.Tensor, update: torch.Tensor, gate: torch.Tensor, image_span: torch.Tensor) -> torch.Tensor:
    """residual + gate * update on image spans, residual + update elsewhere (gate = 1 there)."""
    return residual + torch.where(image_span, gate[:, None] * update, update)


class ModulatedAttentionBlock(nn.Module):
    """One ``diffusion_head_a`` block: pre-norm GQA attention and SwiGLU, both adaLN-modulated."""

    def __init__(self, config: FlowHeadConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.self_attn = FlowHeadAttention(config)
        self.mlp = SwiGLU(d, config.intermediate_size)
        self.input_layernorm = RMSNorm(d, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(d, eps=config.rms_norm_eps)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d, bias=True))

    def forward(
        self,
        hidden_states: torch.Tensor,
        adaln_input: torch.Tensor,
        attention_mask: torch.Tensor | None,
        rotary: tuple[torch.Tensor, torch.Tensor],
        image_span: torch.Tensor,
    ) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(adaln_input).chunk(6, dim=-1)
        )
        h = modulate(self.input_layernorm(hidden_states), shift_msa, scale_msa, image_span)
        hidden_states = gated(hidden_states, self.self_attn(h, attention_mask, rotary), gate_msa, image_span)
        h = modulate(self.post_attention_layernorm(hidden_states), shift_mlp, scale_mlp, image_span)
        return gated(hidden_states, self.mlp(h), gate_mlp, image_span)


class FinalLayer(nn.Module):
    """``diffusion_head_b``: modulated RMSNorm then a linear map to patch_size**2 * channels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = RMSNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, adaln_input: torch.Tensor, image_span: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(adaln_input).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale, image_span))


def interpolate_position_table(table: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Resize a square SigLIP position table (P, D) to a (grid_h x grid_w) token grid, bicubically."""
    n, dim = table.shape
    side = int(round(math.sqrt(n)))
    if side * side != n:
        raise ValueError(f"position table of {n} entries is not square")
    grid = table.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
