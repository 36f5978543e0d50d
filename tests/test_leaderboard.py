"""`archbench leaderboard`: tables from run records, validated, merged, traceable."""

import csv
import io
import json
import shutil

import pytest

from archbench.config import EvalSpec, resolve_config
from archbench.sweep import run_eval



@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """Two smoke sweeps with the regime evidence: residual-mlp and rezero (``archbench eval``'s own
    function, in this process; the CLI's tests run it as a command)."""
    root = tmp_path_factory.mktemp("lb")
    results = {}
    for block in ("residual-mlp", "rezero"):
        out = root / f"{block}.json"
        run_eval(EvalSpec(block=block, preset="smoke", sets={"train": {"steps": "40"}},
                          evaluators=["alpha-ell", "regime"], runs_dir=str(root / "runs"), out=str(out)))
        results[block] = json.loads(out.read_text())
    return root, results


def test_tables_match_the_evaluators_and_trace_to_records(main, swept, tmp_path):
    root, results = swept
    out = tmp_path / "leaderboards"
    r = main("leaderboard", "--runs-dir", root / "runs", "--out", out)
    assert r.returncode == 0, r.stderr
    name = "teacher-student__smoke__train-"  # steps=40 is not the smoke preset's budget
    (md,) = out.glob(f"{name}*.md")
    doc = json.loads(md.with_suffix(".json").read_text())
    assert doc["task"] == "teacher-student" and doc["train"]["steps"] == 40 and doc["built_by"].startswith("archbench leaderboard")
    rows = {row["block"]: row for row in doc["rows"]}
    assert set(rows) == {"residual-mlp", "rezero"}
    for block, res in results.items():
        row = rows[block]
        # recomputed from the records by the same evaluators: the eval's own numbers
        assert row["alpha"] == pytest.approx(res["alpha_ell"]["value"])
        assert row["alpha_ci95"] == pytest.approx(res["alpha_ell"]["ci95"])
        assert row["regime"] == res["metrics"]["regime"]["regime"]
        assert row["phi_mid"] == pytest.approx(res["metrics"]["regime"]["evidence"]["phi_mid"])
        deepest = max(res["runs"], key=lambda x: x["depth"])
        assert row["loss"] == pytest.approx(deepest["final_loss"]) and row["params"] == deepest["params"]
        assert sorted(row["records"]) == sorted(run["key"] for run in res["runs"])
        assert row["depths"] == [3, 6, 12] and row["device"] == ["cpu"] and row["version"][0].startswith("0.")
        assert row["train_s"] == pytest.approx(sum(run["wall_s"] for run in res["runs"]), abs=0.2)
    # each row against the baseline row (residual-mlp at default knobs on teacher-student): one replicate
    # each, so a difference without an interval
    assert rows["residual-mlp"]["vs_baseline"] is None
    vs = rows["rezero"]["vs_baseline"]
    assert vs["alpha_diff"] == pytest.approx(rows["rezero"]["alpha"] - rows["residual-mlp"]["alpha"])
    assert vs["ci95"] is None and vs["verdict"] == "no interval" and vs["paired"]
    assert vs["loss_relative"] == pytest.approx(rows["rezero"]["loss"] / rows["residual-mlp"]["loss"] - 1)
    assert vs["loss_depth"] == 12 and vs["loss_ci95"] is None and vs["loss_verdict"] == "no interval"
    # sorted by alpha; the Markdown says how it was made and what the columns mean
    assert [r["alpha"] for r in doc["rows"]] == sorted((r["alpha"] for r in doc["rows"]), reverse=True)
    text = md.read_text()
    assert "Built by `archbench leaderboard" in text and "- **alpha**:" in text and "| residual-mlp |" in text
    table = list(csv.DictReader(io.StringIO(md.with_suffix(".csv").read_text())))
    assert {t["block"] for t in table} == set(rows)
    for t in table:
        assert float(t["alpha"]) == pytest.approx(rows[t["block"]]["alpha"])
        assert t["records"].split(";") == rows[t["block"]]["records"]


def test_bad_records_are_reported_and_nothing_published_is_lost(main, swept, tmp_path):
    root, _ = swept
    runs = tmp_path / "runs"
    shutil.copytree(root / "runs", runs)
    records = runs / "records"
    (records / "broken.json").write_text("{not json")
    (records / "foreign.json").write_text(json.dumps({"name": "someone else's file"}))
    victim = next(p for p in sorted(records.glob("*.json")) if len(p.stem) == 20)
    data = json.loads(victim.read_text())
    data["depth"] = "twelve"
    victim.write_text(json.dumps(data))
    out = tmp_path / "lb"
    r = main("leaderboard", "--runs-dir", runs, "--out", out)
    assert r.returncode == 0, r.stderr
    for name, why in (("broken.json", "unreadable"), ("foreign.json", "record_version None"),
                      (victim.name, "'depth' has the wrong type")):
        assert any(name in line and why in line for line in r.stderr.splitlines()), r.stderr
    assert "Traceback" not in r.stderr
    (table,) = out.glob("*.json")
    before = json.loads(table.read_text())["rows"]
    assert sum(len(row["records"]) for row in before) == 5  # six runs less the damaged one

    # rebuilding from a runs directory holding only rezero keeps the residual-mlp row
    only = tmp_path / "only"
    (only / "records").mkdir(parents=True)
    for row in before:
        if row["block"] == "rezero":
            for key in row["records"]:
                shutil.copy(records / f"{key}.json", only / "records")
    r = main("leaderboard", "--runs-dir", only, "--out", out)
    assert r.returncode == 0, r.stderr
    after = json.loads(table.read_text())["rows"]
    assert {row["id"] for row in after} == {row["id"] for row in before}

    # a table file that is not one is never overwritten
    table.write_text("[1, 2]")
    r = main("leaderboard", "--runs-dir", only, "--out", out)
    assert r.returncode == 1 and "not an archbench leaderboard table" in r.stderr
    assert table.read_text() == "[1, 2]"
    r = main("leaderboard", "--runs-dir", tmp_path / "nowhere", "--out", tmp_path / "x")
    assert r.returncode == 1 and "no run records" in r.stderr


def _rewrite(path, change):
    """Change a record as other code would have made it, under the key its changed spec has."""
    from archbench.records import digest

    data = json.loads(path.read_text())
    change(data)
    data["key"] = digest(data["spec"])
    path.unlink()
    (path.parent / f"{data['key']}.json").write_text(json.dumps(data))
    return data


def test_rows_at_other_versions_are_left_out_and_other_source_is_noted(main, swept, tmp_path):
    root, _ = swept
    runs = tmp_path / "runs"
    shutil.copytree(root / "runs", runs)
    for path in sorted((runs / "records").glob("*.json")):
        block = json.loads(path.read_text())["spec"]["block"]
        if block == "rezero":  # trained before a change of its numbers (rezero's version was raised since)
            _rewrite(path, lambda d: d["spec"].update(block_version=0))
        else:  # trained by a refactored residual-mlp: other source, same version
            _rewrite(path, lambda d: d["source"].update(block="0123456789abcdef"))
    r = main("leaderboard", "--runs-dir", runs, "--out", tmp_path / "now")
    assert r.returncode == 0, r.stderr
    assert "trained at block 'rezero' version 0 (now 1); --all-versions keeps it" in r.stderr
    notes = [line for line in r.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "residual-mlp" in notes[0] and "other source of its block" in notes[0], r.stderr
    (table,) = (tmp_path / "now").glob("*.json")
    assert {row["block"] for row in json.loads(table.read_text())["rows"]} == {"residual-mlp"}
    r = main("leaderboard", "--runs-dir", runs, "--out", tmp_path / "all", "--all-versions")
    assert r.returncode == 0 and "version 0" not in r.stderr
    (table,) = (tmp_path / "all").glob("*.json")
    assert {row["block"] for row in json.loads(table.read_text())["rows"]} == {"residual-mlp", "rezero"}


def _without_build_dates(folder):
    """Every table file's text with its build dates blanked (the one thing a rebuild may change)."""
    import re

    stamp = re.compile(r'"built": "[^"]*"|on \d{4}-\d{2}-\d{2} from')
    return {p.name: stamp.sub("BUILT", p.read_text()) for p in sorted(folder.iterdir()) if p.is_file()}


def test_published_tables_rebuild_from_the_committed_records_byte_for_byte(swept, tmp_path):
    """publish.py's collect + tables: the records beside a table rebuild it, whatever else is gone."""
    root, _ = swept
    publish = _publish_module()
    here = tmp_path / "leaderboards"
    assert publish.collect(root / "runs", here, ["teacher-student"]) == 6
    assert not list((here / "records").glob("*.pt")), "records only, no weights"
    (here / "studies").mkdir()
    (here / "studies" / "s.json").write_text(json.dumps([{"number": 3, "eval": {"block": "rezero", "sets": {}}}]))
    lines = publish.tables(here, ["teacher-student"])
    assert any("6 run records -> 1 tables" in line for line in lines), lines
    first = _without_build_dates(here)
    assert len(first) == 3 and all(len(text) > 200 for text in first.values())
    rows = json.loads(next(p for p in here.glob("*.json")).read_text())["rows"]
    assert {row["source"] for row in rows} == {"", "search s #3"} and rows[0]["runs_dirs"] == ["leaderboards"]
    fresh = tmp_path / "fresh-runs"  # another machine: the committed records seed its cache
    assert publish.seed(fresh, here) == 6 and publish.seed(fresh, here) == 0
    res = run_eval(EvalSpec(block="rezero", preset="smoke", sets={"train": {"steps": "40"}},
                            evaluators=["alpha-ell"], runs_dir=str(fresh)))
    assert all(r["cached"] for r in res["runs"])
    for table in here.glob("teacher-student*"):  # the tables are gone; the records bring them back
        table.unlink()
    publish.tables(here, ["teacher-student"])
    assert _without_build_dates(here) == first


def _publish_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "leaderboards" / "publish.py"
    spec = importlib.util.spec_from_file_location("publish", path)
    publish = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(publish)
    return publish


def test_publish_scales_depths_a_block_cannot_have():
    """publish.py keeps the preset's depth ratios for blocks that have no depth 1 (and leaves others be)."""
    from archbench.config import EvalSpec

    publish = _publish_module()
    cfg = dict(task="cfg-language", preset="quick", evaluators=["alpha-ell"])
    assert publish.buildable(EvalSpec(block="residual", **cfg)).depths is None  # the preset's 1, 2, 4
    assert publish.buildable(EvalSpec(block="hourglass", **cfg)).depths == [3, 6, 12]
    assert publish.buildable(EvalSpec(block="recurrent-depth", **cfg)).depths == [3, 6, 12]
    # recurrent-depth with 2 layers per iteration: 2 + 2r, so 1, 2, 4 become 4, 8, 16
    two = publish.buildable(EvalSpec(block="recurrent-depth", sets={"block": {"core": "2"}}, **cfg))
    assert two.depths == [4, 8, 16]


def test_every_published_table_can_be_built_for_every_block():
    """publish.py's sweeps resolve for every registered block (none stops a multi-hour rebuild half-way),
    each with at least 3 replicates per depth, so that every row has an interval."""
    from archbench.registry import BLOCKS

    publish = _publish_module()
    for label, fields in publish.TABLES.items():
        for entry in BLOCKS.entries():
            spec = publish.buildable(EvalSpec(block=entry.name, **fields))
            cfg = resolve_config(spec)
            assert cfg.seeds * (cfg.teachers or 1) >= 3, (label, entry.name)
            assert len(cfg.depths) >= 3 and cfg.depths == sorted(cfg.depths), (label, entry.name)


def test_a_table_off_every_preset_is_named_after_the_nearest_one():
    """exp-9-3 on the independent teacher at a cut budget matches no preset's task settings or budget: its
    table is named after paper-long (one task knob and one training setting away), not after the defaults."""
    from archbench.leaderboard import table_identity, task_settings
    from archbench.registry import TASKS

    cfg = resolve_config(EvalSpec(preset="paper-long", sets={"task": {"teacher": "independent"},
                                                             "train": {"steps": "1000"}}))
    task_cfg = task_settings(TASKS.get("teacher-student").obj, cfg.task)
    name, preset, diff = table_identity("teacher-student", task_cfg, cfg.train)
    assert name.startswith("teacher-student__teacher-independent__paper-long__train-")
    assert preset is None and diff == {"teacher": "independent"}


def test_a_task_headline_metric_gets_a_column_and_a_paired_difference_with_the_baseline(main, tmp_path):
    """hop-induction's headline is the error at the hardest k trained: each row shows it at the largest
    depth, and against the baseline row (`residual`) with an interval over the seeds both ran."""
    import numpy as np

    runs = tmp_path / "runs"
    results = {}
    for block in ("residual", "looped"):
        results[block] = run_eval(EvalSpec(block=block, task="hop-induction", preset="smoke", seeds=2,
                                           runs_dir=str(runs), plots=False))
    r = main("leaderboard", "--runs-dir", runs, "--out", tmp_path / "lb")
    assert r.returncode == 0, r.stderr
    (md,) = (tmp_path / "lb").glob("hop-induction*.md")
    rows = {row["block"]: row for row in json.loads(md.with_suffix(".json").read_text())["rows"]}
    at = {b: [run["eval"]["error_k2"] for run in res["runs"] if run["depth"] == 2] for b, res in results.items()}
    assert rows["looped"]["headline_metric"] == "error_k2"
    assert rows["looped"]["headline"] == pytest.approx(np.mean(at["looped"]))
    vs = rows["looped"]["vs_baseline"]
    assert vs["headline_depth"] == 2 and vs["headline_diff"] == pytest.approx(np.mean(at["looped"]) - np.mean(at["residual"]))
    assert vs["headline_ci95"] is not None and vs["headline_ci95"][0] <= vs["headline_diff"] <= vs["headline_ci95"][1]
    text = md.read_text()
    assert "| error_k2 | Δerror_k2 vs baseline [95 % CI] |" in text and "- **headline**:" in text


def test_a_published_search_rebuilds_its_table_from_the_committed_study_and_records(tmp_path, monkeypatch):
    """publish.py's search: study continued and confirmed, collected (study as a journal file, records), and its
    table rebuilt from those files alone; an unconfirmed study's table says so instead of training."""
    publish = _publish_module()
    monkeypatch.setattr(publish, "SEARCHES", {"tiny": dict(
        task="teacher-student", preset="smoke", depths=[2, 4], sets={"train": {"steps": "30"}}, objectives=["loss"],
        pruner="none", trials=2, workers=1, confirm=3)})
    monkeypatch.setattr(publish, "SEARCH_DIR", tmp_path / "search")
    from rich.console import Console

    console = Console(quiet=True)
    publish.search("tiny", tmp_path / "runs", "cpu", console)
    collected = publish.collect_search("tiny", tmp_path / "runs")
    line = publish.search_table("tiny")
    table = json.loads((tmp_path / "search" / "teacher-student-loss-smoke.json").read_text())
    control = table["rows"][1]["control"]  # trial 1 against residual-mlp with its shared knobs, if it has any
    # the trials' runs, the confirmation's (baseline and trial 1, 3 seeds at 2 depths) and the control's
    assert collected == 2 * 2 + 2 * 2 * 3 + (2 * 3 if control else 0)
    assert "2 trials" in line and "not confirmed" not in line
    assert table["n_trials"] == 2 and table["confirmation"] == {"seeds": 3} and table["rows"][0]["baseline"]
    assert table["command"] == "python leaderboards/publish.py --tables tiny"
    assert (tmp_path / "search" / "teacher-student-loss-smoke" / "history.png").stat().st_size > 1000
    shutil.rmtree(tmp_path / "runs")  # rebuilt from search/ alone: the same table, the committed study untouched
    study = (tmp_path / "search" / "teacher-student-loss-smoke.journal").read_bytes()
    publish.search_table("tiny")
    assert (tmp_path / "search" / "teacher-student-loss-smoke.journal").read_bytes() == study
    assert json.loads((tmp_path / "search" / "teacher-student-loss-smoke.json").read_text()) == table
    if control:  # without the control's records: confirmed against the baseline alone, and it says so
        for key in control["records"]["teacher-student"]:
            (tmp_path / "search" / "records" / f"{key}.json").unlink()
        assert "(no controls: 6 of their runs missing" in publish.search_table("tiny")
        shown = json.loads((tmp_path / "search" / "teacher-student-loss-smoke.json").read_text())["rows"][1]
        assert shown["control"] is None and shown["confirmed"] == table["rows"][1]["confirmed"]
    for path in (tmp_path / "search" / "records").glob("*.json"):  # without the confirmation's records
        if json.loads(path.read_text())["spec"]["train"]["steps"] != 30:
            path.unlink()
    assert "not confirmed: 12 confirmation runs missing" in publish.search_table("tiny")
