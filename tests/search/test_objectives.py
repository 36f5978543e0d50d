"""Objectives: the values a trial is scored on, and the intermediate values the pruner sees."""

import pytest

from archbench.registry import TASKS
from archbench.search import intermediate_value, objective_value


def _run(depth, loss, later=None):
    metrics = {"skip-sensitivity": {"skip_effect": later}} if later is not None else {}
    return {"depth": depth, "effective_depth": depth, "seed": 0, "status": "ok", "final_loss": loss,
            "metrics": metrics}


def test_objective_values_on_known_results(make_run):
    runs = [_run(4, 0.4), _run(8, 0.2, [0.2, 0.6, 0.0]), _run(8, 0.3, [0.1, 0.1, 0.2])]
    result = {"runs": runs, "metrics": {"alpha-ell": {"value": 1.3},
                                        "depth-to-solve": {"difficulties": [
                                            {"depth_to_solve": 2, "max_depth_tried": 8},
                                            {"depth_to_solve": None, "max_depth_tried": 8}]}}}
    assert objective_value("alpha", result) == 1.3
    assert objective_value("loss", result) == pytest.approx(0.25)  # mean over seeds at the largest depth
    assert objective_value("depth-to-solve", result) == 16  # hardest unsolved: twice the largest depth
    assert objective_value("redundancy", result) == pytest.approx(1 - 1.2 / 6)
    # the pruner's intermediate alpha on two depths of an exact power law is its exponent
    task = TASKS.get("teacher-student").obj
    power = [make_run(d, 3.0 * d ** -1.7) for d in (2, 4)]
    assert intermediate_value("alpha", power[:1], task) is None
    assert intermediate_value("alpha", power, task) == pytest.approx(1.7, abs=1e-6)
    assert intermediate_value("loss", power, task) == pytest.approx(3.0 * 4 ** -1.7)
