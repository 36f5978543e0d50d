"""The standard residual family: pre-norm transformer block and the papers' attention-free MLP block."""

from __future__ import annotations

from typing import Annotated

import torch
from timm.layers import DropPath, Mlp
from torch import nn

import archbench
from archbench.knobs import Range
from archbench.model import Tap
from archbench.nn import PreNormBranch, ReLUSquared

PAPER_1 = "Liu et al. 2026, Inverse Depth Scaling From Most Layers Being Similar (arXiv 2602.05970)"


@archbench.register_block("residual", family="residual", identity_init=True,
                          citation="Vaswani et al. 2017; pre-norm as in Xiong et al. 2020")
class Residual(nn.Module):
    """Pre-norm transformer block: h + attn(norm(h)), then + mlp(norm(.)); causal attention."""

    knobs_from = (PreNormBranch,)  # heads, mlp_ratio, norm, act, attention, zero_init, ...

    def __init__(self, dim: int, layer_idx: int, depth: int, *,
                 drop_path: Annotated[float, Range(0.0, 0.3)] = 0.0, **branch):
        super().__init__()
        self.branch = PreNormBranch(dim, **branch)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        return x + self.drop_path(self.branch(x))


@archbench.register_block("residual-mlp", family="residual", identity_init=True, citation=PAPER_1)
class ResidualMLP(nn.Module):
    """Attention-free block of the teacher-student paper: h + W_proj·relu(W_fc·rmsnorm(h) + b)²."""

    def __init__(self, dim: int, layer_idx: int, depth: int, *,
                 mlp_ratio: Annotated[int, Range(1, 8)] = 4,
                 zero_init: bool = True,
                 proj_scale: Annotated[float, Range(0.01, 1.0, log=True)] = 1.0,
                 **kwargs):
        super().__init__()
        # rmsnorm without weight -> Linear(d, 4d) with bias -> relu² -> Linear(4d, d) without bias
        self.mlp = Mlp(dim, mlp_ratio * dim, act_layer=ReLUSquared, norm_layer=None, bias=(True, False))
        self.mlp_out = Tap()
        with torch.no_grad():
            if zero_init:  # the paper's student: identity at init
                self.mlp.fc2.weight.zero_()
            else:  # the paper's teacher: default init, W_proj scaled by proj_scale (1/sqrt(depth))
                self.mlp.fc2.weight.mul_(proj_scale)

    def forward(self, x):
        return x + self.mlp_out(self.mlp(torch.nn.functional.rms_norm(x, (x.shape[-1],))))


@archbench.register_block("residual-mlp-rk2", family="residual", identity_init=True,
                          citation=PAPER_1 + ", the two-stage student")
class ResidualMLPRK2(nn.Module):
    """Two-stage (RK2 midpoint) MLP block: mid = h + ½·MLP₁(rmsnorm(h)), out = h + MLP₂(rmsnorm(mid))."""

    def __init__(self, dim: int, layer_idx: int, depth: int, *,
                 mlp_ratio: Annotated[int, Range(1, 8)] = 4,
                 zero_init: bool = True,
                 **kwargs):
        super().__init__()
        self.mlp1, self.mlp2 = (Mlp(dim, mlp_ratio * dim, act_layer=ReLUSquared, norm_layer=None, bias=(True, False))
                                for _ in range(2))
        self.mlp_out = Tap()
        if zero_init:  # identity at init, like the one-stage student
            with torch.no_grad():
                self.mlp1.fc2.weight.zero_()
                self.mlp2.fc2.weight.zero_()

    def forward(self, x):
        norm = lambda h: torch.nn.functional.rms_norm(h, (h.shape[-1],))  # noqa: E731
        mid = x + 0.5 * self.mlp1(norm(x))
        return x + self.mlp_out(self.mlp2(norm(mid)))
