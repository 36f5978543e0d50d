"""Hyper-connections: n parallel residual streams with learned width- and depth-connections.

State: H of shape (batch, seq, n, dim), initialised to n copies of the embedding. Layer l reads
h = Σ_i a_i·H_i (width connection), computes the pre-norm transformer update u = f(h), and writes
H'_j = Σ_i r_ij·H_i + b_j·u (residual mixing plus depth connection). The traced stream is the mean
of the n streams; the readout (rmsnorm, then head) of the sum sees the same thing. A skipped layer
leaves all streams unchanged; a patched stream state shifts every stream by the same amount.

At init (a = e_{l mod n}, r = I, b = 1) every stream carries the same state as the plain pre-norm
stack, so both compute the same function. One hyper-connection wraps a whole transformer block
(attention and MLP together); the papers wrap each sublayer, which doubles the connections.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

import archbench
from archbench.knobs import Range
from archbench.model import Stack, step
from archbench.nn import PreNormBranch

HC = "Zhu et al. 2025, Hyper-Connections (ICLR 2025)"
MHC = "Xie et al. 2025, mHC: Manifold-Constrained Hyper-Connections (DeepSeek)"


class StreamLayer(nn.Module):
    """A layer on n streams: read h = Σ_i a_i·H_i, update u = branch(h), write H'_j = Σ_i r_ij·H_i + b_j·u."""

    def mixing(self, H):
        """a (…, n), r (…, n, n), b (…, n)."""
        raise NotImplementedError

    def forward(self, H):
        a, r, b = self.mixing(H)
        # the streams are the residual: kept in fp32 under autocast, as a plain stack keeps its x
        with torch.autocast(H.device.type, enabled=False):
            h = torch.einsum("...i,...id->...d", a.float(), H)
        u = self.branch(h)
        with torch.autocast(H.device.type, enabled=False):
            return torch.einsum("...ij,...id->...jd", r.float(), H) + b.float().unsqueeze(-1) * u.float().unsqueeze(-2)


class HyperConnection(StreamLayer):
    """One layer: static connections, plus input-dependent ones (tanh, scaled by s = 0.01 at init) if dynamic."""

    def __init__(self, dim: int, n: int, layer_idx: int, dynamic: bool, **branch):
        super().__init__()
        self.branch = PreNormBranch(dim, **branch)
        self.a = nn.Parameter(F.one_hot(torch.tensor(layer_idx % n), n).float())
        self.r = nn.Parameter(torch.eye(n))
        self.b = nn.Parameter(torch.ones(n))
        self.dynamic = dynamic
        if dynamic:
            self.norm = nn.RMSNorm(dim)
            self.w_a, self.w_r, self.w_b = (nn.Linear(dim, k, bias=False) for k in (1, n, 1))
            for w in (self.w_a, self.w_r, self.w_b):
                nn.init.zeros_(w.weight)
            self.s_alpha = nn.Parameter(torch.tensor(0.01))
            self.s_beta = nn.Parameter(torch.tensor(0.01))

    def mixing(self, H):
        if not self.dynamic:
            return self.a, self.r, self.b
        Hn = self.norm(H)
        a = self.a + self.s_alpha * torch.tanh(self.w_a(Hn)).squeeze(-1)
        r = self.r + self.s_alpha * torch.tanh(self.w_r(Hn))
        b = self.b + self.s_beta * torch.tanh(self.w_b(Hn)).squeeze(-1)
        return a, r, b



def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """A doubly stochastic matrix from (…, n, n) logits by alternate row and column normalisation."""
    m = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    for _ in range(iters):
        m = m / m.sum(-1, keepdim=True)
        m = m / m.sum(-2, keepdim=True)
    return m


class ManifoldHyperConnection(StreamLayer):
    """mHC layer: input-dependent a = σ(·), b = 2σ(·) (non-negative) and a residual mixing r kept
    doubly stochastic by Sinkhorn iterations, so the streams' mean is carried through unchanged.

    The projection from the flattened, rms-normalised streams starts at zero: a is a soft one-hot
    summing to 1 (reads stream l mod n), b = 1, r = Sinkhorn(diagonal-heavy logits), which keeps
    equal streams equal, so at init it too is the plain pre-norm stack.
    """

    def __init__(self, dim: int, n: int, layer_idx: int, iters: int, **branch):
        super().__init__()
        self.n, self.iters = n, iters
        self.branch = PreNormBranch(dim, **branch)
        self.phi = nn.Linear(n * dim, 2 * n + n * n, bias=False)
        nn.init.zeros_(self.phi.weight)
        self.gain = nn.Parameter(torch.full((3,), 0.01))  # α_pre, α_post, α_res
        eps = 0.01
        pre = torch.full((n,), eps / (n - 1)) if n > 1 else torch.ones(1)
        pre[layer_idx % n] = 1 - eps if n > 1 else 1.0
        self.b_pre = nn.Parameter(torch.logit(pre.clamp(max=1 - 1e-6)))
        self.b_post = nn.Parameter(torch.zeros(n))
        self.b_res = nn.Parameter(4.0 * torch.eye(n))  # mostly keep each stream (exp(4) ≈ 55 : 1)

    def mixing(self, H):
        n = self.n
        p = self.phi(F.rms_norm(H.flatten(-2), (H.shape[-1] * n,))).float()  # Sinkhorn in fp32 under autocast
        p_pre, p_post, p_res = p.split([n, n, n * n], dim=-1)
        a = torch.sigmoid(self.gain[0] * p_pre + self.b_pre)
        b = 2 * torch.sigmoid(self.gain[1] * p_post + self.b_post)
        r = sinkhorn(self.gain[2] * p_res.unflatten(-1, (n, n)) + self.b_res, self.iters)
        return a, r, b


class MultiStream(Stack):
    """Runs layers that map n streams to n streams; traces their mean."""

    def __init__(self, layers, n: int):
        super().__init__(layers)
        self.n = n

    def forward(self, h, intervene=None):
        H = h.unsqueeze(-2).expand(*h.shape[:-1], self.n, h.shape[-1])
        for l, layer in enumerate(self.layers):
            H_out = layer(H)
            if intervene is None:
                H = H_out
                continue
            out = H_out.mean(-2)
            new = step(intervene, l, h, out)
            if new is not h:  # skipped: the streams stay as they were
                H = H_out if new is out else H_out + (new - out).unsqueeze(-2)
            h = new
        return H.mean(-2) if intervene is None else h


@archbench.register_block("hyper-connections", family="gated", citation=HC)
class HyperConnections(MultiStream):
    """n residual streams with learned width/depth connections (dynamic: input-dependent, DHC)."""

    knobs_from = (PreNormBranch,)

    def __init__(self, dim: int, depth: int, *, streams: Annotated[int, Range(1, 8)] = 4,
                 dynamic: bool = True, **branch):
        super().__init__([HyperConnection(dim, streams, l, dynamic, **branch) for l in range(depth)], streams)


@archbench.register_block("mhc", family="gated", citation=MHC)
class ManifoldHyperConnections(MultiStream):
    """Hyper-connections whose stream-mixing matrix is kept doubly stochastic by Sinkhorn iterations."""

    knobs_from = (PreNormBranch,)

    def __init__(self, dim: int, depth: int, *, streams: Annotated[int, Range(2, 8)] = 4,
                 sinkhorn_iters: Annotated[int, Range(1, 50)] = 20, **branch):
        super().__init__([ManifoldHyperConnection(dim, streams, l, sinkhorn_iters, **branch)
                          for l in range(depth)], streams)
