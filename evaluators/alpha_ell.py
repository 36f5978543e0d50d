"""alpha_ell: how fast the loss falls with effective depth, L(ℓ) = c·ℓ^-α (+ L_0).

α ≈ 1 is the ensemble-averaging regime (Liu et al. 2026); α ≈ 3 is what an Euler-discretised
smooth process gives when converged. The point estimate fits the per-depth mean loss over
replicates. A *replicate* is one student seed on one task configuration (one teacher, on tasks
with teachers: the paper's replicates are its three teachers); its runs at every depth move
together, so the 95 % interval is a bootstrap over replicates (resampled with replacement,
re-averaged per depth, refitted). With a single replicate there is no estimate of the noise and
no interval is given.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import numpy as np
from scipy.optimize import least_squares

import archbench
from archbench.errors import UsageError
from archbench.evaluator import Evaluator, figure
from archbench.knobs import POSITIVE


def fit_power_law(depths, losses, floor: float | str | None = None) -> dict:
    """Fit L = c·ℓ^-α (+ L_0) to per-depth mean losses.

    ``floor``: None (L_0 = 0, ordinary least squares on log-log), a number (subtracted first),
    or ``"fit"`` (L_0 ≥ 0 fitted jointly, least squares on log L; needs three depths).
    Returns alpha, c, floor, the RMS residual of log L and the number of depths used.
    """
    depths, losses = np.asarray(depths, float), np.asarray(losses, float)
    uniq = np.unique(depths)
    mean = np.array([losses[depths == d].mean() for d in uniq])
    x = np.log(uniq)
    if floor == "fit":
        if len(uniq) < 3:
            raise ValueError("fitting a loss floor needs at least three depths")
        slope, icpt = np.polyfit(x, np.log(mean), 1)
        p0 = [icpt, max(-slope, 1e-3), 0.5 * mean.min()]

        def resid(p):
            return np.log(np.exp(p[0]) * uniq ** -p[1] + p[2]) - np.log(mean)

        sol = least_squares(resid, p0, bounds=([-np.inf, 0.0, 0.0], [np.inf, np.inf, mean.min() * (1 - 1e-9)]))
        logc, alpha, l0 = sol.x
        rms = float(np.sqrt(np.mean(sol.fun ** 2)))
        return {"alpha": float(alpha), "c": float(math.exp(logc)), "floor": float(l0), "residual_rms": rms,
                "n_depths": len(uniq)}
    l0 = float(floor or 0.0)
    if np.any(mean <= l0):
        raise ValueError(f"loss floor {l0} is not below every mean loss (min {mean.min():.4g})")
    if len(uniq) < 2:
        raise ValueError("a slope needs at least two depths")
    y = np.log(mean - l0)
    slope, icpt = np.polyfit(x, y, 1)
    rms = float(np.sqrt(np.mean((y - (slope * x + icpt)) ** 2)))
    return {"alpha": float(-slope), "c": float(math.exp(icpt)), "floor": l0, "residual_rms": rms,
            "n_depths": len(uniq)}


def replicate_groups(labels) -> dict:
    """{replicate label: indices of its runs}, in the order the labels first appear."""
    members: dict = {}
    for i, label in enumerate(labels):
        members.setdefault(label, []).append(i)
    return {label: np.array(m) for label, m in members.items()}


def bootstrap_alpha(depths, losses, floor=None, n_boot: int = 1000, seed: int = 0, ci: float = 0.95,
                    replicates=None):
    """Percentile interval of alpha over bootstrap resamples of whole replicates (``replicates[i]`` names
    run i's; default: every run is its own); returns (interval or None, resamples that could be fitted)."""
    depths, losses = np.asarray(depths, float), np.asarray(losses, float)
    groups = list(replicate_groups(range(len(depths)) if replicates is None else replicates).values())
    rng = np.random.default_rng(seed)
    need = 3 if floor == "fit" else 2
    alphas = []
    for _ in range(n_boot):
        idx = np.concatenate([groups[k] for k in rng.integers(0, len(groups), len(groups))])
        if len(np.unique(depths[idx])) < need:
            continue
        try:
            alphas.append(fit_power_law(depths[idx], losses[idx], floor)["alpha"])
        except ValueError:
            continue
    if len(alphas) < 10:
        return None, len(alphas)
    lo, hi = np.percentile(alphas, [50 * (1 - ci), 50 * (1 + ci)])
    return [float(lo), float(hi)], len(alphas)


def per_depth(depths, losses) -> list[dict]:
    """Per depth: the mean loss, its standard error over the runs there (None for one run) and their number."""
    depths, losses = np.asarray(depths, float), np.asarray(losses, float)
    rows = []
    for d in np.unique(depths):
        x = losses[depths == d]
        se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None
        rows.append({"depth": int(d), "mean": float(x.mean()), "se": se, "n": int(len(x))})
    return rows


# 2: the interval is a bootstrap over replicates, none for a single replicate
@archbench.register_evaluator("alpha-ell", family="scaling", version=2,
                              citation="Liu et al. 2026 (arXiv 2602.05970)")
class AlphaEll(Evaluator):
    """Depth-scaling exponent α_ℓ: slope of log test loss against log effective depth, bootstrap 95 % CI."""

    kind = "sweep"

    def __init__(self, *, floor: str = "auto", n_boot: Annotated[int, POSITIVE] = 1000, boot_seed: int = 0):
        # floor: auto (the task's own: 0 for KL, fitted where unknown), none, fit, or a number
        if floor not in ("auto", "none", "fit"):
            try:
                float(floor)
            except ValueError:
                raise UsageError(f"alpha-ell.floor={floor!r}: use auto, none, fit or a number") from None
        self.floor, self.n_boot, self.boot_seed = floor, n_boot, boot_seed

    def floor_for(self, task, n_depths: int):
        """The loss floor the fit uses for ``task`` with ``n_depths`` depths (see the ``floor`` knob)."""
        if self.floor == "auto":
            if task is None:
                return None
            if task.loss_floor is None:  # unknown floor (e.g. language modelling): fit it where possible
                return "fit" if n_depths >= 3 else None
            return task.loss_floor or None
        if self.floor == "none":
            return None
        return "fit" if self.floor == "fit" else float(self.floor)

    def evaluate_sweep(self, runs, task):
        ok = [r for r in runs if r.ok]
        depths = [r.depth for r in ok]
        losses = [r.final_loss for r in ok]
        replicates = [r.replicate for r in ok]
        floor = self.floor_for(task, len(set(depths)))
        out = {"value": None, "ci95": None, "n_runs": len(ok), "n_depths": len(set(depths)),
               "n_replicates": len(set(replicates)), "per_depth": per_depth(depths, losses),
               "floor_mode": "none" if floor is None else str(floor)}
        try:
            fit = fit_power_law(depths, losses, floor)
        except ValueError as e:
            out["note"] = str(e)
            return out
        n_params = 3 if floor == "fit" else 2
        if len(set(replicates)) < 2:  # the spread of single runs is not noise that an interval could measure
            ci, n_ok = None, 0
            out["note"] = ("no interval: one replicate (one run per depth) says nothing about the noise "
                           "(add seeds or teachers)")
        elif len(ok) > n_params:
            ci, n_ok = bootstrap_alpha(depths, losses, floor, self.n_boot, self.boot_seed, replicates=replicates)
        else:  # the curve passes through every run: resamples could only repeat it
            ci, n_ok = None, 0
            out["note"] = f"no interval: {len(ok)} runs for a fit with {n_params} parameters (add seeds or depths)"
        out.update(value=fit["alpha"], ci95=ci, c=fit["c"], floor=fit["floor"], residual_rms=fit["residual_rms"],
                   n_boot=n_ok)
        if by_step := self._by_step(ok, floor, replicates):
            out["by_step"] = by_step
        if floor == "fit" and fit["alpha"] < 1e-6:
            out["note"] = "alpha is at its bound 0: the loss does not fall with depth over these depths"
        return out

    def _by_step(self, ok, floor, replicates) -> list[dict]:
        """α_ℓ at every step where all runs measured their held-out loss (``train.eval_every``), with its
        interval over replicates: how the exponent develops during training."""
        steps = set.intersection(*(set(s for s, _ in r.eval_history) for r in ok)) if ok else set()
        rows = []
        for step in sorted(steps):
            losses = [next(v for s, v in r.eval_history if s == step) for r in ok]
            depths = [r.depth for r in ok]
            try:
                value = fit_power_law(depths, losses, floor)["alpha"]
            except ValueError:
                continue
            ci = bootstrap_alpha(depths, losses, floor, self.n_boot, self.boot_seed, replicates=replicates)[0] \
                if len(set(replicates)) > 1 else None
            rows.append({"step": step, "value": value, "ci95": ci, "per_depth": per_depth(depths, losses)})
        return rows if len(rows) > 1 else []

    def plot(self, result, runs, path: Path) -> bool:
        ok = [r for r in runs if r.ok]
        if not ok:
            return False
        with figure(path, "effective depth ℓ", "test loss") as ax:
            d = np.array([r.depth for r in ok], float)
            loss = np.array([r.final_loss for r in ok], float)
            ax.loglog(d, loss, "o", alpha=0.4, label="runs")
            rows = per_depth(d, loss)
            uniq = np.array([row["depth"] for row in rows], float)
            ax.errorbar(uniq, [row["mean"] for row in rows], yerr=[row["se"] or 0.0 for row in rows], fmt="s",
                        color="C0", capsize=3, label="mean over replicates ± s.e.")
            if result.get("value") is not None:
                grid = np.geomspace(uniq.min(), uniq.max(), 50)
                ci = result.get("ci95")
                ci_txt = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
                ax.loglog(grid, result["c"] * grid ** -result["value"] + result["floor"], "-", color="C1",
                          label=f"fit α_ℓ = {result['value']:.2f}{ci_txt}")
        return True

    def plot_points(self, knobs, points, path: Path) -> bool:
        """α_ℓ with its 95 % interval against a numeric swept knob (the paper's α_ℓ against temperature), one
        line per value of the other knob if two are swept (the teacher kind, say)."""
        numeric = [k for k in knobs if all(isinstance(p["vary"][k], (int, float)) for p in points)]
        if not numeric:
            return False
        x_knob = max(numeric, key=lambda k: len({p["vary"][k] for p in points}))
        series: dict[str, list] = {}
        for p in points:
            if p.get("value") is not None:
                label = ", ".join(f"{k.split('.', 1)[1]}={p['vary'][k]}" for k in knobs if k != x_knob)
                series.setdefault(label, []).append((p["vary"][x_knob], p["value"], p.get("ci95")))
        if not any(len(rows) > 1 for rows in series.values()):
            return False
        with figure(path, x_knob.split(".", 1)[1], "α_ℓ") as ax:
            for label, rows in series.items():
                rows.sort()
                x, y = np.array([r[0] for r in rows], float), np.array([r[1] for r in rows], float)
                err = [[r[1] - r[2][0] if r[2] else 0.0 for r in rows], [r[2][1] - r[1] if r[2] else 0.0 for r in rows]]
                ax.errorbar(x, y, yerr=err, fmt="o-", capsize=3, label=label or "α_ℓ (95 % interval over replicates)")
            xs = [r[0] for rows in series.values() for r in rows]
            if min(xs) > 0 and max(xs) / min(xs) >= 10:
                ax.set_xscale("log")
        return True
