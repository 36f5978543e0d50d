"""Mixture-of-Depths: in every other block only the tokens a router picks are processed; the rest skip it."""

from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

import archbench
from archbench.knobs import Range
from archbench.model import Stack, step
from archbench.nn import PreNormBlock


@archbench.register_block("mixture-of-depths", family="gated",
                          citation="Raposo et al. 2024, Mixture-of-Depths: Dynamically allocating compute in "
                                   "transformer-based language models (arXiv 2404.02258)")
class MixtureOfDepths(Stack):
    """Pre-norm blocks, every other one routed: only the tokens its router scores highest go through it.

    Every ``every``-th block (blocks every−1, 2·every−1, …) has a router rᵢ = w·xᵢ; the ``capacity``
    fraction of tokens with the highest scores go through the block, attending only to each other, and
    become xᵢ + rᵢ·u(xᵢ) (the raw router weight, so the router learns through the output); the rest
    pass unchanged.

    Routing is causal, unlike the paper's top-k over the whole sequence (where whether a token is
    processed depends on later tokens' scores, which would leak the future into a language model's
    held-out loss): token i is processed when fewer than capacity·(i + 1) of the tokens up to it score
    higher, the same fraction on average. So no auxiliary router loss or predictor is needed to sample.
    Compute is not saved here (the block runs on every token and masks): a testbed of how depth is
    used, not of speed.
    """

    knobs_from = (PreNormBlock,)

    def __init__(self, dim: int, depth: int, *,
                 capacity: Annotated[float, Range(0.05, 1.0, log=True)] = 0.125,
                 every: Annotated[int, Range(1, 4)] = 2,
                 **branch):
        super().__init__([PreNormBlock(dim, **branch) for _ in range(depth)])
        self.capacity = capacity
        self.routed = [l % every == every - 1 for l in range(depth)]
        self.routers = nn.ModuleDict({str(l): nn.Linear(dim, 1, bias=False) for l in range(depth) if self.routed[l]})

    def route(self, l: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``l``'s router weights r (B, T) and which tokens it processes (B, T) bool."""
        r = self.routers[str(l)](x).squeeze(-1)
        T = r.shape[-1]
        earlier = torch.ones(T, T, dtype=torch.bool, device=r.device).tril()  # [i, j]: j <= i
        above = ((r.unsqueeze(-2) > r.unsqueeze(-1)) & earlier).sum(-1)  # tokens up to i that score higher
        return r, above < self.capacity * torch.arange(1, T + 1, device=r.device)

    def forward(self, h, intervene=None):
        for l, block in enumerate(self.layers):
            if not self.routed[l]:
                out = block(h)
            else:
                b = block.branch
                r, chosen = self.route(l, h)
                a = b.attn_out(b.attn(b.norm1(h), keys=chosen)) if b.attn is not None else 0.0
                u = a + b.mlp_out(b.mlp(b.norm2(h + a)))
                out = h + (r * chosen).unsqueeze(-1) * u
            h = step(intervene, l, h, out)
        return h
