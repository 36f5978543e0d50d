"""regime: which way a block uses its depth on a task, with the evidence behind the call.

Evidence, from a depth sweep:
- α_ℓ and its 95 % interval (the ``alpha-ell`` fit over the sweep's depths);
- φ_mid: the mean neighbouring-update angle ∠(Δh_l, Δh_{l+1}) over the middle layers (all but the
  first and last) of the deepest models (``layer-similarity``), and the coefficient of variation of
  their middle θ_l (how even the updates are);
- the effect of skipping one layer on the later layers' contributions, averaged over layers
  (``skip-sensitivity``'s e_s), and the skip centre.

The rule, tried in this order (thresholds are knobs):
1. **procedural**: φ_mid < ``phi_smooth`` (neighbouring updates point the same way, like the steps
   of a discretised ODE) and α_ℓ ≥ ``alpha_steep``.
2. **compositional**: mean e_s ≥ ``later_break`` (skipping a layer changes what later layers write by
   half or more: they build on it), φ_mid ≥ ``phi_smooth``, and α_ℓ is not within ``alpha_band`` of 1.
3. **ensemble-averaging**: |α_ℓ − 1| ≤ ``alpha_band``, φ_mid ≥ ``phi_uncorrelated`` (weakly
   correlated updates) and mean e_s < ``later_break`` (later layers barely depend on any one layer).
4. otherwise **undetermined**, with the reasons each regime was not called.
"""

from __future__ import annotations

import math
from typing import Annotated

import numpy as np

import archbench
from archbench.evaluator import Evaluator, panels
from archbench.evaluators.alpha_ell import AlphaEll
from archbench.knobs import Range
from archbench.records import RunRecord


# 2: evidence later_effect renamed skip_effect_mean
@archbench.register_evaluator("regime", family="scaling", version=2,
                              citation="Liu et al. 2026 (arXiv 2602.05970); Csordás et al. 2025 (arXiv 2505.13898)")
class Regime(Evaluator):
    """Compositional / procedural / ensemble-averaging / undetermined, from α_ℓ, update angles and skips."""

    kind = "sweep"
    requires = ("layer-similarity", "skip-sensitivity")

    def __init__(self, *,
                 alpha_band: Annotated[float, Range(0.05, 2.0)] = 0.5,
                 alpha_steep: Annotated[float, Range(1.0, 5.0)] = 1.5,
                 phi_smooth: Annotated[float, Range(0.0, 3.14)] = math.pi / 4,
                 phi_uncorrelated: Annotated[float, Range(0.0, 3.14)] = math.pi / 3,
                 later_break: Annotated[float, Range(0.0, 10.0)] = 0.5):
        self.alpha_band, self.alpha_steep = alpha_band, alpha_steep
        self.phi_smooth, self.phi_uncorrelated, self.later_break = phi_smooth, phi_uncorrelated, later_break

    def evaluate_sweep(self, runs: list[RunRecord], task) -> dict:
        alpha = AlphaEll(n_boot=500).evaluate_sweep(runs, task)
        ok = [r for r in runs if r.ok and "layer-similarity" in r.metrics
              and "skip-sensitivity" in r.metrics]
        per_depth = {}
        for d in sorted({r.effective_depth for r in ok}):
            rs = [r for r in ok if r.effective_depth == d]
            per_depth[d] = {k: _mean([evidence(r)[k] for r in rs]) for k in evidence(rs[0])}
        ev = {"alpha": alpha.get("value"), "alpha_ci95": alpha.get("ci95")}
        if per_depth:
            ev.update(per_depth[max(per_depth)], evidence_depth=max(per_depth))
        out = {"evidence": ev, "evidence_by_depth": {str(d): v for d, v in per_depth.items()},
               "thresholds": {"alpha_band": self.alpha_band, "alpha_steep": self.alpha_steep,
                              "phi_smooth": self.phi_smooth, "phi_uncorrelated": self.phi_uncorrelated,
                              "later_break": self.later_break}}
        out["regime"], out["reasons"] = self.call(ev)
        return out

    def call(self, ev: dict) -> tuple[str, list[str]]:
        a, phi, later = ev.get("alpha"), ev.get("phi_mid"), ev.get("skip_effect_mean")
        if phi is None or later is None:
            return "undetermined", ["no layer-similarity or skip-sensitivity results (needs depth ≥ 3)"]
        smooth, steep = phi < self.phi_smooth, a is not None and a >= self.alpha_steep
        near_one = a is not None and abs(a - 1) <= self.alpha_band
        if smooth and steep:
            return "procedural", [f"φ_mid {phi:.2f} < {self.phi_smooth:.2f} rad and α_ℓ {a:.2f} ≥ {self.alpha_steep}"]
        if later >= self.later_break and not smooth and not near_one:
            return "compositional", [f"mean skip effect on later layers {later:.2f} ≥ {self.later_break}, "
                                     f"φ_mid {phi:.2f} rad, α_ℓ {_fmt(a)} not within {self.alpha_band} of 1"]
        if near_one and phi >= self.phi_uncorrelated and later < self.later_break:
            return "ensemble-averaging", [f"α_ℓ {a:.2f} within {self.alpha_band} of 1, φ_mid {phi:.2f} ≥ "
                                          f"{self.phi_uncorrelated:.2f} rad, mean skip effect {later:.2f} < {self.later_break}"]
        reasons = []
        reasons.append("not procedural: " + (f"φ_mid {phi:.2f} ≥ {self.phi_smooth:.2f}" if not smooth
                                             else f"α_ℓ {_fmt(a)} < {self.alpha_steep}"))
        reasons.append("not compositional: " + (f"skip effect {later:.2f} < {self.later_break}" if later < self.later_break
                                                else "φ_mid smooth" if smooth else f"α_ℓ {a:.2f} near 1"))
        reasons.append("not ensemble-averaging: " + ("α_ℓ not fitted" if a is None else f"α_ℓ {a:.2f} not near 1"
                                                    if not near_one else f"φ_mid {phi:.2f} < {self.phi_uncorrelated:.2f}"
                                                    if phi < self.phi_uncorrelated else f"skip effect {later:.2f}"))
        return "undetermined", reasons


    def plot(self, result: dict, runs: list[RunRecord], path) -> bool:
        by_depth = result.get("evidence_by_depth") or {}
        if not by_depth:
            return False
        with panels(path, 1, 3, (13, 4), f"regime: {result['regime']}") as (fig, ax):
            ok = [r for r in runs if r.ok]
            ax[0].loglog([r.effective_depth for r in ok], [r.final_loss for r in ok], "o")
            a = result["evidence"].get("alpha")
            ax[0].set_title(f"test loss, α_ℓ = {a:.2f}" if a is not None else "test loss", fontsize=10)
            depths = [int(d) for d in by_depth]
            for i, (key, label, lines) in enumerate((
                    ("phi_mid", "φ_mid (rad)", [(self.phi_smooth, "smooth below"), (self.phi_uncorrelated, "uncorrelated above")]),
                    ("skip_effect_mean", "mean skip effect on later layers", [(self.later_break, "breaks above")])), 1):
                ax[i].plot(depths, [v[key] for v in by_depth.values()], "o-")
                for y, text in lines:
                    ax[i].axhline(y, color="grey", ls=":", lw=1)
                    ax[i].text(depths[0], y, text, fontsize=7, va="bottom")
                ax[i].set_ylabel(label)
            for axis in ax:
                axis.set_xlabel("effective depth")
                axis.grid(True, alpha=0.3)
        return True


def evidence(run: RunRecord) -> dict:
    """The update and skip statistics of one run that the rule reads."""
    sim, skip = run.metrics["layer-similarity"], run.metrics["skip-sensitivity"]
    phi = sim["per_layer"].get("phi", [])
    theta = np.asarray(sim["per_layer"]["theta"], float)
    mid_phi = phi[1:-1] if len(phi) >= 3 else phi
    mid_theta = theta[1:-1] if len(theta) >= 3 else theta
    later = skip.get("skip_effect") or []
    return {"phi_mid": float(np.mean(mid_phi)) if len(mid_phi) else None,
            "theta_mid": float(mid_theta.mean()),
            "theta_mid_cv": float(mid_theta.std() / max(mid_theta.mean(), 1e-12)),
            "skip_effect_mean": float(np.mean(later)) if later else None,
            "skip_centre_relative": skip.get("skip_centre_relative")}


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _fmt(a):
    return "not fitted" if a is None else f"{a:.2f}"
