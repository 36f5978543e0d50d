"""End-to-end: `archbench eval` as a user runs it."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_smoke_preset_end_to_end_then_cached(main, tmp_path):
    out = tmp_path / "result.json"
    r = main("eval", "--preset", "smoke", "--runs-dir", tmp_path / "runs", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "alpha_ell =" in r.stdout
    res = json.loads(out.read_text())
    assert res["block"] == "residual-mlp" and res["task"] == "teacher-student"
    assert [run["depth"] for run in res["runs"]] == [3, 6, 12]
    for run in res["runs"]:
        assert run["status"] == "ok" and run["final_loss"] > 0 and run["params"] > 0 and not run["cached"]
    assert res["runs"][0]["params"] < res["runs"][2]["params"]
    a = res["alpha_ell"]
    # one run per depth: no interval, and the line says why
    assert a["value"] > 0 and a["ci95"] is None and "one replicate" in r.stdout
    assert res["metrics"]["alpha-ell"]["n_runs"] == 3 and res["metrics"]["alpha-ell"]["n_replicates"] == 1
    assert res["config"]["train"]["steps"] == 150 and res["config"]["task"]["teacher"] == "independent"
    expected = "cuda" if torch.cuda.is_available() else "cpu"  # --device auto
    assert res["env"]["torch"] and res["env"]["device"].startswith(expected) and "archbench" in res["env"]
    assert res["files"]["plots"] == [str(out.with_suffix(".alpha-ell.png"))]
    assert out.with_suffix(".alpha-ell.png").stat().st_size > 1000
    records = sorted((tmp_path / "runs" / "records").glob("*.json"))
    assert len(records) == 3 and not list((tmp_path / "runs" / "records").glob("*.ckpt.pt"))

    # The same command again trains nothing and gives the same numbers.
    r2 = main("eval", "--preset", "smoke", "--runs-dir", tmp_path / "runs", "--out", out)
    assert r2.returncode == 0, r2.stderr
    res2 = json.loads(out.read_text())
    assert all(run["cached"] for run in res2["runs"])
    assert res2["alpha_ell"] == a
    assert "depth   2 seed 0: loss" not in r2.stderr  # no run lines: nothing trained

    # A changed knob is a different run.
    r3 = main("eval", "--preset", "smoke", "--depths", "2", "--set", "task.temperature=0.5",
             "--runs-dir", tmp_path / "runs", "--out", tmp_path / "t.json")
    assert r3.returncode == 0, r3.stderr
    assert not json.loads((tmp_path / "t.json").read_text())["runs"][0]["cached"]


def test_interrupted_sweep_resumes(main, tmp_path):
    runs = tmp_path / "runs"
    args = ["eval", "--preset", "smoke", "--depths", "1,2,3", "--engine", "plain", "--set", "train.steps=200",
            "--set", "train.checkpoint_every=50", "--set", "train.batch_size=64", "--runs-dir", str(runs),
            "--out", str(tmp_path / "r.json")]
    proc = subprocess.Popen([sys.executable, "-m", "archbench", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    records = runs / "records"
    while time.time() < deadline and len(list(records.glob("*.json"))) < 1:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # as hard as a crash or a lost machine
    proc.wait()
    first = sorted(records.glob("*.json"))
    assert len(first) == 1, "the first run should have finished before the kill"
    mtime = first[0].stat().st_mtime_ns
    # The kill may land mid-write (the next run's checkpoint): that leaves a temporary file, never a record.
    json.loads(first[0].read_text())

    done = main(*args)
    assert done.returncode == 0, done.stderr
    res = json.loads((tmp_path / "r.json").read_text())
    assert [r["cached"] for r in res["runs"]] == [True, False, False]
    assert first[0].stat().st_mtime_ns == mtime
    assert len(list(records.glob("*.json"))) == 3
    assert not list(records.glob(".*.tmp")), "the killed writer's temporary files are cleared on resume"


def readme_example() -> str:
    text = README.read_text()
    block = re.search(r"<!-- example-block -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README lost its example block"
    return block.group(1)


def test_readme_block_example_runs(main, tmp_path):
    code = readme_example()
    assert len(code.strip().splitlines()) < 20 + 2  # under 20 lines, not counting the filename comment
    (tmp_path / "my_block.py").write_text(code)
    cmd = re.search(r"archbench eval --plugins my_block.py[^\n]*", README.read_text()).group(0).split()[1:]
    r = main(*cmd, "--depths", "1,2", "--set", "train.steps=30", "--runs-dir", tmp_path / "runs",
            "--out", tmp_path / "r.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["block"] == "gated-mlp" and res["config"]["block"] == {"hidden": 128}
    assert all(run["status"] == "ok" for run in res["runs"])
    listed = main("list", "blocks", "--plugins", tmp_path / "my_block.py")
    assert "gated-mlp" in listed.stdout and "learned per-channel gate" in listed.stdout


@pytest.mark.parametrize("source, message", [
    ("import torch\nraise RuntimeError('boom')\n", "failed to import: RuntimeError: boom (line 2)"),
    ("def broken(:\n", "failed to import: SyntaxError"),
])
def test_broken_plugin_file_gets_one_line(main, tmp_path, source, message):
    f = tmp_path / "bad_plugin.py"
    f.write_text(source)
    r = main("list", "blocks", "--plugins", f)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "bad_plugin.py" in r.stderr and message in r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("line ") == 1


def test_wrong_shape_block_and_missing_plugin_get_one_line(main, tmp_path):
    f = tmp_path / "shape.py"
    f.write_text(
        "import torch, archbench\n"
        "@archbench.register_block('widen')\n"
        "class Widen(torch.nn.Module):\n"
        "    def __init__(self, dim, layer_idx, depth, **kw):\n"
        "        super().__init__(); self.lin = torch.nn.Linear(dim, dim + 1)\n"
        "    def forward(self, x):\n"
        "        return self.lin(x)\n")
    r = main("eval", "--plugins", f, "--block", "widen", "--preset", "smoke", "--runs-dir", tmp_path / "runs")
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "block 'widen' (layer 0) returned shape (2, 1, 33), expected (2, 1, 32)" in r.stderr
    r = main("eval", "--plugins", tmp_path / "nope.py", "--preset", "smoke")
    assert r.returncode == 2 and "nope.py': no such file" in r.stderr
    r = main("eval", "--plugins", tmp_path, "--preset", "smoke")
    assert r.returncode == 2 and "is a folder; give the plugin's .py file" in r.stderr


def test_lm_char_smoke(main, tmp_path):
    r = main("eval", "--task", "lm-char", "--block", "residual", "--preset", "smoke", "--depths", "1,2",
            "--runs-dir", tmp_path / "runs", "--out", tmp_path / "lm.json")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "lm.json").read_text())
    assert all(run["status"] == "ok" for run in res["runs"])
    assert res["runs"][0]["final_loss"] < 4.7  # below the uniform loss over ~100 characters


def test_model_evaluator_plugin_runs_on_fresh_and_cached_runs(main, tmp_path):
    """A per-model evaluator sees the trained model through the protocol; on cached runs the saved
    weights are reloaded (weights_only) so a new evaluator needs no retraining."""
    f = tmp_path / "final_norm.py"
    f.write_text(
        "import torch, archbench\n"
        "from archbench.evaluator import Evaluator\n"
        "@archbench.register_evaluator('stream-growth')\n"
        "class StreamGrowth(Evaluator):\n"
        "    '''||h_L|| / ||h_0|| on the first held-out batch.'''\n"
        "    def evaluate_model(self, model, task):\n"
        "        x, _ = task.eval_batches(64)[0]\n"
        "        t = archbench.trace(model, x)\n"
        "        return {'growth': (t.states[-1].norm() / t.states[0].norm()).item(), 'depth': len(t.states) - 1}\n")
    base = ["eval", "--preset", "smoke", "--depths", "1,3", "--set", "train.steps=20", "--runs-dir", tmp_path / "runs"]
    r = main(*base, "--out", tmp_path / "a.json")
    assert r.returncode == 0, r.stderr
    r = main(*base, "--plugins", f, "--evaluators", "alpha-ell,stream-growth", "--out", tmp_path / "b.json")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "b.json").read_text())
    assert all(run["cached"] for run in res["runs"])
    per_run = res["metrics"]["stream-growth"]["per_run"]
    assert [per_run[run["key"]]["depth"] for run in res["runs"]] == [1, 3]
    assert all(v["growth"] > 0 for v in per_run.values())


def test_diverging_runs_are_recorded_as_failed_and_the_sweep_goes_on(main, tmp_path):
    f = tmp_path / "unnormed.py"
    f.write_text(
        "import torch, archbench\n"
        "@archbench.register_block('unnormed')\n"
        "class Unnormed(torch.nn.Module):\n"
        "    '''x + W x without a norm: overflows under a huge learning rate.'''\n"
        "    def __init__(self, dim, layer_idx, depth, **kw):\n"
        "        super().__init__(); self.lin = torch.nn.Linear(dim, dim)\n"
        "    def forward(self, x):\n"
        "        return x + self.lin(x)\n")
    r = main("eval", "--plugins", f, "--block", "unnormed", "--preset", "smoke", "--depths", "4,8",
            "--set", "train.lr=1e8", "--set", "train.optimizer=sgd", "--set", "train.log_every=5",
            "--set", "model.zero_head=false", "--runs-dir", tmp_path / "runs", "--out", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "r.json").read_text())
    failed = [run for run in res["runs"] if run["status"] == "failed"]
    assert len(res["runs"]) == 2 and failed, "the unnormalised block should overflow at lr=1e8"
    assert all(re.search(r"loss became (nan|inf) at step \d+|^collapsed: ", run["failure"]) for run in failed)
    assert "run(s) failed" in r.stderr
    if len(failed) == 2:
        assert res["alpha_ell"]["value"] is None


def test_recurrence_sweeps_iterations_at_fixed_parameters(main, tmp_path):
    out = tmp_path / "r.json"
    r = main("eval", "--block", "recurrent-depth", "--recurrence", "1,3", "--preset", "smoke", "--set",
            "train.steps=20", "--runs-dir", tmp_path / "runs", "--out", out)
    assert r.returncode == 0, r.stderr
    runs = json.loads(out.read_text())["runs"]
    assert [(run["depth"], run["effective_depth"]) for run in runs] == [(3, 3), (5, 5)]  # 1 + r + 1
    assert runs[0]["params"] == runs[1]["params"]
    bad = main("eval", "--block", "residual", "--recurrence", "2", "--runs-dir", tmp_path / "runs")
    assert bad.returncode == 2 and "block 'residual' has no recurrence" in bad.stderr
    assert "Traceback" not in bad.stderr and "recurrent-depth" in bad.stderr


def test_a_depth_the_block_cannot_have_is_refused_before_training(main, tmp_path):
    r = main("eval", "--block", "recurrent-depth", "--depths", "3,4,6", "--set", "block.core=2",
            "--runs-dir", tmp_path / "runs")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "recurrent-depth cannot have effective depth 3" in r.stderr and "4, 6, 8" in r.stderr
    assert not (tmp_path / "runs" / "records").exists() or not list((tmp_path / "runs" / "records").iterdir())


STACK_PLUGIN = '''
import torch
from torch import nn
import archbench


@archbench.register_block("pairs")
class Pairs(archbench.Stack):
    """Each module applied twice in a row, with a learned mix of the stream and the embedding."""

    def __init__(self, dim, depth, mix: float = 0.1):
        super().__init__([nn.Linear(dim, dim) for _ in range((depth + 1) // 2)], [l // 2 for l in range(depth)])
        self.mix = nn.Parameter(torch.tensor(mix))

    def forward(self, h, intervene=None):
        e = h
        for l, layer in enumerate(self.effective_layers()):
            h = archbench.step(intervene, l, h, h + torch.tanh(layer(h)) + self.mix * e)
        return h
'''


def test_a_users_stack_block_runs_from_a_plugin_file(main, tmp_path):
    f = tmp_path / "pairs.py"
    f.write_text(STACK_PLUGIN)
    out = tmp_path / "r.json"
    r = main("eval", "--plugins", f, "--block", "pairs", "--preset", "smoke", "--depths", "3,4",
            "--set", "train.steps=10", "--set", "block.mix=0.2", "--runs-dir", tmp_path / "runs", "--out", out)
    assert r.returncode == 0, r.stderr
    runs = json.loads(out.read_text())["runs"]
    assert [(run["depth"], run["effective_depth"], run["status"]) for run in runs] == [(3, 3, "ok"), (4, 4, "ok")]
    assert runs[0]["params"] == runs[1]["params"]  # two modules either way


def test_test_time_depth_evaluates_trained_weights_at_other_recurrences(main, tmp_path):
    out = tmp_path / "r.json"
    r = main("eval", "--block", "recurrent-depth", "--recurrence", "2", "--preset", "smoke",
            "--evaluators", "alpha-ell,test-time-depth", "--set", "train.steps=30",
            "--set", "test-time-depth.recurrence=1,2,6", "--set", "test-time-depth.batch_size=256",
            "--runs-dir", tmp_path / "runs", "--out", out)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    run = res["runs"][0]
    got = res["metrics"]["test-time-depth"]["per_run"][run["key"]]
    assert got["trained_recurrence"] == 2
    assert [v["effective_depth"] for v in got["by_recurrence"].values()] == [3, 4, 8]
    # at the trained r it is the run's own held-out loss (same fixed batches), elsewhere it differs
    # bit-for-bit on CPU; on CUDA training measured its loss under bf16 autocast, the evaluator in float32
    rel = 1e-3 if torch.cuda.is_available() else 1e-6
    assert got["by_recurrence"]["2"]["loss"] == pytest.approx(run["final_loss"], rel=rel)
    assert got["by_recurrence"]["6"]["loss"] != pytest.approx(run["final_loss"], rel=1e-3)
    assert out.with_suffix(".test-time-depth.png").exists()


def test_teachers_are_replicates_whose_runs_are_the_teacher_seed_runs(main, tmp_path):
    base = ["eval", "--preset", "smoke", "--depths", "2,4", "--set", "train.steps=20", "--runs-dir", tmp_path / "runs"]
    assert main(*base, "--set", "task.teacher_seed=1", "--out", tmp_path / "one.json").returncode == 0
    r = main(*base, "--teachers", "2", "--out", tmp_path / "two.json")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "two.json").read_text())
    assert [(run["teacher"], run["depth"], run["cached"]) for run in res["runs"]] == [
        (0, 2, False), (0, 4, False), (1, 2, True), (1, 4, True)]  # teacher 1's runs were the first command's
    alpha = res["metrics"]["alpha-ell"]
    assert "points" not in alpha and alpha["n_replicates"] == 2 and alpha["n_runs"] == 4
    assert alpha["ci95"] is not None and res["config"]["teachers"] == 2
    for args, says in ((["--task", "lm-char", "--teachers", "2"], "task 'lm-char' has no teachers"),
                       (["--teachers", "2", "--set", "task.teacher_seed=3"], "both choose the teachers"),
                       (["--teachers", "0"], "at least one teacher")):
        bad = main("eval", *args, "--runs-dir", tmp_path / "runs")
        assert bad.returncode == 2 and says in bad.stderr and bad.stderr.count("\n") == 1, bad.stderr
