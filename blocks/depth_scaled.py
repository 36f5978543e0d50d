"""Pre-norm blocks whose updates are scaled by the depth: at the layer's input (LayerNorm Scaling) or at
its output, with the learning rate to match (depth-µP and CompleteP).

Both keep the paper's initialisation: every projection drawn as usual (``zero_init=False``), since the
depth scaling is what keeps a deep stack's updates small at init.
"""

from __future__ import annotations

import math
from typing import Annotated

from torch import nn

import archbench
from archbench.knobs import Range
from archbench.nn import PreNormBranch


class _Scaled(nn.Module):
    """A norm whose output is multiplied by a constant."""

    def __init__(self, norm: nn.Module, factor: float):
        super().__init__()
        self.norm, self.factor = norm, factor

    def forward(self, x):
        return self.factor * self.norm(x)


@archbench.register_block("layernorm-scaling", family="residual",
                          citation="Sun et al. 2025, The Curse of Depth in Large Language Models (arXiv 2502.05795)")
class LayerNormScaling(nn.Module):
    """Pre-norm transformer block whose two norms' outputs are scaled by 1/√ℓ at block ℓ = 1, 2, ….

    The paper's fix for deep pre-norm stacks whose later layers do little: the output variance no
    longer grows with depth. No new parameters; the paper drops scaled initialisation beside it.
    """

    knobs_from = (PreNormBranch,)

    def __init__(self, dim: int, layer_idx: int, depth: int, *, zero_init: bool = False, **branch):
        super().__init__()
        self.branch = PreNormBranch(dim, zero_init=zero_init, **branch)
        factor = 1.0 / math.sqrt(layer_idx + 1)
        if self.branch.attn is not None:
            self.branch.norm1 = _Scaled(self.branch.norm1, factor)
        self.branch.norm2 = _Scaled(self.branch.norm2, factor)

    def forward(self, x):
        return x + self.branch(x)


@archbench.register_block("completep", family="residual",
                          citation="Dey et al. 2025, Don't be lazy: CompleteP enables compute-efficient deep "
                                   "transformers (arXiv 2505.01618); α = ½ is depth-µP (Yang et al. 2023, "
                                   "Tensor Programs VI, arXiv 2310.02244)")
class CompleteP(nn.Module):
    """x + m·attn(norm(x)), then + m·mlp(norm(·)), with m = (L/L₀)^−α; the block's learning rate × (L/L₀)^(α−1).

    L is the number of blocks and L₀ (``base_depth``) the depth at which the learning rate was tuned:
    at L = L₀ it is the plain pre-norm block. α = 1 is CompleteP (its learning rate does not move with
    depth), α = ½ depth-µP (both scaled by 1/√(L/L₀)). The hidden weights' init has no depth factor,
    and embedding, readout and final norm are not scaled, as in the paper. Not done: the paper's
    Adam ε × (L/L₀)^−α for in-block tensors (the default ε = 1e-8 is far below these gradients).
    """

    knobs_from = (PreNormBranch,)

    def __init__(self, dim: int, layer_idx: int, depth: int, *,
                 alpha: Annotated[float, Range(0.0, 1.0)] = 1.0,
                 base_depth: Annotated[int, Range(1, 64)] = 2,
                 zero_init: bool = False,
                 **branch):
        super().__init__()
        self.branch = PreNormBranch(dim, zero_init=zero_init, **branch)
        ratio = depth / base_depth
        self.multiplier = ratio ** -alpha
        for p in self.parameters():
            p.lr_scale = ratio ** (alpha - 1.0)  # read by archbench.train.param_groups

    def forward(self, x):
        b, m = self.branch, self.multiplier
        if b.attn is not None:
            x = x + b.attn_out(m * b.attn(b.norm1(x)))
        return x + b.mlp_out(m * b.mlp(b.norm2(x)))
