"""Shared by the search tests: the arguments of a tiny search, and its study read back."""

import optuna
import pytest

from archbench.search import open_storage


@pytest.fixture
def tiny():
    """``archbench search`` arguments for the smoke teacher, two depths, 30 steps: about a second a trial."""
    return ["--task", "teacher-student", "--objective", "alpha,loss", "--preset", "smoke", "--depths", "2,4",
            "--set", "train.steps=30"]


@pytest.fixture
def load_study():
    """``load_study(storage_url, name)``: the study as the search left it."""
    return lambda url, name: optuna.load_study(study_name=name, storage=open_storage(url, heartbeat=False))
