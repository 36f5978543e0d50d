"""Layers shared by several blocks and tasks. Anything timm already has comes from timm."""

from __future__ import annotations

import warnings
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import nn

from archbench.knobs import NOT_SEARCHED, Range


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
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}")


_warned_xformers = False


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention.

    ``backend="sdpa"`` uses torch's fused scaled_dot_product_attention; ``"xformers"`` uses
    xformers' memory-efficient kernel on CUDA and falls back to sdpa (with one warning) elsewhere.
    ``gate`` ("head" or "channel") multiplies the attention output by sigmoid(W x) before the output
    projection (gated attention, Qiu et al. 2025).
    """

    def __init__(self, dim: int, heads: int, *, bias: bool = False, backend: str = "sdpa", gate: str = "none"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads={heads}")
        self.heads, self.backend = heads, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.gate = {"none": None, "head": nn.Linear(dim, heads), "channel": nn.Linear(dim, dim)}[gate]

    def forward(self, x, values=None, kv=None, keys=None):
        """``values(v) -> v`` may replace the values (B, T, H, Dh) before attending (value residuals);
        ``kv = (xk, xv)`` gives keys and values their own inputs (MUDDFormer's streams); ``keys`` (B, T)
        bool keeps only those keys, each query still seeing itself (Mixture-of-Depths' routed tokens)."""
        B, T, C = x.shape
        if kv is None:
            q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).unbind(2)  # each (B, T, H, Dh)
        else:
            biases = self.qkv.bias.chunk(3) if self.qkv.bias is not None else (None,) * 3
            q, k, v = (F.linear(t, w, b).view(B, T, self.heads, C // self.heads)
                       for t, w, b in zip((x, *kv), self.qkv.weight.chunk(3), biases))
        if values is not None:
            v = values(v)
        if keys is not None:
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            mask = (causal & keys.unsqueeze(1)) | torch.eye(T, dtype=torch.bool, device=x.device)
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=mask.unsqueeze(1)).transpose(1, 2)
        elif self.backend == "xformers" and x.is_cuda and _xformers_ops() is not None:
            xops = _xformers_ops()
            y = xops.memory_efficient_attention(q, k, v, attn_bias=xops.LowerTriangularMask())
        else:
            if self.backend == "xformers":
                _warn_xformers_fallback()
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True).transpose(1, 2)
        if self.gate is not None:  # (B, T, H, 1) per head or (B, T, H, Dh) per channel
            y = y * torch.sigmoid(self.gate(x)).view(B, T, self.heads, -1)
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


class PreNormBranch(nn.Module):
    """The update of a pre-norm transformer block without its skip connection:
    u(x) = a + m with a = attn(norm1(x)) and m = mlp(norm2(x + a)), so that x + u(x) is the block.

    With ``attention=False`` it is the attention-free branch m = mlp(norm(x)) for vector tasks.
    Sublayer outputs pass through the taps ``attn_out`` and ``mlp_out`` (a_l and m_l).
    """

    def __init__(self, dim: int, *,
                 heads: Annotated[int, Range(1, 16)] = 4,
                 mlp_ratio: Annotated[int, Range(1, 8)] = 4,
                 norm: Literal["rmsnorm", "layernorm"] = "rmsnorm",
                 act: Literal["gelu", "relu2"] = "gelu",
                 attention: bool = True,
                 zero_init: bool = True,
                 bias: bool = False,
                 attn_backend: Annotated[Literal["sdpa", "xformers"], NOT_SEARCHED] = "sdpa",
                 attn_gate: Literal["none", "head", "channel"] = "none"):
        from timm.layers import Mlp

        from archbench.model import Tap

        super().__init__()
        self.attn = None
        if attention:
            self.norm1 = make_norm(norm, dim)
            self.attn = CausalSelfAttention(dim, heads, bias=bias, backend=attn_backend, gate=attn_gate)
            self.attn_out = Tap()
        self.norm2 = make_norm(norm, dim)
        self.mlp = Mlp(dim, mlp_ratio * dim, act_layer=nn.GELU if act == "gelu" else ReLUSquared, bias=bias)
        self.mlp_out = Tap()
        if zero_init:  # u(x) = 0 at init, so x + u(x) starts as the identity
            if self.attn is not None:
                nn.init.zeros_(self.attn.proj.weight)
            nn.init.zeros_(self.mlp.fc2.weight)

    def forward(self, x, values=None):  # (B, T, C) -> (B, T, C)
        a = self.attn_out(self.attn(self.norm1(x), values)) if self.attn is not None else 0.0
        return a + self.mlp_out(self.mlp(self.norm2(x + a)))


class PreNormBlock(nn.Module):
    """x + u(x): the pre-norm transformer block, the unit the stack-level families repeat."""

    knobs_from = (PreNormBranch,)

    def __init__(self, dim: int, **branch):
        super().__init__()
        self.branch = PreNormBranch(dim, **branch)

    def forward(self, x):
        return x + self.branch(x)


def flop_counter():
    """``torch.utils.flop_counter.FlopCounterMode`` that also counts the CPU attention kernel (torch has
    formulas only for the CUDA ones); attention is counted over the full T×T scores, as torch counts it."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    def fwd(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    def bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: fwd,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: bwd})
