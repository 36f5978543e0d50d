"""A trial: failures (a block that raises, a diverging run) are recorded as data; a single-objective
trial reports an intermediate value per finished depth."""

import json

import pytest

FRAGILE = '''
import torch
import archbench

@archbench.register_block("fragile")
class Fragile(torch.nn.Module):
    """A block that raises on its first forward."""
    def __init__(self, dim, layer_idx, depth, *, scale: float = 1.0):
        super().__init__()
        self.lin = torch.nn.Linear(dim, dim)
    def forward(self, h):
        raise RuntimeError("fragile block refuses to run")
'''


def test_failures_are_data(main, tmp_path, tiny, load_study):
    plugin = tmp_path / "fragile.py"
    plugin.write_text(FRAGILE)
    space = tmp_path / "space.toml"
    space.write_text('blocks = ["fragile", "residual-mlp"]\n')
    runs = tmp_path / "runs"
    # the fragile block is the baseline, so trial 0 draws it whatever the sampler does
    r = main("search", *tiny, "--plugins", plugin, "--space", space, "--baseline", "fragile", "--trials", "4",
            "--study", "f", "--runs-dir", runs, "--seed", "3")
    assert r.returncode == 0, r.stderr
    trials = load_study(f"sqlite:///{runs.resolve() / 'studies.db'}", "f").get_trials()
    assert len(trials) == 4
    for t in trials:
        if t.params["block"] == "fragile":
            assert t.state.name == "FAIL" and "fragile block refuses to run" in t.user_attrs["failure"]
        else:
            assert t.state.name == "COMPLETE"
    assert trials[0].params["block"] == "fragile" and trials[0].user_attrs["baseline"]
    assert "fragile block refuses to run" in r.stderr  # the trial's line says why
    # divergence is a failure with its reason too
    r = main("search", *tiny, "--set", "train.optimizer=sgd", "--set", "train.lr=1e8", "--baseline", "residual-mlp",
            "--trials", "1", "--study", "d", "--space", space, "--plugins", plugin, "--runs-dir", runs)
    assert r.returncode == 0, r.stderr
    (t,) = load_study(f"sqlite:///{runs.resolve() / 'studies.db'}", "d").get_trials()
    assert t.state.name == "FAIL" and "loss became" in t.user_attrs["failure"]


def test_single_objective_reports_intermediate_values(main, tmp_path, tiny, load_study):
    runs = tmp_path / "runs"
    r = main("search", *tiny, "--depths", "2,3,4", "--objective", "loss", "--trials", "1", "--runs-dir", runs)
    assert r.returncode == 0, r.stderr
    assert "best trials" in r.stdout
    for t in load_study(f"sqlite:///{runs.resolve() / 'studies.db'}", "teacher-student-loss-smoke").get_trials():
        if t.state.name == "COMPLETE":
            # one report per finished depth; the last is the objective itself
            assert sorted(t.intermediate_values) == [1, 2, 3]
            assert t.intermediate_values[3] == pytest.approx(t.values[0])
    # so its depths trained one after another (the pruner may stop a trial between them)
    records = [json.loads(p.read_text()) for p in (runs / "records").glob("*.json")]
    assert records and {r["engine"]["name"] for r in records} == {"plain"}
