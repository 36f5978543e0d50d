"""What archbench survives: the list a user can trust, each case tried as it happens.

A finished run is never lost and never trained twice; a rerun resumes; a file that cannot be used is
named in one warning, moved aside (never deleted), and only what it held is redone; bad input is one
line and a non-zero exit before anything trains, with nothing already written changed. Elsewhere:
kill -9 mid-sweep and mid-batch (test_cli_eval.py, test_batched.py), corrupt records
(test_records.py), diverging runs (test_cli_eval.py).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SMOKE = ["eval", "--preset", "smoke", "--depths", "1,2", "--set", "train.steps=40", "--evaluators", "alpha-ell"]


def _args(runs: Path, *extra) -> list:
    return [*SMOKE, *extra, "--runs-dir", runs, "--out", runs / "r.json"]


def _result(runs: Path) -> dict:
    return {(r["depth"], r["seed"]): r for r in json.loads((runs / "r.json").read_text())["runs"]}


def _one_line(r, code: int, *needles: str) -> None:
    lines = [line for line in r.stderr.strip().splitlines() if line.startswith("archbench: ")]
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr and len(lines) == 1 and r.stderr.count("\n") <= 3, r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# ----------------------------------------------------------------------------- bad values, before training

@pytest.mark.parametrize("setting, message", [
    ("train.lr=-1", "train.lr=-1 is out of range: expected > 0"),
    ("train.optimizer=adamm", "unknown value for train.optimizer 'adamm'; did you mean 'adam'"),
    ("train.log_every=0", "train.log_every=0 is out of range"),
    ("train.weight_decay=-1", "expected >= 0"),
    ("train.lr_depth_ref=-16", "train.lr_depth_ref=-16 is out of range"),
    ("train.steps=-5", "train.steps=-5 is out of range"),
    ("train.batch_size=0", "train.batch_size=0"),
    ("train.checkpoint_every=-1", "train.checkpoint_every=-1"),
    ("train.warmup_frac=2", "expected >= 0 and <= 1"),
    ("train.lr=1e-3,-1", "train.lr=-1"),  # every value of a sweep
    ("model.width=0", "model.width=0"),
    ("task.eval_batches=0", "task.eval_batches=0"),
    ("task.temperature=0", "task.temperature=0"),
    ("alpha-ell.n_boot=0", "alpha-ell.n_boot=0"),
])
def test_a_bad_value_is_one_line_and_exit_2_before_anything_trains(main, tmp_path, setting, message):
    r = main(*_args(tmp_path / "runs", "--set", setting))
    _one_line(r, 2, message)
    assert not (tmp_path / "runs").exists()


def test_values_a_block_or_task_cannot_take_are_refused_before_training(main, tmp_path):
    base = ["eval", "--block", "residual", "--task", "lm-char", "--preset", "smoke", "--depths", "1",
            "--runs-dir", tmp_path / "runs"]
    _one_line(main(*base, "--set", "block.heads=100"), 2, "block 'residual' could not be built", "heads")
    _one_line(main(*base, "--set", "task.seq_len=0"), 2, "task.seq_len=0 is out of range")
    _one_line(main(*base, "--set", "layer-similarity.max_tokens=-1", "--evaluators", "layer-similarity"), 2,
              "layer-similarity.max_tokens=-1")
    assert not list(tmp_path.glob("runs/records/*.json"))


# --------------------------------------------------------------------------------------- corrupt files

@pytest.mark.parametrize("engine", ["plain", "batched"])
def test_a_garbage_checkpoint_is_set_aside_and_its_run_starts_over(main, tmp_path, engine):
    clean = tmp_path / "clean"
    assert main(*_args(clean, "--engine", engine)).returncode == 0
    runs = tmp_path / "runs"
    (runs / "records").mkdir(parents=True)
    for key in (r["key"] for r in _result(clean).values()):
        (runs / "records" / f"{key}.ckpt.pt").write_bytes(b"not a checkpoint")
    r = main(*_args(runs, "--engine", engine))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count(".ckpt.pt is unusable") == 2 and "starts again from step 0" in r.stderr
    assert len(list((runs / "records" / "corrupt").iterdir())) == 2
    assert not list((runs / "records").glob("*.ckpt.pt"))
    for key, run in _result(runs).items():
        assert run["final_loss"] == _result(clean)[key]["final_loss"]


def test_garbage_weights_are_set_aside_and_the_record_kept(main, tmp_path):
    runs = tmp_path / "runs"
    assert main(*_args(runs)).returncode == 0
    for weights in (runs / "records").glob("*.pt"):
        weights.write_bytes(b"garbage")
    r = main(*_args(runs, "--evaluators", "alpha-ell,layer-similarity"))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("weights unreadable") == 2
    assert all(run["cached"] for run in _result(runs).values())


# ----------------------------------------------------------------------------- interrupted batches

@pytest.mark.parametrize("compile", ["off", "on"])
def test_a_batch_stopped_while_saving_resumes_the_rest_from_their_checkpoints(main, tmp_path, monkeypatch, compile):
    import archbench.batched
    import archbench.sweep

    args = ["--set", "train.steps=60", "--set", "train.checkpoint_every=20", "--depths", "1,2,3", "--compile", compile]
    assert main(*_args(tmp_path / "whole", *args)).returncode == 0

    saved, save = [], archbench.sweep.Sweep.save

    def save_one_then_die(self, *a, **k):  # a kill that lands after the batch's first record is written
        if saved:
            raise KeyboardInterrupt
        saved.append(save(self, *a, **k))
        return saved[-1]

    runs = tmp_path / "runs"
    with monkeypatch.context() as patch:
        patch.setattr(archbench.sweep.Sweep, "save", save_one_then_die)
        assert main(*_args(runs, *args)).returncode == 130
    assert len(list((runs / "records").glob("*.json"))) == 1
    assert len(list((runs / "records").glob("*.ckpt.pt"))) == 2  # the others' checkpoints, at step 40

    resumed_from, train = [], archbench.batched.train_batched

    def spy(jobs, *a, **k):
        resumed_from.extend(archbench.batched.checkpoint_step(j.resume) for j in jobs)
        return train(jobs, *a, **k)

    monkeypatch.setattr(archbench.batched, "train_batched", spy)
    assert main(*_args(runs, *args)).returncode == 0
    assert resumed_from == [40, 40]
    assert not list((runs / "records").glob("*.ckpt.pt")) and not list((runs / "records").glob("*.lock"))
    whole, resumed = _result(tmp_path / "whole"), _result(runs)
    for key in whole:
        assert resumed[key]["final_loss"] == pytest.approx(whole[key]["final_loss"], rel=1e-5 if compile == "off" else 1e-4)


# ---------------------------------------------------------------------------------- concurrent commands

def test_three_concurrent_evals_train_each_run_once(cli, tmp_path):
    runs = tmp_path / "runs"  # the batched engine locks the runs of its batch; the others wait, then read them
    args = ["eval", "--preset", "smoke", "--depths", "1,2,3", "--set", "train.steps=300",
            "--evaluators", "alpha-ell", "--runs-dir", str(runs)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "archbench", *args, "--out", str(tmp_path / f"r{i}.json")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(3)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in outs]
    trained = sum(err.count(": loss ") for _, err in outs)  # a run trained here prints its loss; a cached one does not
    assert trained == 3, [err for _, err in outs]
    results = [json.loads((tmp_path / f"r{i}.json").read_text()) for i in range(3)]
    assert len({json.dumps([r["final_loss"] for r in res["runs"]]) for res in results}) == 1
    assert not list((runs / "records").glob("*.lock")) and not list((runs / "records").glob(".*.tmp"))


def test_a_lock_left_by_a_killed_run_is_taken_over(main, tmp_path):
    from archbench.records import RunStore

    runs = tmp_path / "runs"
    assert main(*_args(tmp_path / "clean")).returncode == 0
    (runs / "records").mkdir(parents=True)
    for key in (r["key"] for r in _result(tmp_path / "clean").values()):
        (runs / "records" / f"{key}.lock").write_text("pid 999999 on a machine long gone\n")  # nobody holds it
    assert main(*_args(runs)).returncode == 0
    assert not list((runs / "records").glob("*.lock"))
    with RunStore(runs).claim("somekey") as held:
        assert held
        with RunStore(runs).claim("somekey", wait=False) as again:  # a second holder is refused, not blocked
            assert not again


# ----------------------------------------------------------------------------------- disks that refuse

def _small_filesystem(path: Path, size: str):
    """A tmpfs of ``size`` at ``path`` where this process may mount one (root, outside most containers)."""
    path.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_full_disk_is_one_line_naming_the_file_and_the_free_space(main, tmp_path, monkeypatch):
    runs = tmp_path / "small"
    mounted = _small_filesystem(runs, "16k")
    try:
        if not mounted:  # the same failure as a full disk gives: torch.save raises RuntimeError, not OSError
            real_save = torch.save

            def full(obj, f, *a, **k):
                if hasattr(f, "write"):
                    f.write(b"partial")
                    raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")
                return real_save(obj, f, *a, **k)

            monkeypatch.setattr(torch, "save", full)
        r = main(*_args(runs))
        _one_line(r, 1, "cannot write", ".pt", "MB free there")
        assert not list(runs.glob("records/*.json")) and not list(runs.glob("records/.*.tmp"))
    finally:
        if mounted:
            subprocess.run(["umount", str(runs)], check=False)


def test_a_runs_directory_that_cannot_be_written_is_refused_before_training(main, tmp_path):
    (tmp_path / "a-file").write_text("")
    r = main(*_args(tmp_path / "a-file" / "runs"))
    _one_line(r, 1, "cannot write", "a-file")
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        _one_line(main(*_args(ro)), 1, "cannot write", "Permission denied")


def test_a_bad_out_path_is_refused_before_training(main, tmp_path):
    (tmp_path / "folder").mkdir()
    r = main(*SMOKE, "--runs-dir", tmp_path / "runs", "--out", tmp_path / "folder")
    _one_line(r, 2, "is a folder")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("background", [False, True])  # True: started as `nohup … &` does, SIGINT ignored
def test_search_workers_stop_when_their_parent_is_killed(cli, tmp_path, background):
    import signal
    import time

    args = ["search", "--task", "teacher-student", "--objective", "alpha,loss", "--preset", "smoke", "--depths", "2,4",
            "--set", "train.steps=3000", "--trials", "4", "--workers", "2", "--study", "orphans", "--runs-dir", str(tmp_path / "runs")]
    parent = subprocess.Popen([sys.executable, "-m", "archbench", *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if background else None)
    logs = tmp_path / "runs" / "studies" / "orphans"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(logs.glob("worker-*.log"))) < 2:
        time.sleep(0.2)
    workers = _children(parent.pid)
    assert len(workers) >= 2, "the workers started"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 60
    while time.time() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.5)
    assert not any(_alive(pid) for pid in workers)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has finished
    except FileNotFoundError:
        return False


# ------------------------------------------------------------------------------------- what is read back

@pytest.mark.parametrize("field, change, why", [
    ("task_cfg", lambda d: d["spec"].update(task_cfg=[1, 2]), "spec's 'task_cfg' has the wrong type"),
    ("block_cfg", lambda d: d["spec"].update(block_cfg="x"), "spec's 'block_cfg' has the wrong type"),
    ("train", lambda d: d["spec"].update(train="x"), "spec's 'train' has the wrong type"),
    ("depth", lambda d: d["spec"].update(depth="x"), "spec's 'depth' has the wrong type"),
    ("env.device", lambda d: d["env"].update(device=3), "'env.device' has the wrong type"),
    ("eval.loss", lambda d: d["eval"].update(loss="x"), "'eval.loss' has the wrong type"),
    ("eval list", lambda d: d["eval"].update(accuracy_by_position=[1.0, "x"]),
     "'eval.accuracy_by_position' has the wrong type"),
    ("metrics", lambda d: d.update(metrics={"alpha-ell": 3}), "'metrics.alpha-ell' has the wrong type"),
    ("history", lambda d: d.update(history=[["a"]]), "'history' is not a list of [step, loss]"),
])
def test_record_like_foreign_files_are_named_and_skipped(field, change, why):
    from archbench.records import BadRecord, RunRecord, digest

    good = {"key": "", "spec": {"numerics": 1, "block": "b", "block_version": 1, "block_cfg": {}, "task": "t",
                                "task_version": 1, "task_cfg": {}, "model": {}, "train": {}, "depth": 2, "seed": 0},
            "depth": 2, "effective_depth": 2, "seed": 0, "status": "ok", "final_loss": 0.5, "params": 10,
            "eval": {"loss": 0.5, "accuracy_by_position": [1.0, 0.25]}, "metrics": {}, "solved": None, "failure": None, "steps_done": 5,
            "history": [[5, 0.6]], "wall_s": 1.0, "source": {"archbench": "0.1.0"}, "env": {"device": "cpu"},
            "engine": {"name": "plain"}, "finished": "2026-12-01", "record_version": 2}
    good["key"] = digest(good["spec"])
    RunRecord.from_json(good)
    change(good)
    good["key"] = digest(good["spec"])
    with pytest.raises(BadRecord, match=why.replace("[", r"\[").replace("]", r"\]")):
        RunRecord.from_json(good)


def test_the_leaderboard_skips_a_foreign_record_and_builds_from_the_rest(main, tmp_path):
    from archbench.records import digest

    runs = tmp_path / "runs"
    assert main(*_args(runs)).returncode == 0
    record = next((runs / "records").glob("*.json"))
    data = json.loads(record.read_text())
    data["spec"]["task_cfg"], data["spec"]["seed"] = [1, 2], 7
    data["key"] = digest(data["spec"])
    (runs / "records" / f"{data['key']}.json").write_text(json.dumps(data))
    r = main("leaderboard", "--runs-dir", runs, "--out", tmp_path / "lb")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert data["key"] in r.stderr and "'task_cfg' has the wrong type" in r.stderr
    (table,) = (tmp_path / "lb").glob("*.json")
    assert sum(len(row["records"]) for row in json.loads(table.read_text())["rows"]) == 2


def test_a_leaderboard_of_a_study_never_creates_a_database(main, tmp_path):
    runs = tmp_path / "runs"
    assert main(*_args(runs)).returncode == 0
    r = main("leaderboard", "--runs-dir", runs, "--study", "nope", "--out", tmp_path / "lb")
    _one_line(r, 2, "no studies database at")
    assert not (runs / "studies.db").exists()


def test_a_collapsed_model_fails_its_run_instead_of_feeding_alpha(main, tmp_path):
    runs = tmp_path / "runs"
    r = main(*_args(runs, "--set", "train.lr=1e6"))
    assert r.returncode == 0 and "2 run(s) failed" in r.stderr  # a failed run is a result, the sweep goes on
    result = json.loads((runs / "r.json").read_text())
    assert all(run["status"] == "failed" and run["failure"].startswith("collapsed: its output no longer depends")
               for run in result["runs"]), result["runs"]
    assert result["alpha_ell"]["value"] is None


def test_temporary_files_of_killed_writers_are_cleaned_up_and_live_ones_kept(main, tmp_path):
    import socket

    runs = tmp_path / "runs"
    (runs / "records").mkdir(parents=True)
    host = socket.gethostname().replace(".", "_")
    dead = runs / "records" / f".abc.json.{host}-999999.x1y2.tmp"
    live = runs / "records" / f".abc.json.{host}-{os.getpid()}.x1y2.tmp"
    for f in (dead, live):
        f.write_text("half a record")
    assert main(*_args(runs)).returncode == 0
    assert not dead.exists() and live.exists()


def test_a_typo_in_list_gets_close_names(main):
    r = main("list", "blocks", "-v", "residul")
    assert r.returncode == 1 and "did you mean 'residual'" in r.stderr
