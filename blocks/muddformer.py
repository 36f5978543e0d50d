"""MUDDFormer: after every block, per-position weights over all earlier layers make each input of the
next block (its queries, keys, values and residual) separately."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

import archbench
from archbench.model import Stack, step
from archbench.nn import PreNormBlock


class DenseMix(nn.Module):
    """The mix after one block: for each of ``ways`` streams, Σⱼ wⱼ·Xⱼ over the ``sources`` layers so far
    (embedding first, the block's output last), wⱼ = static aⱼ + W₂·GELU(W₁·rmsnorm(X_last)) per position.

    As the authors' code and released configuration: W₁'s width (sources·ways, ×4 for the last block's
    single stream) rounded up to a multiple of 64; W₂ zero and a = 1 on the newest layer, 0 elsewhere,
    so that at init every stream is the block's output: the plain pre-norm transformer."""

    def __init__(self, dim: int, sources: int, ways: int, *, dynamic: bool, last: bool):
        super().__init__()
        self.ways, self.sources = ways, sources
        static = torch.zeros(ways, sources)
        static[:, -1] = 1.0
        self.static = nn.Parameter(static)
        self.w1 = self.w2 = None
        if dynamic:
            hidden = (sources * ways * (4 if last else 1) // 64 + 1) * 64
            self.w1 = nn.Linear(dim, hidden, bias=False)
            self.w2 = nn.Linear(hidden, ways * sources, bias=False)
            nn.init.zeros_(self.w2.weight)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:  # sources × (B, T, C) -> (ways, B, T, C)
        w = self.static[:, None, None, :]  # (ways, 1, 1, sources)
        if self.w1 is not None:
            newest = F.rms_norm(xs[-1], (xs[-1].shape[-1],))
            w = w + self.w2(F.gelu(self.w1(newest))).unflatten(-1, (self.ways, self.sources)).movedim(-2, 0)
        with torch.autocast(xs[-1].device.type, enabled=False):  # the mixes are residual streams: fp32 under autocast
            return torch.einsum("sbtc,wbts->wbtc", torch.stack(xs), w.to(xs[-1].dtype))


@archbench.register_block("muddformer", family="gated",
                          citation="Xiao et al. 2025, MUDDFormer: Breaking Residual Bottlenecks in Transformers via "
                                   "Multiway Dynamic Dense Connections (ICML 2025, arXiv 2502.12170)")
class MUDDFormer(Stack):
    """Pre-norm blocks whose inputs are dynamic dense mixes of the embedding and every earlier block
    output (``DenseMix``): block i + 1 reads its queries, keys and values each from its own mix (each
    with its own pre-norm, from the second block on) and adds its update to a fourth, the residual
    stream; the last block's mix makes the residual stream only, which the readout reads.
    ``ways=r`` mixes one stream for everything (the paper's DynamicDense ablation), ``dynamic=false``
    keeps the static weights only.

    The traced stream is the residual mix, the next block's residual input. A skipped (or patched)
    layer leaves that stream as every input of the next block and as its own entry among the layers.
    """

    knobs_from = (PreNormBlock,)

    def __init__(self, dim: int, depth: int, *, ways: Literal["qkvr", "r"] = "qkvr", dynamic: bool = True,
                 **branch):
        super().__init__([PreNormBlock(dim, **branch) for _ in range(depth)])
        self.multiway = ways == "qkvr" and self.layers[0].branch.attn is not None
        n = 4 if self.multiway else 1
        self.mixes = nn.ModuleList(DenseMix(dim, l + 2, 1 if l == depth - 1 else n, dynamic=dynamic,
                                            last=l == depth - 1) for l in range(depth))
        # the keys' and values' pre-norms of blocks 1..depth-1 (block 0 reads one stream: its norm1)
        self.kv_norms = nn.ModuleList(nn.ModuleList(type(b.branch.norm1)(dim) for _ in range(2))
                                      for b in self.layers[1:]) if self.multiway else None

    def _block(self, l: int, q, k, v, r):
        b = self.layers[l].branch
        a = 0.0
        if b.attn is not None:
            kv = tuple(norm(x) for norm, x in zip(self.kv_norms[l - 1], (k, v))) if self.multiway and l else None
            a = b.attn_out(b.attn(b.norm1(q), kv=kv))
        x = r + a
        return x + b.mlp_out(b.mlp(b.norm2(x)))

    def forward(self, h, intervene=None):
        xs, streams = [h], (h,) * 4  # queries, keys, values, residual
        for l in range(len(self.layers)):
            xs.append(self._block(l, *streams))
            mixed = self.mixes[l](xs).unbind(0)
            new = step(intervene, l, streams[3], mixed[-1])
            if new is not mixed[-1]:
                xs[-1] = new
            streams = mixed if len(mixed) == 4 and new is mixed[-1] else (new,) * 4
        return streams[3]
