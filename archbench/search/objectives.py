"""What a search trial is scored on: each objective reads a finished eval result (and, for the
pruner, the depths finished so far)."""

from __future__ import annotations

import dataclasses

from archbench.errors import UsageError, unknown
from archbench.records import RunRecord


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    direction: str  # "maximize" or "minimize"
    evaluators: tuple[str, ...]  # what the trial's eval must run
    help: str
    task: str | None = None  # the task it is measured on (at the study's --preset); None: the study's --task


OBJECTIVES = {o.name: o for o in (
    Objective("alpha", "maximize", ("alpha-ell",), "α_ℓ of the loss-depth fit: above 1 escapes ensemble averaging"),
    Objective("loss", "minimize", (), "held-out loss at the largest depth (mean over seeds)"),
    Objective("depth-to-solve", "minimize", ("depth-to-solve",),
              "depth that solves the hardest difficulty (unsolved: twice the largest depth tried)"),
    Objective("redundancy", "minimize", ("skip-sensitivity",),
              "1 - mean effect of skipping a layer on later layers, at the largest depth (floored at 0)"),
    # the project's question, each on the task that asks it whatever the study's --task
    Objective("compose", "minimize", (), "held-out hop-induction error averaged over k = 1 to the hardest k "
              "trained, largest depth, mean over seeds: compositional use of depth", "hop-induction"),
    Objective("lm-loss", "minimize", (), "held-out loss on lm-char at the largest depth, mean over seeds: what "
              "ensemble averaging is good at", "lm-char"),
)}


def error_over_k(metrics: dict) -> float | None:
    """Held-out error averaged over the hop counts k ≥ 1 a hop-induction run was scored on (k = 0 copies; every
    other k composes). Not the hardest k alone: early in training that one sits at the rate of its commonest
    label ("does not exist", about 1/3 at k = 8) for a model that solves k ≤ 3 as for one that solves k ≤ 1."""
    ks = [k for k in metrics if k.startswith("error_k") and k[7:].isdigit() and int(k[7:]) >= 1]
    return sum(float(metrics[k]) for k in ks) / len(ks) if ks else None


def _deepest(runs: list[dict]) -> list[dict]:
    ok = [r for r in runs if r["status"] == "ok"]
    top = max((r["depth"] for r in ok), default=None)
    return [r for r in ok if r["depth"] == top]


def objective_value(name: str, result: dict, headline: str | None = None) -> float | None:
    """The objective ``name`` of a finished eval result (None if it could not be computed); ``headline``:
    the name of the task's headline held-out metric (``Task.headline_metric``)."""
    metrics, runs = result["metrics"], result["runs"]
    if name == "alpha":
        return metrics.get("alpha-ell", {}).get("value")
    if name == "compose":
        values = [error_over_k(r["eval"]) for r in _deepest(runs)]
        return sum(values) / len(values) if values and None not in values else None
    if name in ("loss", "lm-loss"):
        deepest = _deepest(runs)
        return sum(r["final_loss"] for r in deepest) / len(deepest) if deepest else None
    if name == "depth-to-solve":
        rows = metrics.get("depth-to-solve", {}).get("difficulties") or []
        if not rows:
            return None
        hardest = rows[-1]
        d = hardest["depth_to_solve"]
        return float(d if d is not None else 2 * hardest["max_depth_tried"])
    if name == "redundancy":
        effects = [v for r in _deepest(runs)
                   for v in (r["metrics"].get("skip-sensitivity") or {}).get("skip_effect") or []]
        return max(0.0, 1.0 - sum(effects) / len(effects)) if effects else None
    raise UsageError(f"unknown objective {name!r}")


def intermediate_value(name: str, runs: list[RunRecord], task) -> float | None:
    """The objective on the depths finished so far, for the pruner (not for depth-to-solve and redundancy)."""
    if name in ("loss", "lm-loss"):
        return objective_value(name, {"metrics": {}, "runs": [r.summary() for r in runs]})
    if name == "compose":
        return objective_value(name, {"metrics": {}, "runs": [r.summary() for r in runs]}, task.headline_metric())
    if name == "alpha" and len({r.depth for r in runs if r.ok}) >= 2:
        from archbench.evaluators.alpha_ell import AlphaEll

        return AlphaEll(n_boot=0).evaluate_sweep(runs, task).get("value")
    return None


STEPWISE = ("alpha", "loss", "lm-loss", "compose")  # objectives with a value along training (step pruners)


def stepwise_value(name: str, points: list[tuple[int, int, dict]], deepest: int, headline: str | None) -> float | None:
    """The objective at one training step from the held-out metrics ``(depth, seed, metrics)`` of the runs
    evaluated then; None until the depths it reads are there (the largest; for alpha two or more)."""
    if name == "alpha":  # α_ℓ's own fit, without a floor; None until two depths are there
        from archbench.evaluators.alpha_ell import fit_power_law

        try:
            return fit_power_law([d for d, _, _ in points], [float(m["loss"]) for _, _, m in points])["alpha"]
        except ValueError:
            return None
    if not any(depth == deepest for depth, _, _ in points):
        return None
    runs = [{"depth": depth, "status": "ok", "final_loss": float(m["loss"]), "eval": m, "metrics": {}}
            for depth, _, m in points]
    return objective_value(name, {"metrics": {}, "runs": runs}, headline)


def parse_objectives(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError("--objective: name at least one of " + ", ".join(OBJECTIVES))
    for n in names:
        if n not in OBJECTIVES:
            raise unknown("objective", n, OBJECTIVES)
    if len(set(names)) != len(names):
        raise UsageError(f"--objective {text!r}: an objective is named twice")
    return names
