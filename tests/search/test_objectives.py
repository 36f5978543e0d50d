"""Objectives: the values a trial is scored on, and the intermediate values the pruner sees."""

import json
from pathlib import Path

import pytest

from archbench.registry import TASKS
from archbench.search import intermediate_value, objective_value


def _run(depth, loss, later=None, error=None):
    metrics = {"skip-sensitivity": {"skip_effect": later}} if later is not None else {}
    return {"depth": depth, "effective_depth": depth, "seed": 0, "status": "ok", "final_loss": loss,
            "metrics": metrics, "eval": {"loss": loss, "error_k8": error}}


def test_objective_values_on_known_results(make_run):
    runs = [_run(4, 0.4, error=0.5), _run(8, 0.2, [0.2, 0.6, 0.0], 0.1), _run(8, 0.3, [0.1, 0.1, 0.2], 0.2)]
    result = {"runs": runs, "metrics": {"alpha-ell": {"value": 1.3},
                                        "depth-to-solve": {"difficulties": [
                                            {"depth_to_solve": 2, "max_depth_tried": 8},
                                            {"depth_to_solve": None, "max_depth_tried": 8}]}}}
    assert objective_value("alpha", result) == 1.3
    assert objective_value("loss", result) == pytest.approx(0.25)  # mean over seeds at the largest depth
    assert objective_value("depth-to-solve", result) == 16  # hardest unsolved: twice the largest depth
    assert objective_value("redundancy", result) == pytest.approx(1 - 1.2 / 6)
    assert objective_value("compose", result, "error_k8") == pytest.approx(0.15)  # the headline, largest depth
    assert objective_value("lm-loss", result) == pytest.approx(0.25)
    # the pruner's intermediate alpha on two depths of an exact power law is its exponent
    task = TASKS.get("teacher-student").obj
    power = [make_run(d, 3.0 * d ** -1.7) for d in (2, 4)]
    assert intermediate_value("alpha", power[:1], task) is None
    assert intermediate_value("alpha", power, task) == pytest.approx(1.7, abs=1e-6)
    assert intermediate_value("loss", power, task) == pytest.approx(3.0 * 4 ** -1.7)


def test_objectives_on_other_tasks_run_their_own_sweep_at_the_same_budget(main, tmp_path, load_study):
    # the project's question: composition (hop-induction) and language-model loss (lm-char), one trial each
    runs = tmp_path / "runs"
    r = main("search", "--task", "hop-induction", "--objective", "compose,lm-loss", "--preset", "smoke",
             "--set", "train.steps=10", "--trials", "1", "--runs-dir", runs)
    assert r.returncode == 0, r.stderr
    (t,) = load_study(f"sqlite:///{runs.resolve() / 'studies.db'}", "hop-induction-compose+lm-loss-smoke").get_trials()
    assert t.state.name == "COMPLETE" and [e["task"] for e in t.user_attrs["evals"]] == ["hop-induction", "lm-char"]
    results = [json.loads(Path(p).read_text()) for p in t.user_attrs["results"]]
    hop = [run for run in results[0]["runs"] if run["depth"] == 2]  # hop-induction smoke: depths 1, 2; k <= 2
    lm = [run for run in results[1]["runs"] if run["depth"] == 12]  # lm-char smoke: depths 3, 6, 12
    assert t.values == pytest.approx([sum(run["eval"]["error_k2"] for run in hop) / len(hop),
                                      sum(run["final_loss"] for run in lm) / len(lm)])
    # each sweep at the baseline's own budget on its task
    assert t.user_attrs["budget"]["used"] == t.user_attrs["budget"]["limit"]
    assert t.user_attrs["budget:lm-char"]["used"] == t.user_attrs["budget:lm-char"]["limit"]
    assert "--task hop-induction" in r.stdout and "&& archbench eval --block residual --task lm-char" in r.stdout
