"""`archbench compare`: the difference of two sweeps' α_ℓ and loss, with an interval over replicates."""

import json

import pytest

from archbench.compare import compare

DEPTHS = (6, 12, 24)


def result(alpha, scales=(1.0, 1.1, 0.9), block="residual-mlp", teachers=True):
    """A result JSON as `archbench eval` writes it: each replicate (a teacher) scales its losses at every depth."""
    runs = [{"depth": d, "seed": 0, "teacher": t if teachers else None, "status": "ok", "final_loss": c * d ** -alpha,
             "vary": {}} for t, c in enumerate(scales) for d in DEPTHS]
    return {"block": block, "task": "teacher-student", "config": {"block": {}, "task": {"teacher": "tied"}},
            "runs": runs, "metrics": {"alpha-ell": {"floor_mode": "none"}}}


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_a_steeper_sweep_is_named_and_the_same_one_is_not_distinguishable(tmp_path):
    a, b = write(tmp_path, "a.json", result(2.0)), write(tmp_path, "b.json", result(1.0, block="rk2"))
    (c,) = compare(a, b, n_boot=200)["comparisons"]
    assert c["replicates"] == {"a": 3, "b": 3, "paired": True}
    assert c["alpha"]["diff"] == pytest.approx(1.0) and c["alpha"]["ci95"] == pytest.approx([1.0, 1.0])
    assert c["alpha"]["verdict"] == "A is steeper" and c["loss"]["depth"] == 24 and c["loss"]["verdict"] == "A is lower"
    (same,) = compare(a, a, n_boot=200)["comparisons"]
    assert same["alpha"]["ci95"] == [0.0, 0.0] and same["alpha"]["verdict"].startswith("not distinguishable")


def test_noisy_replicates_that_overlap_are_not_distinguishable_and_one_replicate_has_no_interval(tmp_path):
    # B's teachers disagree about the slope: its interval is wide and covers A's
    noisy = result(1.0)
    for run in noisy["runs"]:
        run["final_loss"] *= (run["depth"] / 6) ** (-0.3 * (run["teacher"] - 1))
    a, b = write(tmp_path, "a.json", result(1.05)), write(tmp_path, "b.json", noisy)
    (c,) = compare(a, b, n_boot=500)["comparisons"]
    assert c["alpha"]["ci95"][0] < 0 < c["alpha"]["ci95"][1] and c["alpha"]["verdict"].startswith("not distinguishable")
    one = write(tmp_path, "one.json", result(1.0, scales=(1.0,)))
    (c,) = compare(a, one)["comparisons"]
    assert c["alpha"]["ci95"] is None and "one replicate" in c["note"] and c["alpha"]["verdict"] == "no interval"


def test_unpaired_replicates_are_resampled_independently(tmp_path):
    a = write(tmp_path, "a.json", result(2.0, teachers=False, scales=(1.0,)))
    data = result(2.0, teachers=False, scales=(1.0,))
    for seed, scale in ((1, 1.2), (2, 0.8)):
        data["runs"] += [{**r, "seed": seed, "final_loss": r["final_loss"] * scale} for r in data["runs"][:3]]
    b = write(tmp_path, "b.json", data)
    (c,) = compare(b, write(tmp_path, "c.json", {**data, "runs": [{**r, "seed": r["seed"] + 10} for r in data["runs"]]}),
                   n_boot=100)["comparisons"]
    assert c["replicates"] == {"a": 3, "b": 3, "paired": False} and c["alpha"]["ci95"] is not None
    assert compare(a, b)["comparisons"][0]["replicates"]["a"] == 1


def test_the_command(main, tmp_path):
    a, b = write(tmp_path, "a.json", result(2.0)), write(tmp_path, "b.json", result(1.0, block="rk2"))
    r = main("compare", a, b, "--n-boot", "100", "--out", tmp_path / "c.json")
    assert r.returncode == 0, r.stderr
    assert "differs in block: residual-mlp vs rk2" in r.stdout and "A is steeper" in r.stdout
    assert "paired over 3 replicates" in r.stdout
    assert json.loads((tmp_path / "c.json").read_text())["comparisons"][0]["alpha"]["verdict"] == "A is steeper"
    for args, says in (([tmp_path / "nope.json", b], "no such file"),
                       ([a, tmp_path / "c.json"], "not an `archbench eval` result"),
                       ([a, b, "--n-boot", "3"], "at least 10")):
        bad = main("compare", *args)
        assert bad.returncode == 2 and says in bad.stderr and bad.stderr.count("\n") == 1, bad.stderr


def metric_result(errors_by_depth, block="residual"):
    """A result whose runs report a held-out error_k2: {depth: [one value per seed]}."""
    runs = [{"depth": d, "seed": s, "teacher": None, "status": "ok", "final_loss": 1.0, "vary": {},
             "eval": {"loss": 1.0, "error_k2": e}} for d, errs in errors_by_depth.items() for s, e in enumerate(errs)]
    return {"block": block, "task": "hop-induction", "config": {}, "runs": runs, "metrics": {}}


def test_a_metric_at_two_depths_paired_over_seeds(tmp_path):
    from archbench.compare import compare_metric

    looped = write(tmp_path, "looped.json", metric_result({4: [0.10, 0.12, 0.08]}, block="looped"))
    flat = write(tmp_path, "flat.json", metric_result({2: [0.30, 0.34, 0.29], 4: [0.11, 0.10, 0.09]}))
    c = compare_metric(looped, flat, "error_k2", depths=(4, 2), n_boot=500)
    assert c["a"]["mean"] == pytest.approx(0.10) and c["b"]["mean"] == pytest.approx(0.31) and c["paired"]
    assert c["diff"] == pytest.approx(-0.21) and c["ci95"][1] < 0 and c["verdict"] == "A is lower"
    # the deepest depth both trained by default: 4 against 4, within the seeds' noise
    same = compare_metric(looped, flat, "error_k2", n_boot=500)
    assert same["b"]["depth"] == 4 and same["verdict"].startswith("not distinguishable")


def test_the_metric_command_and_its_errors(main, tmp_path):
    looped = write(tmp_path, "looped.json", metric_result({4: [0.10, 0.12, 0.08]}, block="looped"))
    flat = write(tmp_path, "flat.json", metric_result({2: [0.30, 0.34, 0.29]}))
    r = main("compare", looped, flat, "--metric", "error_k2", "--depths", "4,2", "--n-boot", "200")
    assert r.returncode == 0, r.stderr
    assert "A - B = -0.21" in r.stdout and "paired over 3 replicates" in r.stdout and "A is lower" in r.stdout
    for args, says in ((["--metric", "error_k3"], "did you mean 'error_k2'"),
                       (["--metric", "error_k2"], "share no depth"),
                       (["--metric", "error_k2", "--depths", "4"], "give two depths"),
                       (["--metric", "error_k2", "--depths", "2,2"], "A has no finished run at depth 2"),
                       (["--depths", "4,2"], "give --metric too")):
        bad = main("compare", looped, flat, *args)
        assert bad.returncode == 2 and says in bad.stderr and bad.stderr.count("\n") == 1, (args, bad.stderr)
