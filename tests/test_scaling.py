"""`archbench fit-scaling`: the loss decomposition L(m, ℓ, D) fitted to the Chinchilla runs."""

import hashlib
import json
import re

import numpy as np
import pytest
from scipy.stats import linregress

from archbench import scaling
from archbench.errors import ArchbenchError

PLANTED = {"alpha_m": 1.0, "alpha_ell": 1.2, "alpha_D": 0.3}


def synthetic_runs(noise: float, seed: int = 0) -> scaling.Runs:
    """A 6x6x6 grid of (m, ℓ, D) with known law and multiplicative log-normal noise."""
    grid = np.meshgrid(np.geomspace(512, 5120, 6), np.array([8, 12, 16, 24, 32, 48.0]), np.geomspace(1e9, 3e11, 6),
                       indexing="ij")
    m, ell, D = (g.ravel() for g in grid)
    loss = 300 * m**-1.0 + 8 * ell**-1.2 + 300 * D**-0.3 + 1.7
    loss *= np.exp(noise * np.random.default_rng(seed).standard_normal(loss.size))
    return scaling.Runs("synthetic", {"loss": loss, "d_model": m, "n_layers": ell, "num_tokens": D})


def test_recovers_planted_law_exactly_without_noise():
    r = scaling.fit_scaling(synthetic_runs(0.0), exclude=0, bootstrap_resamples=0, sensitivity=False)
    for name, value in PLANTED.items():
        assert r["exponents"][name]["value"] == pytest.approx(value, abs=1e-6)
    assert r["L0"]["value"] == pytest.approx(1.7, rel=1e-6)
    assert r["coefficients"]["c_ell"]["value"] == pytest.approx(8, rel=1e-5)
    assert r["convergence"]["converged"] and r["mean_relative_error"] < 1e-8


def test_recovers_planted_exponents_with_noise_within_their_errors():
    r = scaling.fit_scaling(synthetic_runs(0.001), exclude=0, bootstrap_resamples=30, sensitivity=False)
    for name, value in PLANTED.items():
        e = r["exponents"][name]
        assert abs(e["value"] - value) < 0.02 and abs(e["value"] - value) < 4 * e["se"], (name, e)
        assert e["ci95"][0] < e["value"] < e["ci95"][1]
    assert r["L0"]["value"] == pytest.approx(1.7, abs=0.01)
    assert r["convergence"]["starts_reaching_best"] == r["convergence"]["starts"]


def test_gauss_newton_se_matches_ordinary_least_squares():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 10, 50)
    y = 2.0 + 0.5 * x + rng.normal(0, 0.3, 50)
    ref = linregress(x, y)
    J = np.column_stack([x, np.ones_like(x)])
    se, cov = scaling.gauss_newton_se(J, y - ref.slope * x - ref.intercept)
    assert se == pytest.approx([ref.stderr, ref.intercept_stderr], rel=1e-10)
    assert cov.shape == (2, 2)


def test_analytic_jacobian_matches_finite_differences():
    runs = scaling.load_runs()
    X, y, _ = scaling.design(runs)
    p = scaling.fit_law(X, y).x
    h = 1e-6
    fd = np.column_stack([(scaling.residuals(p + h * e, X, y) - scaling.residuals(p - h * e, X, y)) / (2 * h)
                          for e in np.eye(len(p))])
    J = scaling.jacobian(p, X, y)
    assert J == pytest.approx(fd, abs=1e-7)
    r = scaling.residuals(p, X, y)
    assert scaling.gauss_newton_se(J, r)[0] == pytest.approx(scaling.gauss_newton_se(fd, r)[0], rel=1e-5)


def test_bundled_csv_loads_and_filter_leaves_203():
    runs = scaling.load_runs()
    assert len(runs) == 245 and runs.bundled
    assert set(scaling.COLUMNS) <= set(runs.columns)
    assert scaling.keep_mask(runs.columns["loss"], 0).sum() == 245
    keep = scaling.keep_mask(runs.columns["loss"], 40)
    assert keep.sum() == 203  # the 40th-highest loss is tied with two more runs: they go too
    assert runs.columns["loss"][keep].max() < runs.columns["loss"][~keep].min()
    sha = hashlib.sha256(scaling.bundled_csv().read_bytes()).hexdigest()
    assert sha in (scaling.bundled_csv().parent / "PROVENANCE.md").read_text()


def test_depth_offset_changes_ell_only():
    runs = scaling.load_runs()
    X0, y0, _ = scaling.design(runs, 40, 0)
    X2, y2, _ = scaling.design(runs, 40, 2)
    assert np.exp(X0[:, 1]) - np.exp(X2[:, 1]) == pytest.approx(2)
    assert np.array_equal(X0[:, [0, 2]], X2[:, [0, 2]]) and np.array_equal(y0, y2)
    with pytest.raises(ArchbenchError, match="non-positive depth"):
        scaling.design(runs, 40, 9)


def test_single_depth_is_refused_not_fitted():
    runs = synthetic_runs(0.001)
    runs.columns["n_layers"] = np.full(len(runs), 24.0)
    with pytest.raises(ArchbenchError, match="column n_layers has 1 distinct value"):
        scaling.fit_scaling(runs, exclude=0, bootstrap_resamples=0, sensitivity=False)


def test_bootstrap_is_seeded():
    runs = scaling.load_runs()
    a, b, c = (scaling.fit_scaling(runs, bootstrap_resamples=8, seed=s, sensitivity=False) for s in (3, 3, 4))
    assert a["exponents"]["alpha_ell"]["ci95"] == b["exponents"]["alpha_ell"]["ci95"]
    assert a["exponents"]["alpha_ell"]["ci95"] != c["exponents"]["alpha_ell"]["ci95"]


BUNDLED = scaling.bundled_csv().read_text().splitlines()


@pytest.mark.parametrize("text, message", [
    ("\n".join(BUNDLED[:5]).replace(",n_layers", ""), r"missing column n_layers"),
    ("\n".join(BUNDLED[:3] + [BUNDLED[3].replace("3.7655629197937", "-3.7")]), r"line 4: column loss: '-3.7'"),
    ("\n".join(BUNDLED[:3] + [BUNDLED[3].replace("2560.0", "wide")]),
     r"line 4: column d_model: 'wide' is not a number"),
    ("\n".join(BUNDLED[:3] + ["1,2,3"]), r"line 4: column \w+ is missing"),
])
def test_bad_csv_contents_name_file_column_and_line(tmp_path, text, message):
    path = tmp_path / "runs.csv"
    path.write_text(text + "\n")
    with pytest.raises(ArchbenchError, match=message) as e:
        scaling.load_runs(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("case", ["missing column", "negative loss", "not a file"])
def test_cli_bad_csv_is_one_line_error(main, tmp_path, case):
    path = tmp_path / "runs.csv"
    if case == "missing column":
        path.write_text("\n".join(line.rsplit(",", 1)[0] for line in BUNDLED) + "\n")
    elif case == "negative loss":
        path.write_text("\n".join(BUNDLED[:2] + [BUNDLED[2].replace("4.665232074214", "-4.6")] + BUNDLED[3:]) + "\n")
    else:
        path = tmp_path
    r = main("fit-scaling", "--csv", path, "--bootstrap", 0, "--no-sensitivity")
    assert r.returncode != 0 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("archbench: error:") and str(path) in lines[0], r.stderr
    assert {"missing column": "missing column n_layers", "negative loss": "line 3: column loss",
            "not a file": "not a file"}[case] in lines[0]


def test_cli_end_to_end_on_bundled_data(main, tmp_path):
    out = tmp_path / "fit" / "fit.json"
    r = main("fit-scaling", "--bootstrap", 20, "--seed", 1, "--out", out)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["options"] == {"exclude": 40, "depth_offset": 0, "bootstrap": 20, "seed": 1}
    assert res["n_used"] == 203 and res["data"]["n_runs"] == 245 and res["data"]["bundled"]
    assert "2404.10102" in " ".join(res["data"]["citation"]["data"]) and "2602.05970" in res["data"]["citation"]["law"]
    assert res["archbench_version"] and res["convergence"]["converged"]
    e = res["exponents"]
    # measured: alpha_m 0.945, alpha_ell 1.325, alpha_D 0.299 (paper 0.98, 1.2 +- 0.3, 0.30)
    assert 0.85 < e["alpha_m"]["value"] < 1.05
    assert 0.9 < e["alpha_ell"]["value"] < 1.5
    assert 0.28 < e["alpha_D"]["value"] < 0.32
    for v in [*e.values(), res["L0"]]:
        assert v["se"] > 0 and v["ci95"][0] < v["value"] < v["ci95"][1]
    assert e["alpha_ell"]["se"] == pytest.approx(0.29, abs=0.01)
    assert res["mean_relative_error"] < 0.005
    assert set(res["coefficients"]) == {"c_m", "c_ell", "c_D"} and res["L0"]["value"] > 1
    cells = {(s["exclude"], s["depth_offset"]): s for s in res["sensitivity"]}
    assert set(cells) == {(x, k) for x in (0, 20, 40, 60, 80) for k in (0, 2)}
    assert cells[40, 0]["alpha_ell"] == pytest.approx(e["alpha_ell"]["value"], rel=1e-6)
    assert 0.9 < cells[40, 2]["alpha_ell"] < cells[40, 0]["alpha_ell"]  # counting ℓ−2 lowers it (paper: ≈1.1)
    assert res["paper"]["alpha_ell"] == [1.2, 0.3]
    plot = out.with_suffix(".png")
    assert res["files"] == {"json": str(out), "plot": str(plot)} and plot.stat().st_size > 5000
    assert re.search(r"α_ℓ \(depth\)\s*│\s*1\.325", r.stdout) and "Cite both" in r.stdout
