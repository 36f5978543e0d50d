"""Embedding re-injection and U-net skips, as the modded-nanogpt speedrun records use them."""

from __future__ import annotations

import torch
from torch import nn

import archbench
from archbench.model import Stack, step
from archbench.nn import PreNormBlock


@archbench.register_block("unet-skips", family="gated",
                          citation="Jordan et al. 2024-25, modded-nanogpt (github.com/KellerJordan/modded-nanogpt), "
                                   "as its records to mid-2025 use them; nanochat (Karpathy 2025) keeps the re-injection")
class UNetSkips(Stack):
    """Pre-norm blocks; before block i the stream becomes λ₀ᵢ·x + λ₁ᵢ·x₀ (x₀ the embedding), and the
    second half adds back the first half's outputs, mirrored, with learned weights.

    Blocks 0…n−1 (n = depth // 2) push their output; block depth−1−j adds wⱼ·(block j's output) to its
    input, so the last block pairs with the first. Learned scalars, initialised as in the speedrun:
    λ = (1, 0), w = 1. ``reinject`` or ``unet`` turns either half off.

    A skipped layer leaves its input unchanged, mixing included, and pushes that input as its output.
    """

    knobs_from = (PreNormBlock,)

    def __init__(self, dim: int, depth: int, *, reinject: bool = True, unet: bool = True, **branch):
        super().__init__([PreNormBlock(dim, **branch) for _ in range(depth)])
        self.pairs = depth // 2 if unet else 0
        self.lambdas = nn.Parameter(torch.tensor([[1.0, 0.0]] * depth)) if reinject else None
        self.skip_weights = nn.Parameter(torch.ones(self.pairs)) if self.pairs else None

    def forward(self, h, intervene=None):
        x0, depth, pushed = h, len(self.layers), []
        for i, block in enumerate(self.layers):
            x = h
            if self.lambdas is not None:
                x = self.lambdas[i, 0] * x + self.lambdas[i, 1] * x0
            if i >= depth - self.pairs:
                x = x + self.skip_weights[depth - 1 - i] * pushed[depth - 1 - i]
            h = step(intervene, i, h, block(x))
            if i < self.pairs:
                pushed.append(h)
        return h
