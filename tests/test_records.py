"""Run records: typed, validated, keyed on declared versions (not source), migrated, never fatal when bad."""

import json

import pytest

from archbench.records import (RECORD_VERSION, BadRecord, RunRecord, RunStore, atomic_write, atomic_write_text,
                               WriteError, digest, migrate_record)

TINY = ["--preset", "smoke", "--depths", "1,2", "--set", "train.steps=20", "--evaluators", "alpha-ell"]


def _record(**changes) -> RunRecord:
    spec = {"numerics": 1, "block": "b", "block_version": 1, "block_cfg": {"k": (1, 2)}, "task": "t",
            "task_version": 1, "task_cfg": {}, "model": {"width": 8}, "train": {"lr": 1e-3}, "depth": 2, "seed": 0}
    fields = dict(key=digest(spec), spec=spec, depth=2, effective_depth=2, seed=0, status="ok", final_loss=0.5,
                  params=10, eval={"loss": 0.5}, metrics={}, solved=None, failure=None, steps_done=5,
                  history=[[5, 0.6]], wall_s=1.0, source={"block": "abc"}, env={}, engine={"name": "plain"},
                  finished="2026-11-30T00:00:00+00:00")
    return RunRecord(**{**fields, **changes})


def test_a_record_reads_back_as_written_and_bad_ones_say_why(tmp_path):
    store = RunStore(tmp_path)
    rec = _record()
    store.save(rec)
    back = store.load(rec.key)
    assert back.to_json() == json.loads(json.dumps(rec.to_json()))  # tuples come back as lists, nothing else changes
    assert back.block == "b" and back.ok and not back.cached and back.record_version == RECORD_VERSION
    assert set(rec.summary()) >= {"key", "depth", "final_loss", "status", "vary", "cached"}
    data = rec.to_json()
    for change, why in ((lambda d: d.pop("seed"), "no 'seed'"),
                        (lambda d: d.update(final_loss="abc"), "'final_loss' has the wrong type"),
                        (lambda d: d.update(depth=True), "'depth' has the wrong type"),
                        (lambda d: d.update(status="done"), "status 'done'"),
                        (lambda d: d["spec"].update(seed=1), "not the hash of its spec"),
                        (lambda d: d.update(record_version=1), "record_version 1")):
        bad = json.loads(json.dumps(data))
        change(bad)
        with pytest.raises(BadRecord, match=why):
            RunRecord.from_json(bad)
    with pytest.raises(BadRecord, match="does not match the file name"):
        RunRecord.from_json(json.loads(json.dumps(data)), key="0" * 20)


def test_atomic_write_leaves_the_old_file_or_the_new_one(tmp_path):
    path = tmp_path / "f.json"
    atomic_write_text(path, "old")

    def broken(f):
        f.write(b"half")
        raise RuntimeError("disk full")  # what torch.save raises

    with pytest.raises(WriteError, match=r"cannot write .*f\.json: disk full; [\d,]+ MB free there"):
        atomic_write(path, broken)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]


PLUGIN = '''
import torch
import archbench


@archbench.register_block("my-mlp"{version})
class MyMLP(torch.nn.Module):
    """A residual MLP."""

    def __init__(self, dim, layer_idx, depth, hidden: int = 16):
        super().__init__()
        self.fc, self.proj = torch.nn.Linear(dim, hidden), torch.nn.Linear(hidden, dim)

    def forward(self, x):
{body}
'''
BODY = "        return x + self.proj(torch.relu(self.fc(x)))"
REFACTORED = ("        # the same numbers, written differently\n"
              "        update = self.proj(torch.relu(self.fc(x)))\n        return x + update")


def test_a_refactor_keeps_runs_cached_and_a_raised_version_retrains(main, tmp_path):
    plugin = tmp_path / "my_mlp.py"

    def sweep(version, body):
        plugin.write_text(PLUGIN.format(version=f", version={version}" if version else "", body=body))
        r = main("eval", "--plugins", plugin, "--block", "my-mlp", *TINY, "--runs-dir", tmp_path / "runs",
                "--out", tmp_path / "r.json")
        assert r.returncode == 0, r.stderr
        return json.loads((tmp_path / "r.json").read_text())

    first = sweep(None, BODY)
    assert not any(run["cached"] for run in first["runs"])
    again = sweep(None, REFACTORED)  # a comment and a refactor: nothing trains
    assert all(run["cached"] for run in again["runs"])
    assert [run["final_loss"] for run in again["runs"]] == [run["final_loss"] for run in first["runs"]]
    bumped = sweep(2, REFACTORED)  # its numbers changed: every run trains again, beside the old records
    assert not any(run["cached"] for run in bumped["runs"])
    records = [json.loads(p.read_text()) for p in (tmp_path / "runs" / "records").glob("*.json")]
    assert sorted(r["spec"]["block_version"] for r in records) == [1, 1, 2, 2]
    assert len({r["source"]["block"] for r in records}) == 2  # the source hash stays, as provenance


def test_records_from_before_versioned_keys_are_migrated_not_retrained(main, tmp_path):
    args = ["eval", *TINY, "--runs-dir", tmp_path / "runs", "--out", tmp_path / "r.json"]
    assert main(*args).returncode == 0
    folder = tmp_path / "runs" / "records"
    losses = {}
    for path in folder.glob("*.json"):  # rewrite each record as archbench wrote it before (record version 1)
        new = json.loads(path.read_text())
        s = new["spec"]
        spec = {"archbench": "0.1.0", "block": s["block"], "block_source": "feedfacefeedface", "block_cfg": s["block_cfg"],
                "task": s["task"], "task_source": "0123456789abcdef", "task_cfg": s["task_cfg"], "model": s["model"],
                "train": s["train"], "depth": s["depth"], "seed": s["seed"]}
        old = {k: v for k, v in new.items() if k not in ("source", "record_version")}
        old.update(record_version=1, key=digest(spec), spec=spec, block=s["block"], task=s["task"])
        assert migrate_record(old)["key"] == new["key"]
        path.unlink()
        (folder / f"{new['key']}.pt").rename(folder / f"{old['key']}.pt")
        (folder / f"{old['key']}.json").write_text(json.dumps(old))
        losses[new["key"]] = new["final_loss"]
    (folder / ".format").unlink(missing_ok=True)

    r = main(*args)
    assert r.returncode == 0, r.stderr
    assert "2 run record(s) from before versioned keys" in r.stderr
    res = json.loads((tmp_path / "r.json").read_text())
    assert all(run["cached"] for run in res["runs"]) and {run["key"]: run["final_loss"] for run in res["runs"]} == losses
    store = RunStore(tmp_path / "runs")
    for key in losses:
        rec = store.load(key)
        assert rec.source == {"archbench": "0.1.0", "block": "feedfacefeedface", "task": "0123456789abcdef"}
        assert store.weights_path(key).exists()


def test_an_unreadable_record_is_set_aside_and_only_its_run_trains_again(main, tmp_path):
    args = ["eval", *TINY, "--depths", "1,2,3", "--runs-dir", tmp_path / "runs", "--out", tmp_path / "r.json"]
    assert main(*args).returncode == 0
    first = {run["depth"]: run for run in json.loads((tmp_path / "r.json").read_text())["runs"]}
    folder = tmp_path / "runs" / "records"
    (folder / f"{first[1]['key']}.json").write_bytes(b"\xff\xfe not utf-8")
    data = json.loads((folder / f"{first[2]['key']}.json").read_text())
    data["final_loss"] = "abc"
    (folder / f"{first[2]['key']}.json").write_text(json.dumps(data))

    r = main(*args)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    for depth, why in ((1, "unreadable: "), (2, "'final_loss' has the wrong type")):
        assert any(first[depth]["key"] in line and why in line and "moved to" in line for line in r.stderr.splitlines())
    runs = {run["depth"]: run for run in json.loads((tmp_path / "r.json").read_text())["runs"]}
    assert [runs[d]["cached"] for d in (1, 2, 3)] == [False, False, True]
    assert runs[1]["final_loss"] == first[1]["final_loss"]  # trained again, to the same numbers
    assert len(list((folder / "corrupt").iterdir())) == 2
