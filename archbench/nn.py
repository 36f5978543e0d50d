"""Layers shared by several blocks and tasks. Anything timm already has comes from timm."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn


class ReLUSquared(nn.Module):
    """relu(x)², the activation of the papers' residual MLP block."""

    def __init__(self, inplace: bool = False):  # timm's Mlp passes no args; keep the nn.ReLU signature
        super().__init__()

    def forward(self, x):
        return F.relu(x).square()


class RMSNormNoWeight(nn.Module):
    """rmsnorm without a learnable gain, as in the teacher-student paper."""

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],))


def make_norm(kind: str, dim: int) -> nn.Module:
    if kind == "rmsnorm":
        return nn.RMSNorm(dim)
    if kind == "layernorm":
        return nn.LayerNorm(dim)
    if kind == "rmsnorm-noweight":
        return RMSNormNoWeight()
    raise ValueError(f"unknown norm {kind!r}")


_warned_xformers = False


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention.

    ``backend="sdpa"`` uses torch's fused scaled_dot_product_attention; ``"xformers"`` uses
    xformers' memory-efficient kernel on CUDA and falls back to sdpa (with one warning) elsewhere.
    """

    def __init__(self, dim: int, heads: int, *, bias: bool = False, backend: str = "sdpa"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads={heads}")
        self.heads, self.backend = heads, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).unbind(2)  # each (B, T, H, Dh)
        if self.backend == "xformers" and x.is_cuda and _xformers_ops() is not None:
            xops = _xformers_ops()
            y = xops.memory_efficient_attention(q, k, v, attn_bias=xops.LowerTriangularMask())
        else:
            if self.backend == "xformers":
                _warn_xformers_fallback()
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True).transpose(1, 2)
        return self.proj(y.reshape(B, T, C))


def _xformers_ops():
    try:
        import xformers.ops as xops
    except Exception:
        return None
    return xops


def _warn_xformers_fallback():
    global _warned_xformers
    if not _warned_xformers:
        _warned_xformers = True
        warnings.warn("xformers attention runs on CUDA only (and needs `pip install archbench[xformers]`); "
                      "using torch scaled_dot_product_attention instead")
