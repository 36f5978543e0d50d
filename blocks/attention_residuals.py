"""Attention Residuals: each sublayer reads a softmax-weighted mix of all earlier outputs, not their sum."""

from __future__ import annotations

import torch
from torch import nn

import archbench
from archbench.model import Stack, step
from archbench.nn import PreNormBlock, PreNormBranch


@archbench.register_block("attention-residuals", family="gated",
                          citation="Kimi Team 2026, Attention Residuals (arXiv 2603.15031), Full AttnRes")
class AttentionResiduals(Stack):
    """Full AttnRes: sublayer k (attention and MLP separately) reads hₖ = Σᵢ αᵢ·vᵢ over the embedding v₀
    and every earlier sublayer output vᵢ, with αᵢ = softmaxᵢ(wₖ · rmsnorm(vᵢ)): a learned query per
    sublayer (zero at init: the plain mean), keys the normalised outputs, no 1/√d.

    Not pinned down by public material, chosen here: how the readout's input is formed (one more query
    over all outputs) and the projections' init (drawn as usual, not zero: zero outputs would make the
    mean shrink the embedding). The traced stream after block l is what block l+1 reads; a skipped
    block passes its input on and its outputs leave the mix.
    """

    knobs_from = (PreNormBranch,)

    def __init__(self, dim: int, depth: int, *, zero_init: bool = False, **branch):
        super().__init__([PreNormBlock(dim, zero_init=zero_init, **branch) for _ in range(depth)])
        # query k reads at sublayer input k = 1, …, 2·depth (the last: the readout); input 0 is the embedding
        self.queries = nn.Parameter(torch.zeros(2 * depth, dim))
        self.key_norms = nn.ModuleList(nn.RMSNorm(dim) for _ in range(2 * depth))

    def _mix(self, k: int, values: list[torch.Tensor]) -> torch.Tensor:
        v = torch.stack(values)  # (sources, B, T, C)
        alpha = torch.softmax(self.key_norms[k - 1](v) @ self.queries[k - 1], dim=0)
        return (alpha.unsqueeze(-1) * v).sum(0)

    def forward(self, h, intervene=None):
        values = [h]
        for l, block in enumerate(self.layers):
            b, mine = block.branch, []
            if b.attn is not None:
                mine.append(b.attn_out(b.attn(b.norm1(h))))
            mine.append(b.mlp_out(b.mlp(b.norm2(self._mix(2 * l + 1, values + mine)))))
            out = self._mix(2 * l + 2, values + mine)
            new = step(intervene, l, h, out)
            if new is not h:
                values += mine
            h = new
        return h
