"""The budget: the width that keeps a trial at the baseline's parameters or forward FLOPs."""

import pytest
import torch

from archbench.registry import TASKS
from archbench.search import fit_width, measure
from archbench.config import EvalSpec, resolve_config
from archbench.sweep import make_task


def _config(block, sets=None):
    return resolve_config(EvalSpec(block=block, task="teacher-student", preset="quick", sets=sets or {}))


@pytest.fixture(scope="module")
def baseline():
    """The residual block's quick config and the task it trains on."""
    ref = _config("residual")
    return ref, make_task(TASKS.get("teacher-student"), ref.task, torch.device("cpu"))


def test_params_budget_gives_the_largest_width_under_the_baseline(baseline):
    ref, task = baseline
    limit = measure("residual", ref, 16, task, 32, "params")
    # the baseline itself gets its own width back
    assert fit_width("residual", ref, 16, task, "params", limit, 256) == (32, limit)
    # a wider MLP must be narrower; one more step of width would exceed the budget
    wide = _config("residual", {"block": {"mlp_ratio": "8"}})
    width, used = fit_width("residual", wide, 16, task, "params", limit, 256)
    assert width < 32 and used <= limit
    assert measure("residual", wide, 16, task, width + 4, "params") > limit


def test_flops_budget_counts_every_application_of_a_shared_layer(baseline):
    ref, task = baseline
    looped = _config("looped")
    # a looped block has the parameters of one layer but the FLOPs of all its applications
    assert measure("looped", looped, 16, task, 32, "params") < measure("residual", ref, 16, task, 32, "params") / 4
    flops_ref = measure("residual", ref, 16, task, 32, "flops")
    assert 0.5 < measure("looped", looped, 16, task, 32, "flops") / flops_ref < 2
    width, used = fit_width("looped", looped, 16, task, "flops", flops_ref, 256)
    assert used <= flops_ref and width in (28, 32)
