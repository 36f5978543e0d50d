"""LAuReL: the skip connection itself learns, by a weight (RW) and a low-rank linear map (LR)."""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from torch import nn

import archbench
from archbench.knobs import Range
from archbench.nn import PreNormBranch


@archbench.register_block("laurel", family="gated", identity_init=True,
                          citation="Menghani, Kumar, Kumar 2025, LAuReL: Learned Augmented Residual Layer "
                                   "(ICML 2025, arXiv 2411.07501)")
class LAuReL(nn.Module):
    """x + u(x) becomes α·u(x) + β·(x + B·A·x) around the whole pre-norm block (the paper's RW+LR).

    A (width → rank) starts column-orthogonal with entries 1/√(rank·width), B (rank → width) at zero,
    α = β = 1: the plain residual block at init. ``variant`` keeps only the learned weights (``rw``:
    α·u(x) + β·x) or only the low-rank map (``lr``: u(x) + x + B·A·x). The paper leaves how α and β are
    kept bounded (softmax or sigmoid) and their init open; here they are free scalars from 1.
    """

    knobs_from = (PreNormBranch,)

    def __init__(self, dim: int, layer_idx: int, depth: int, *,
                 variant: Literal["rw+lr", "rw", "lr"] = "rw+lr",
                 rank: Annotated[int, Range(1, 64)] = 4,  # the paper's 1B LLM; 32-64 at 4B
                 **branch):
        super().__init__()
        self.branch = PreNormBranch(dim, **branch)
        self.weights = nn.Parameter(torch.ones(2)) if "rw" in variant else None  # α, β
        self.down = self.up = None
        if "lr" in variant:
            rank = min(rank, dim)
            self.down, self.up = nn.Linear(dim, rank, bias=False), nn.Linear(rank, dim, bias=False)
            with torch.no_grad():  # A_ij = 1/√(rD) where i ≡ j (mod r): orthogonal columns
                a = torch.zeros(dim, rank)
                a[torch.arange(dim), torch.arange(dim) % rank] = 1.0 / math.sqrt(rank * dim)
                self.down.weight.copy_(a.T)
            nn.init.zeros_(self.up.weight)

    def forward(self, x):
        skip = x if self.up is None else x + self.up(self.down(x))
        if self.weights is None:
            return skip + self.branch(x)
        return self.weights[0] * self.branch(x) + self.weights[1] * skip
