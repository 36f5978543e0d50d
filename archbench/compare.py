"""``archbench compare A B``: is sweep A's α_ℓ steeper than B's, and its loss lower, beyond the noise?
With ``--metric M``: is A's held-out M (``loss``, ``error_k4``, ``accuracy``, ...) at one depth
different from B's at one depth (a looped model against a flat one of the same parameters or depth)?

Both differences get a bootstrap interval over replicates (a replicate is one student seed on one
teacher: its runs at every depth move together, as in the alpha-ell evaluator). When A and B ran
the same replicates (the same seeds and teachers) the resampling is *paired*: one draw of
replicates serves both, so what the teachers share cancels out of the difference. Otherwise A and B
are resampled independently. A verdict names a winner only when the 95 % interval of the
difference excludes 0.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from archbench.errors import UsageError, unknown
from archbench.evaluator import point_label
from archbench.evaluators.alpha_ell import fit_power_law, replicate_groups


@dataclasses.dataclass
class Side:
    """One grid point of a result: its finished runs and the loss floor its α_ℓ fit used."""

    label: str
    depths: np.ndarray
    losses: np.ndarray
    replicates: list  # per run: (seed, teacher)
    floor: float | str | None


def side_of_records(label: str, runs: list, floor) -> Side:
    """A Side from finished ``RunRecord``s (the leaderboard's rows)."""
    ok = [r for r in runs if r.ok]
    return Side(label, np.array([r.effective_depth for r in ok], float), np.array([r.final_loss for r in ok], float),
                [r.replicate for r in ok], floor)


def load_result(path: str | Path) -> dict:
    """A result JSON written by ``archbench eval --out``; one clear line if it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file (give result JSONs written by `archbench eval --out`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: not a readable result JSON ({type(e).__name__})") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list) or "metrics" not in data:
        raise UsageError(f"{path}: not an `archbench eval` result (it has no runs and metrics)")
    return data


def sides(result: dict, name: str) -> dict[str, Side]:
    """Each grid point of ``result`` (label -> Side); a result without a grid has one, labelled ''."""
    alpha = result["metrics"].get("alpha-ell", {})
    floors = {point_label(p.get("vary", {})): p.get("floor_mode") for p in alpha.get("points", [alpha])}
    out: dict[str, Side] = {}
    for label in floors:
        runs = [r for r in result["runs"] if r["status"] == "ok" and point_label(r.get("vary", {})) == label]
        floor = floors[label]
        floor = None if floor in (None, "none") else ("fit" if floor == "fit" else float(floor))
        out[label] = Side(f"{name}{' (' + label + ')' if label else ''}", np.array([r["depth"] for r in runs], float),
                          np.array([r["final_loss"] for r in runs], float),
                          [(r["seed"], r.get("teacher")) for r in runs], floor)
    return out


def compare_sides(a: Side, b: Side, n_boot: int = 2000, seed: int = 0) -> dict:
    """α_ℓ(A) − α_ℓ(B) and the mean loss difference at the deepest depth both have, with 95 % intervals."""
    common = sorted(set(a.depths) & set(b.depths))
    if not common:
        raise UsageError(f"{a.label} and {b.label} share no depth: their losses cannot be compared")
    deepest = common[-1]
    alpha_a, alpha_b = (fit_power_law(s.depths, s.losses, s.floor)["alpha"] for s in (a, b))
    loss_a, loss_b = (float(s.losses[s.depths == deepest].mean()) for s in (a, b))
    ma, mb = replicate_groups(a.replicates), replicate_groups(b.replicates)
    paired = set(ma) == set(mb)
    out = {"a": a.label, "b": b.label, "alpha": {"a": alpha_a, "b": alpha_b, "diff": alpha_a - alpha_b, "ci95": None},
           "loss": {"depth": int(deepest), "a": loss_a, "b": loss_b, "diff": loss_a - loss_b,
                    "relative": loss_a / loss_b - 1, "ci95": None},
           "replicates": {"a": len(ma), "b": len(mb), "paired": paired}, "n_boot": 0}
    if len(ma) < 2 or len(mb) < 2:
        out["note"] = "no interval: a side with one replicate says nothing about the noise (add --seeds or --teachers)"
        return _verdicts(out)
    rng = np.random.default_rng(seed)
    keys_a, keys_b = list(ma), list(mb)
    d_alpha, d_loss = [], []
    for _ in range(n_boot):
        pick_a = rng.integers(0, len(keys_a), len(keys_a))
        pick_b = pick_a if paired else rng.integers(0, len(keys_b), len(keys_b))
        ia = np.concatenate([ma[keys_a[k]] for k in pick_a])
        ib = np.concatenate([mb[keys_a[k] if paired else keys_b[k]] for k in pick_b])
        try:
            fa = fit_power_law(a.depths[ia], a.losses[ia], a.floor)["alpha"]
            fb = fit_power_law(b.depths[ib], b.losses[ib], b.floor)["alpha"]
        except ValueError:  # a resample that lost a depth
            continue
        at_a, at_b = a.losses[ia][a.depths[ia] == deepest], b.losses[ib][b.depths[ib] == deepest]
        if len(at_a) and len(at_b):
            d_alpha.append(fa - fb)
            d_loss.append(at_a.mean() - at_b.mean())
    if len(d_alpha) >= 10:
        out["alpha"]["ci95"] = [float(x) for x in np.percentile(d_alpha, [2.5, 97.5])]
        out["loss"]["ci95"] = [float(x) for x in np.percentile(d_loss, [2.5, 97.5])]
        out["n_boot"] = len(d_alpha)
    return _verdicts(out)


def _verdicts(out: dict) -> dict:
    for key, better in (("alpha", "steeper"), ("loss", "lower")):
        ci = out[key]["ci95"]
        if ci is None:
            out[key]["verdict"] = "no interval"
        elif ci[0] > 0:
            out[key]["verdict"] = f"A is {better}" if key == "alpha" else "B is lower"
        elif ci[1] < 0:
            out[key]["verdict"] = f"B is {better}" if key == "alpha" else "A is lower"
        else:
            out[key]["verdict"] = "not distinguishable (the interval covers 0)"
    return out


def compare(path_a: str | Path, path_b: str | Path, n_boot: int = 2000, seed: int = 0) -> dict:
    """Compare two results grid point by grid point (points with the same label; a single point each otherwise)."""
    ra, rb = load_result(path_a), load_result(path_b)
    sa, sb = sides(ra, "A"), sides(rb, "B")
    if len(sa) == 1 and len(sb) == 1:
        pairs = [(next(iter(sa.values())), next(iter(sb.values())))]
    else:
        shared = [label for label in sa if label in sb]
        if not shared:
            raise UsageError(f"the grids differ ({', '.join(sa)} against {', '.join(sb)}): no grid point to compare")
        pairs = [(sa[label], sb[label]) for label in shared]
    return {"a": {"path": str(path_a), "block": ra.get("block"), "task": ra.get("task")},
            "b": {"path": str(path_b), "block": rb.get("block"), "task": rb.get("task")},
            "differs": _differences(ra, rb),
            "comparisons": [compare_sides(x, y, n_boot, seed) for x, y in pairs]}


def _differences(ra: dict, rb: dict) -> list[str]:
    """What separates the two sweeps: block, task and the settings that differ (besides the teachers)."""
    out = [f"{k}: {ra.get(k)} vs {rb.get(k)}" for k in ("block", "task") if ra.get(k) != rb.get(k)]
    ca, cb = ra.get("config", {}), rb.get("config", {})
    sections = ("block", "task", "model", "train") if ra.get("block") == rb.get("block") else ("task", "model", "train")
    for section in sections:
        a, b = ca.get(section, {}), cb.get(section, {})
        out += [f"{section}.{k}: {a.get(k)} vs {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return out


def compare_metric(path_a: str | Path, path_b: str | Path, metric, depths: tuple[int, int] | None = None,
                   n_boot: int = 2000, seed: int = 0) -> dict:
    """Held-out ``metric`` of A at ``depths[0]`` minus B's at ``depths[1]`` (default: the deepest depth both
    trained), means over replicates, with a bootstrap 95 % interval (paired where both ran the same ones)."""
    ra, rb = load_result(path_a), load_result(path_b)
    va, vb = _metric_at(ra, metric, "A", path_a), _metric_at(rb, metric, "B", path_b)
    if depths is None:
        common = sorted(set(va) & set(vb))
        if not common:
            raise UsageError(f"A ({', '.join(map(str, sorted(va)))}) and B ({', '.join(map(str, sorted(vb)))}) share "
                             f"no depth: name the two to compare with --depths A_DEPTH,B_DEPTH")
        depths = (common[-1], common[-1])
    for side, d, vals in (("A", depths[0], va), ("B", depths[1], vb)):
        if d not in vals:
            raise UsageError(f"--depths: {side} has no finished run at depth {d} (it has {', '.join(map(str, sorted(vals)))})")
    a, b = va[depths[0]], vb[depths[1]]
    paired = set(a) == set(b)
    mean_a, mean_b = float(np.mean(list(a.values()))), float(np.mean(list(b.values())))
    out = {"a": {"path": str(path_a), "block": ra.get("block"), "depth": depths[0], "mean": mean_a,
                 "replicates": len(a)},
           "b": {"path": str(path_b), "block": rb.get("block"), "depth": depths[1], "mean": mean_b,
                 "replicates": len(b)},
           "metric": getattr(metric, "__name__", metric), "diff": mean_a - mean_b, "paired": paired, "ci95": None, "n_boot": 0}
    out["ci95"] = mean_difference_ci(a, b, n_boot, seed)
    if out["ci95"] is None:
        out["note"] = "no interval: a side with one replicate says nothing about the noise (add --seeds or --teachers)"
    else:
        out["n_boot"] = n_boot
    out["verdict"] = level_verdict(out["ci95"])
    return out


def mean_difference_ci(a: dict, b: dict, n_boot: int = 2000, seed: int = 0) -> list[float] | None:
    """Bootstrap 95 % interval of mean(a) − mean(b), where ``a`` and ``b`` map a replicate to its value:
    paired (one draw of replicates serves both) when both have the same replicates; None with fewer than two."""
    if len(a) < 2 or len(b) < 2:
        return None
    paired = set(a) == set(b)
    rng = np.random.default_rng(seed)
    keys_a = list(a)
    xa, xb = np.array([a[k] for k in keys_a]), np.array([b[k] for k in (keys_a if paired else b)])
    pick_a = rng.integers(0, len(xa), (n_boot, len(xa)))
    pick_b = pick_a if paired else rng.integers(0, len(xb), (n_boot, len(xb)))
    return [float(x) for x in np.percentile(xa[pick_a].mean(1) - xb[pick_b].mean(1), [2.5, 97.5])]


def level_verdict(ci: list[float] | None) -> str:
    if ci is None:
        return "no interval"
    return "A is higher" if ci[0] > 0 else "A is lower" if ci[1] < 0 else "not distinguishable (the interval covers 0)"


def _metric_at(result: dict, metric, name: str, path) -> dict[int, dict]:
    """depth -> {replicate: the run's held-out ``metric``} over ``result``'s finished runs (one grid point);
    ``metric`` is a held-out metric's name or a function of a run's held-out metrics."""
    runs = [r for r in result["runs"] if r["status"] == "ok"]
    labels = {point_label(r.get("vary", {})) for r in runs}
    if len(labels) > 1:
        raise UsageError(f"{path}: a grid of {len(labels)} points ({', '.join(sorted(labels))}); --metric compares "
                         f"one sweep with one sweep")
    have = sorted({k for r in runs for k in (r.get("eval") or {})})
    if not runs or not (callable(metric) or metric in have):
        raise unknown(f"held-out metric of {name}", metric, have)
    out: dict[int, dict] = {}
    for r in runs:
        value = metric(r["eval"]) if callable(metric) else r["eval"][metric]
        out.setdefault(int(r["depth"]), {})[(r["seed"], r.get("teacher"))] = float(value)
    return out
