"""layer-correspondence: does a deeper model spread the same computation over more layers?

For a shallow and a deep model trained on the same task (runs of one sweep with the same seed),
an affine map f_ij(h) = W h + b is fitted by least squares (small ridge) from every state h_i of the
shallow model to every state h_j of the deep one, on the same held-out inputs (Csordás et al.
2025). The maps are fitted on half of the tokens (even indices) and scored on the other half by
the relative error √(Σ‖f(h_i) − h_j‖² / Σ‖h_j‖²). Everything is streamed as sufficient statistics
(XᵀX, XᵀY, Σ‖Y‖²), so memory is states² × width².

For each shallow state i the best-matching deep state j*(i) is the one of least error; the score
``relative_depth_deviation`` = mean_i |j*(i)/b − i/a| (a, b: the two depths) is 0 when the best
matches follow equal relative depth exactly, and about 1/3 when they are unrelated to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch

import archbench
from archbench.evaluator import Evaluator, panels
from archbench.evaluators.layer_similarity import heat
from archbench.knobs import NON_NEGATIVE, POSITIVE, Range
from archbench.measure import flat_states, token_batches, tolist
from archbench.model import trace
from archbench.records import RunRecord


@archbench.register_evaluator("layer-correspondence", family="similarity",
                              citation="Csordás, Manning, Potts 2025 (arXiv 2505.13898)")
class LayerCorrespondence(Evaluator):
    """Affine maps from each layer of a shallower model to each layer of a deeper one (same task, seed)."""

    kind = "sweep"
    needs_models = True

    def __init__(self, *,
                 max_tokens: Annotated[int, Range(64, 10_000_000), POSITIVE] = 8192,
                 batch_tokens: Annotated[int, Range(16, 1_000_000), POSITIVE] = 4096,
                 ridge: Annotated[float, Range(0.0, 1.0), NON_NEGATIVE] = 1e-4,
                 pairs: Literal["deepest", "all"] = "deepest"):
        self.max_tokens, self.batch_tokens, self.ridge, self.pairs = max_tokens, batch_tokens, ridge, pairs

    def evaluate_sweep(self, runs: list[RunRecord], task, models=None) -> dict:
        ok = [r for r in runs if r.ok]
        out = {"pairs": []}
        for seed in sorted({r.seed for r in ok}):
            by_depth = sorted((r for r in ok if r.seed == seed), key=lambda r: r.effective_depth)
            if len(by_depth) < 2:
                continue
            deep = by_depth[-1]
            shallow = by_depth[:-1] if self.pairs == "deepest" else by_depth
            for i, a in enumerate(shallow):
                targets = [deep] if self.pairs == "deepest" else by_depth[i + 1:]
                for b in targets:
                    ma, mb = models(a), models(b)
                    if ma is None or mb is None:
                        continue
                    out["pairs"].append({"seed": seed, "shallow": a.effective_depth, "deep": b.effective_depth,
                                         **self.compare(ma, mb, task)})
        if not out["pairs"]:
            out["note"] = "needs two finished runs of different depths with the same seed (and saved weights)"
            return out
        out["relative_depth_deviation"] = float(np.mean([p["relative_depth_deviation"] for p in out["pairs"]]))
        return out

    @torch.no_grad()
    def compare(self, shallow, deep, task) -> dict:
        """Relative errors of affine maps from every state of ``shallow`` to every state of ``deep``."""
        shallow.eval(), deep.eval()
        stats = None
        for x, _ in token_batches(task, self.max_tokens, self.batch_tokens):
            src, tgt = flat_states(trace(shallow, x, sublayers=False).states).double(), \
                flat_states(trace(deep, x, sublayers=False).states).double()
            src = torch.cat([src, torch.ones_like(src[..., :1])], -1)  # affine: a constant feature
            halves = [(src[:, k::2], tgt[:, k::2]) for k in (0, 1)]  # fit on even tokens, score on odd
            batch = [(torch.einsum("ind,ine->ide", s, s), torch.einsum("ind,jne->ijde", s, t),
                      t.square().sum((1, 2))) for s, t in halves]
            stats = batch if stats is None else [tuple(a + b for a, b in zip(old, new)) for old, new in zip(stats, batch)]
        (xx, xy, _), (xx_t, xy_t, yy_t) = stats
        eye = torch.eye(xx.shape[-1], dtype=xx.dtype, device=xx.device)
        scale = xx.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
        w = torch.linalg.solve((xx + self.ridge * scale[:, None, None] * eye).unsqueeze(1), xy)  # (a+1, b+1, D+1, D)
        sse = (yy_t - 2 * torch.einsum("ijde,ijde->ij", w, xy_t)
               + torch.einsum("ijde,idf,ijfe->ij", w, xx_t, w)).clamp_min(0)
        err = (sse / yy_t.clamp_min(1e-12)).sqrt().cpu().numpy()
        a, b = err.shape[0] - 1, err.shape[1] - 1
        best = err.argmin(1)
        deviation = float(np.mean([abs(best[i] / b - i / a) for i in range(a + 1)]))
        return {"relative_error": tolist(err), "best_target": best.tolist(), "relative_depth_deviation": deviation}

    def plot(self, result: dict, runs: list[RunRecord], path: Path) -> bool:
        if not result.get("pairs"):
            return False
        p = min(result["pairs"], key=lambda p: (p["shallow"], p["seed"]))
        with panels(path, 1, 1, (6, 4.5)) as (fig, ax):
            heat(ax, p["relative_error"], f"relative error, depth {p['shallow']} → {p['deep']}", fig,
                 xlabel=f"state j of the depth-{p['deep']} model", ylabel=f"state i of the depth-{p['shallow']} model")
            rows = np.arange(p["shallow"] + 1)
            ax.plot(p["best_target"], rows, "wo", ms=5, label="best match")
            ax.plot(rows * p["deep"] / p["shallow"], rows, "r--", lw=1, label="equal relative depth")
            ax.legend(fontsize=8, loc="lower left")
        return True
