"""Shared pieces of the per-model measurements: held-out tokens, angles, running means, CKA.

Every per-model evaluator streams over held-out batches and keeps only sums of per-layer (or
layer-pair) quantities, so memory is bounded by layers² × dim, not tokens × layers × dim.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

EPS = 1e-6  # clamp for norms in denominators (as in Csordás et al.)


def token_batches(task, max_tokens: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The task's held-out batches of about ``batch_size`` tokens (positions), cut so that at most
    ``max_tokens`` are measured."""
    out, seen = [], 0
    tokens = task.input.kind == "tokens"
    for x, y in task.eval_batches(max(1, batch_size // (task.input.seq_len if tokens else 1))):
        per_example = x.shape[1] if tokens else 1
        room = (max_tokens - seen) // per_example
        if room <= 0:
            break
        x, y = x[:room], y[:room]
        out.append((x, y))
        seen += x.shape[0] * per_example
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine along the last dim, 0 where either vector is (numerically) zero."""
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    return (a * b).sum(-1) / (na * nb).clamp_min(EPS * EPS)


def angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """∠(a, b) in radians, arccos of the clamped cosine."""
    return torch.arccos(cosine(a, b).clamp(-1.0, 1.0))


def rel_norm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖a‖ / ‖b‖ with the denominator clamped at 1e-6."""
    return a.norm(dim=-1) / b.norm(dim=-1).clamp_min(EPS)


class Sums:
    """Running sums of named per-token tensors shaped (..., tokens); ``means()`` divides by the count."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.maxes: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, values: torch.Tensor, track_max: bool = False):
        v = values.detach().double()
        s = v.sum(-1)
        self.sums[name] = self.sums[name] + s if name in self.sums else s
        self.counts[name] = self.counts.get(name, 0) + v.shape[-1]
        if track_max:
            m = v.amax(-1)
            self.maxes[name] = torch.maximum(self.maxes[name], m) if name in self.maxes else m

    def mean(self, name: str) -> np.ndarray:
        return (self.sums[name] / max(self.counts[name], 1)).cpu().numpy()

    def max(self, name: str) -> np.ndarray:
        return self.maxes[name].cpu().numpy()

    def __contains__(self, name: str) -> bool:
        return name in self.sums


def flat_states(states: list[torch.Tensor]) -> torch.Tensor:
    """h_0 … h_L, each (B, T, D), as one float tensor (L+1, B·T, D)."""
    return torch.stack([s.reshape(-1, s.shape[-1]) for s in states]).float()


def probs_stats(logits: torch.Tensor, ref_logits: torch.Tensor, top: int = 5, chunk: int = 512) -> dict[str, torch.Tensor]:
    """Per-token comparisons of a prediction with a reference one (both (N, V) logits):
    ‖p − p_ref‖₂, KL(p_ref ‖ p), KL(p ‖ p_ref), top-1 agreement and top-k overlap. Works through
    ``chunk`` tokens at a time: with an LLM's vocabulary the float copies are the largest tensors here."""
    if logits.shape[0] > chunk:
        parts = [_probs_stats(a, b, top) for a, b in zip(logits.split(chunk), ref_logits.split(chunk))]
        return {k: torch.cat([part[k] for part in parts]) for k in parts[0]}
    return _probs_stats(logits, ref_logits, top)


def _probs_stats(logits, ref_logits, top):
    lp, lq = F.log_softmax(logits.float(), -1), F.log_softmax(ref_logits.float(), -1)
    p, q = lp.exp(), lq.exp()
    k = min(top, logits.shape[-1])
    tp, tq = lp.topk(k, -1).indices, lq.topk(k, -1).indices
    overlap = (tp.unsqueeze(-1) == tq.unsqueeze(-2)).any(-1).float().mean(-1)
    return {"l2": (p - q).norm(dim=-1), "kl_ref_to": (q * (lq - lp)).sum(-1), "kl_to_ref": (p * (lp - lq)).sum(-1),
            "top1_same": (tp[:, 0] == tq[:, 0]).float(), "topk_overlap": overlap}


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA ‖YᵀX‖_F² / (‖XᵀX‖_F ‖YᵀY‖_F) of column-centred (tokens, features) matrices."""
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    return float((y.T @ x).square().sum() / ((x.T @ x).norm() * (y.T @ y).norm()).clamp_min(1e-300))


class CKA:
    """Linear CKA between every pair of layers, accumulated over batches of tokens.

    ``exact``: streaming sums of the centred cross-covariances (layers² × dim² memory), giving the
    full-data CKA. ``minibatch``: the unbiased HSIC estimator averaged over minibatches of ``n``
    tokens (Nguyen et al. 2021), CKA = Σ HSIC₁(K, L) / √(Σ HSIC₁(K, K) · Σ HSIC₁(L, L)); memory is
    layers × n². ``auto`` takes exact when layers² × dim² stays under 2·10⁷ numbers.
    """

    def __init__(self, method: str = "auto", n: int = 256, seed: int = 0):
        self.method, self.n = method, n
        self.g = torch.Generator().manual_seed(seed)
        self.acc = None
        self.count = 0

    def add(self, s: torch.Tensor):  # (layers, tokens, dim)
        s = s.double()
        if self.method == "auto":
            self.method = "exact" if s.shape[0] ** 2 * s.shape[2] ** 2 <= 2e7 else "minibatch"
        if self.method == "exact":
            cross = torch.einsum("ind,jne->ijde", s, s)
            total = s.sum(1)
            if self.acc is None:
                self.acc = [cross, total]
            else:
                self.acc[0] += cross
                self.acc[1] += total
            self.count += s.shape[1]
            return
        perm = torch.randperm(s.shape[1], generator=self.g).to(s.device)
        for idx in perm.split(self.n):
            if len(idx) >= 4:
                h = hsic_matrix(s[:, idx])
                self.acc = h if self.acc is None else self.acc + h

    def matrix(self) -> np.ndarray:
        if self.acc is None:
            return np.zeros((0, 0))
        if self.method == "exact":
            cross, total = self.acc
            mu = total / self.count
            cov = cross - self.count * torch.einsum("id,je->ijde", mu, mu)
            num = cov.square().sum((-1, -2))
            diag = num.diagonal().sqrt()
            return (num / torch.outer(diag, diag).clamp_min(1e-300)).cpu().numpy()
        h = self.acc
        d = h.diagonal().clamp_min(1e-300).sqrt()
        return (h / torch.outer(d, d)).cpu().numpy()


def hsic_matrix(s: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC₁ (Song et al. 2012) between the linear Gram matrices of every pair of layers.
    ``s``: (layers, n, dim) with n ≥ 4."""
    n = s.shape[1]
    k = s @ s.transpose(1, 2)
    k.diagonal(dim1=1, dim2=2).zero_()
    rows = k.sum(2)  # K̃1
    total = rows.sum(1)  # 1ᵀK̃1
    flat = k.reshape(k.shape[0], -1)
    trace_kl = flat @ flat.T
    return (trace_kl + torch.outer(total, total) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * rows @ rows.T) / (n * (n - 3))


def halves(values, skip_ends: bool = False) -> dict[str, float] | None:
    """Mean of a per-layer profile over the first and the second half of the layers."""
    v = np.asarray(values, float)
    if skip_ends:
        v = v[1:-1]
    if len(v) < 2:
        return None
    h = len(v) // 2
    return {"first_half": float(np.nanmean(v[:h])), "second_half": float(np.nanmean(v[len(v) - h:]))}


def tolist(a) -> list:
    """A numpy array as nested lists of floats with NaN as None (JSON has no NaN)."""
    a = np.asarray(a, float)
    if a.ndim == 0:
        return None if math.isnan(a) else float(a)
    return [tolist(v) for v in a]
