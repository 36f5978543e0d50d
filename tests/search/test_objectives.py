"""Objectives: the values a trial is scored on, and the intermediate values the pruner sees."""

import json
from pathlib import Path

import pytest

from archbench.registry import TASKS
from archbench.search import intermediate_value, objective_value
from archbench.search.objectives import stepwise_value


def _run(depth, loss, later=None, error=None):
    metrics = {"skip-sensitivity": {"skip_effect": later}} if later is not None else {}
    return {"depth": depth, "effective_depth": depth, "seed": 0, "status": "ok", "final_loss": loss,
            "metrics": metrics, "eval": {"loss": loss, "error_k0": 0.0, "error_k4": error / 2, "error_k8": error}}


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
    # error averaged over k >= 1 (k = 0 copies), largest depth, mean over seeds: (0.05 + 0.1) / 2, (0.1 + 0.2) / 2
    assert objective_value("compose", result, "error_k8") == pytest.approx((0.075 + 0.15) / 2)
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
    assert t.values == pytest.approx([sum(run["eval"]["error_k1"] + run["eval"]["error_k2"] for run in hop) / 2 / len(hop),
                                      sum(run["final_loss"] for run in lm) / len(lm)])
    # each sweep at the baseline's own budget on its task
    assert t.user_attrs["budget"]["used"] == t.user_attrs["budget"]["limit"]
    assert t.user_attrs["budget:lm-char"]["used"] == t.user_attrs["budget:lm-char"]["limit"]
    assert "--task hop-induction" in r.stdout and "&& archbench eval --block residual --task lm-char" in r.stdout


def test_stepwise_values_for_the_step_pruners():
    points = [(d, seed, {"loss": 3.0 * d ** -1.5 * (1 + 0.1 * seed), "error_k8": 0.1 * seed}) for d in (2, 4, 8)
              for seed in (0, 1)]
    assert stepwise_value("alpha", points, 8, None) == pytest.approx(1.5)
    assert stepwise_value("alpha", points[:2], 8, None) is None  # one depth: no slope yet
    assert stepwise_value("loss", points, 8, None) == pytest.approx(3.0 * 8 ** -1.5 * 1.05)
    assert stepwise_value("compose", points, 8, "error_k8") == pytest.approx(0.05)
    assert stepwise_value("loss", points[:4], 8, None) is None  # the largest depth is not among them


def test_step_pruners_report_held_out_values_at_training_steps(main, tmp_path, tiny, load_study):
    runs = tmp_path / "runs"
    r = main("search", *tiny, "--objective", "loss", "--pruner", "sha", "--trials", "3", "--runs-dir", runs)
    assert r.returncode == 0, r.stderr
    trials = load_study(f"sqlite:///{runs.resolve() / 'studies.db'}", "teacher-student-loss-smoke").get_trials()
    reported = [t for t in trials if t.intermediate_values]
    assert reported and all(set(t.intermediate_values) <= {3, 6, 9, 12, 15, 18, 21, 24, 27} for t in reported)
    for t in trials:  # a finished trial's last report is the held-out loss of its deepest runs at step 27
        if t.state.name == "COMPLETE" and t.intermediate_values:
            assert max(t.intermediate_values) == 27 and t.user_attrs["eval"]["sets"]["train"]["eval_every"] == "3"
    for args, needle in ((["--objective", "alpha,loss"], "single-objective"),
                         (["--objective", "depth-to-solve"], "no value during training")):
        r = main("search", *tiny, *args, "--pruner", "hyperband", "--runs-dir", runs)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
