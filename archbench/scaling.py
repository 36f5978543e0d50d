"""The loss decomposition of Liu et al. (arXiv 2602.05970, Eq. 3) fitted to published training runs.

    L(m, ℓ, D) = c_m·m^-α_m + c_ℓ·ℓ^-α_ℓ + c_D·D^-α_D + L_0

m = d_model, ℓ = n_layers − depth offset, D = training tokens. Seven parameters, fitted as
(α_m, α_ℓ, α_D, log c_m, log c_ℓ, log c_D, log L_0) by least squares on log L − log L_pred.
Everything returned is a plain JSON-ready dict.
"""

from __future__ import annotations

import csv
import itertools
import math
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares

from archbench.errors import ArchbenchError

FIT_COLUMNS = ("loss", "d_model", "n_layers", "num_tokens")
COLUMNS = ("model_size", "FLOP") + FIT_COLUMNS  # model_size and FLOP are checked when present, not used
PARAMS = ("alpha_m", "alpha_ell", "alpha_D", "log_c_m", "log_c_ell", "log_c_D", "log_L0")
EXPONENTS = PARAMS[:3]
MODEL = "L = c_m*m^-alpha_m + c_ell*ell^-alpha_ell + c_D*D^-alpha_D + L0  (m=d_model, ell=n_layers-offset, D=tokens)"
BUNDLED_NAME = "chinchilla_depth.csv"
SENSITIVITY_EXCLUDE = (0, 20, 40, 60, 80)
SENSITIVITY_OFFSETS = (0, 2)
# least_squares settings: run to convergence, not to a loose default
SOLVER = {"method": "lm", "xtol": 1e-14, "ftol": 1e-14, "gtol": 1e-14, "max_nfev": 10_000}

CITATION = {
    "law": ("Liu, Kangaslahti, Liu, Gore. Inverse Depth Scaling From Most Layers Being Similar. "
            "arXiv 2602.05970 (ICML 2026)"),
    "data": [
        "Hoffmann et al. Training Compute-Optimal Large Language Models. arXiv 2203.15556 (2022)",
        "Besiroglu, Erdil, Barnett, You. Chinchilla Scaling: A replication attempt. arXiv 2404.10102 (2024)",
    ],
}
# Liu et al.'s reported values on the bundled data, 203 runs (value, uncertainty or None)
PAPER = {
    0: {"alpha_m": (0.98, 0.08), "alpha_ell": (1.2, 0.3), "alpha_D": (0.30, 0.01), "mean_relative_error": 0.004},
    2: {"alpha_ell": (1.1, None)},
}


@dataclass
class Runs:
    """Training runs: one float array per column, and where they came from."""

    source: str
    columns: dict[str, np.ndarray] = field(repr=False)
    bundled: bool = False

    def __len__(self) -> int:
        return len(self.columns["loss"])


def bundled_csv():
    return files("archbench") / "data" / BUNDLED_NAME


def load_runs(path: str | Path | None = None) -> Runs:
    """Read a runs CSV (default: the bundled Chinchilla runs); bad input raises a one-line ArchbenchError."""
    if path is None:
        return _parse(bundled_csv().read_text(encoding="utf-8"), f"bundled {BUNDLED_NAME}", bundled=True)
    p = Path(path)
    if not p.exists():
        raise ArchbenchError(f"{p}: no such file")
    if not p.is_file():
        raise ArchbenchError(f"{p}: not a file")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ArchbenchError(f"{p}: not a text CSV file (cannot decode as UTF-8)") from None
    return _parse(text, str(p))


def _parse(text: str, name: str, bundled: bool = False) -> Runs:
    reader = csv.reader(text.splitlines())
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise ArchbenchError(f"{name}: empty file, expected a header with columns {', '.join(FIT_COLUMNS)}") from None
    missing = [c for c in FIT_COLUMNS if c not in header]
    if missing:
        raise ArchbenchError(f"{name}: missing column{'s' * (len(missing) > 1)} {', '.join(missing)} "
                             f"(need {', '.join(FIT_COLUMNS)}; header is {','.join(header)})")
    where = {c: header.index(c) for c in COLUMNS if c in header}
    values = {c: [] for c in where}
    try:
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            line = reader.line_num
            for col, i in where.items():
                if i >= len(row):
                    raise ArchbenchError(f"{name}: line {line}: column {col} is missing ({len(row)} fields, "
                                         f"header has {len(header)})")
                cell = row[i].strip()
                try:
                    v = float(cell)
                except ValueError:
                    raise ArchbenchError(f"{name}: line {line}: column {col}: {cell!r} is not a number") from None
                if not math.isfinite(v) or v <= 0:
                    raise ArchbenchError(f"{name}: line {line}: column {col}: {cell!r} is not a finite positive number")
                values[col].append(v)
    except csv.Error as e:
        raise ArchbenchError(f"{name}: line {reader.line_num}: {e}") from None
    if not values["loss"]:
        raise ArchbenchError(f"{name}: no runs after the header")
    return Runs(name, {c: np.asarray(v) for c, v in values.items()}, bundled)


def keep_mask(loss: np.ndarray, exclude: int) -> np.ndarray:
    """Drop the ``exclude`` highest-loss runs; runs tied with the last one dropped go too."""
    if exclude < 0:
        raise ArchbenchError(f"exclude must be >= 0, got {exclude}")
    if exclude == 0:
        return np.ones(len(loss), bool)
    if exclude >= len(loss):
        raise ArchbenchError(f"cannot exclude {exclude} runs: there are only {len(loss)}")
    return loss < np.sort(loss)[-exclude]


def design(runs: Runs, exclude: int = 40, depth_offset: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X, y, mask): X = log(m, ℓ − offset, D) and y = log L of the kept runs."""
    try:
        mask = keep_mask(runs.columns["loss"], exclude)
    except ArchbenchError as e:
        raise ArchbenchError(f"{runs.source}: {e}") from None
    if mask.sum() <= len(PARAMS):
        raise ArchbenchError(f"{runs.source}: {mask.sum()} runs left after excluding {exclude}; "
                             f"{len(PARAMS)} parameters need more")
    # checked on every run, excluded ones too: the plot predicts those as well
    if runs.columns["n_layers"].min() <= depth_offset:
        raise ArchbenchError(f"{runs.source}: depth offset {depth_offset} leaves a non-positive depth "
                             f"(smallest n_layers is {runs.columns['n_layers'].min():g})")
    c = {k: v[mask] for k, v in runs.columns.items()}
    for col in ("d_model", "n_layers", "num_tokens"):
        # a power law plus a shared constant cannot be told apart on fewer than three levels
        if len(np.unique(c[col])) < 3:
            raise ArchbenchError(f"{runs.source}: column {col} has {len(np.unique(c[col]))} distinct value(s) "
                                 f"in the runs kept; its exponent needs at least 3")
    depth = c["n_layers"] - depth_offset
    X = np.log(np.column_stack([c["d_model"], depth, c["num_tokens"]]))
    return X, np.log(c["loss"]), mask


def _shares(p: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log L_pred, each term's share of L_pred), overflow-safe; the four terms are the columns."""
    z = np.empty((len(X), 4))
    np.subtract(p[3:6], p[:3] * X, out=z[:, :3])
    z[:, 3] = p[6]
    top = z.max(axis=1, keepdims=True)
    e = np.exp(z - top)
    total = e.sum(axis=1, keepdims=True)
    return (top + np.log(total))[:, 0], e / total


def log_predict(p: np.ndarray, X: np.ndarray) -> np.ndarray:
    return _shares(p, X)[0]


def residuals(p: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    return _shares(p, X)[0] - y


def jacobian(p: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """d residual / d params: each term's share w of L_pred, times −log x for its exponent."""
    w = _shares(p, X)[1]
    return np.hstack([-X * w[:, :3], w])


def starting_points(X: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """A small grid: exponents in {0.3, 1, 2} each, L_0 at half or 90 % of the smallest loss."""
    loss, med = np.exp(y), np.median(X, axis=0)
    starts = []
    for alphas in itertools.product((0.3, 1.0, 2.0), repeat=3):
        for frac in (0.5, 0.9):
            L0 = frac * loss.min()
            share = max(np.median(loss) - L0, 1e-3 * loss.min()) / 3  # each term a third of the rest
            a = np.array(alphas)
            starts.append(np.r_[a, np.log(share) + a * med, np.log(L0)])
    return starts


def _solve(x0, X, y):
    return least_squares(residuals, x0, jac=jacobian, args=(X, y), **SOLVER)


def fit_law(X: np.ndarray, y: np.ndarray, starts: list[np.ndarray] | None = None):
    """Fit from every start, keep the lowest cost: an OptimizeResult with ``starts`` and ``starts_reaching_best``."""
    if len(y) <= len(PARAMS):
        raise ArchbenchError(f"{len(y)} runs: {len(PARAMS)} parameters need more")
    results = [_solve(s, X, y) for s in (starts if starts is not None else starting_points(X, y))]
    results = [r for r in results if np.isfinite(r.cost)]
    if not results:
        raise ArchbenchError("the fit failed from every starting point")
    best = min(results, key=lambda r: r.cost)
    best.starts = len(results)
    # relative for a real fit, absolute for exact synthetic data where every cost is ~0
    best.starts_reaching_best = sum(r.cost <= best.cost * (1 + 1e-6) + 1e-16 for r in results)
    return best


def gauss_newton_se(jac: np.ndarray, resid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(SE, covariance) = σ²(JᵀJ)⁻¹ with σ² = Σr²/(n − p); NaN where JᵀJ is singular."""
    n, p = jac.shape
    sigma2 = float(resid @ resid) / (n - p)
    _, s, vt = np.linalg.svd(jac, full_matrices=False)
    if s[-1] <= s[0] * 1e-12:
        cov = np.full((p, p), np.nan)
    else:
        cov = sigma2 * (vt.T / s**2) @ vt
    return np.sqrt(np.diag(cov)), cov


def bootstrap(X, y, x0, resamples: int, seed: int) -> tuple[np.ndarray, int]:
    """Refit ``resamples`` resampled data sets from ``x0``; returns the converged solutions and their count."""
    rng = np.random.default_rng(seed)
    out = []
    for idx in rng.integers(0, len(y), size=(resamples, len(y))):
        r = _solve(x0, X[idx], y[idx])
        if r.status > 0 and np.all(np.isfinite(r.x)):
            out.append(r.x)
    return np.array(out).reshape(-1, len(PARAMS)), len(out)


def _num(v):
    v = float(v)
    return v if math.isfinite(v) else None


def fit_scaling(runs: Runs, exclude: int = 40, depth_offset: int = 0, bootstrap_resamples: int = 200,
                seed: int = 0, sensitivity: bool = True) -> dict:
    """The full analysis: fit, Gauss-Newton SEs, bootstrap intervals, error, sensitivity table."""
    X, y, mask = design(runs, exclude, depth_offset)
    best = fit_law(X, y)
    p = best.x
    r = residuals(p, X, y)
    se, cov = gauss_newton_se(jacobian(p, X, y), r)

    ci = {}
    boot = None
    if bootstrap_resamples > 0:
        samples, ok = bootstrap(X, y, p, bootstrap_resamples, seed)
        boot = {"resamples": bootstrap_resamples, "converged": ok, "seed": seed, "level": 0.95,
                "method": "percentile, each resample refitted from the full-data solution"}
        if ok >= 2:
            for i, name in enumerate(EXPONENTS):
                ci[name] = [float(v) for v in np.percentile(samples[:, i], [2.5, 97.5])]
            ci["L0"] = [float(v) for v in np.percentile(np.exp(samples[:, 6]), [2.5, 97.5])]

    L0 = math.exp(p[6])
    result = {
        "model": MODEL,
        "options": {"exclude": exclude, "depth_offset": depth_offset, "bootstrap": bootstrap_resamples, "seed": seed},
        "data": {"source": runs.source, "bundled": runs.bundled, "n_runs": len(runs),
                 "citation": {"law": CITATION["law"], "data": CITATION["data"] if runs.bundled else None}},
        "n_used": int(mask.sum()),
        "exponents": {name: {"value": float(p[i]), "se": _num(se[i]), "ci95": ci.get(name)}
                      for i, name in enumerate(EXPONENTS)},
        "L0": {"value": L0, "se": _num(L0 * se[6]), "ci95": ci.get("L0")},  # SE by the delta method from log L0
        "coefficients": {name[4:]: {"value": math.exp(p[i]), "log_value": float(p[i]), "log_se": _num(se[i])}
                         for i, name in enumerate(PARAMS[3:6], start=3)},
        "params": {name: {"value": float(p[i]), "se": _num(se[i])} for i, name in enumerate(PARAMS)},
        "covariance": [[_num(v) for v in row] for row in cov],
        "mean_relative_error": float(np.mean(np.abs(np.expm1(r)))),
        "rmse_log": float(np.sqrt(np.mean(r**2))),
        "convergence": {"converged": bool(best.status > 0), "status": int(best.status), "message": best.message,
                        "nfev": int(best.nfev), "optimality": float(best.optimality), "cost": float(best.cost),
                        "starts": best.starts, "starts_reaching_best": int(best.starts_reaching_best),
                        "solver": dict(SOLVER)},
        "bootstrap": boot,
        "sensitivity": sensitivity_table(runs) if sensitivity else None,
    }
    return result


def sensitivity_table(runs: Runs, excludes=SENSITIVITY_EXCLUDE, offsets=SENSITIVITY_OFFSETS) -> list[dict]:
    """α_ℓ (value, SE) for each filter × depth convention; a cell that cannot be fitted carries its reason."""
    rows = []
    for exclude, offset in itertools.product(excludes, offsets):
        row = {"exclude": exclude, "depth_offset": offset}
        try:
            X, y, _ = design(runs, exclude, offset)
            best = fit_law(X, y)
        except ArchbenchError as e:
            rows.append({**row, "error": str(e)})
            continue
        se, _ = gauss_newton_se(jacobian(best.x, X, y), best.fun)
        rows.append({**row, "n_used": len(y), "alpha_ell": float(best.x[1]), "se": _num(se[1]),
                     "alpha_m": float(best.x[0]), "alpha_D": float(best.x[2]), "converged": bool(best.status > 0)})
    return rows


def plot_fit(runs: Runs, result: dict, path: str | Path) -> Path:
    """Predicted against observed loss, log-log, with the y = x line; excluded runs in grey."""
    from matplotlib.ticker import FixedLocator, FormatStrFormatter, MaxNLocator, NullLocator

    from archbench.evaluator import figure

    opts = result["options"]
    X, y, _ = design(runs, 0, opts["depth_offset"])
    keep = keep_mask(runs.columns["loss"], opts["exclude"])
    pred = np.exp(log_predict(np.array([result["params"][k]["value"] for k in PARAMS]), X))
    obs = np.exp(y)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    e = result["exponents"]
    with figure(path, "observed loss", "predicted loss", legend_size=8) as ax:
        lo, hi = min(obs.min(), pred.min()) * 0.97, max(obs.max(), pred.max()) * 1.03
        ax.plot([lo, hi], [lo, hi], color="k", lw=0.8, label="y = x")
        ax.scatter(obs[keep], pred[keep], s=10, label=f"fitted ({keep.sum()} runs)")
        if (~keep).any():
            ax.scatter(obs[~keep], pred[~keep], s=10, color="0.6", marker="x",
                       label=f"excluded ({(~keep).sum()} highest-loss)")
        ticks = [v for v in MaxNLocator(nbins=6).tick_values(lo, hi) if lo <= v <= hi]
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        # plain labels at round losses; log-axis defaults read "3 x 10^0" over so short a range
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(FixedLocator(ticks))
            axis.set_major_formatter(FormatStrFormatter("%g"))
            axis.set_minor_locator(NullLocator())
        depth = "ℓ" if not opts["depth_offset"] else f"ℓ−{opts['depth_offset']}"
        ax.set_title(f"α_m={e['alpha_m']['value']:.2f}  α_ℓ={e['alpha_ell']['value']:.2f}  "
                     f"α_D={e['alpha_D']['value']:.3f}  (depth {depth})", fontsize=9)
    return path
