import numpy as np
import pytest

from archbench.evaluators.alpha_ell import AlphaEll, bootstrap_alpha, fit_power_law

DEPTHS = np.array([6, 12, 16, 24, 32, 48])


@pytest.mark.parametrize("alpha", [1.0, 3.0])
def test_fit_recovers_known_exponent(alpha):
    rng = np.random.default_rng(0)
    depths = np.repeat(DEPTHS, 3)
    losses = 2.5 * depths ** -alpha * np.exp(rng.normal(0, 0.05, len(depths)))  # 5 % multiplicative noise
    fit = fit_power_law(depths, losses)
    assert fit["alpha"] == pytest.approx(alpha, abs=0.08)
    ci, n = bootstrap_alpha(depths, losses, n_boot=400)
    assert ci[0] < fit["alpha"] < ci[1] and ci[1] - ci[0] < 0.3 and n == 400
    exact = fit_power_law(DEPTHS, 2.5 * DEPTHS ** -alpha)
    assert exact["alpha"] == pytest.approx(alpha, abs=1e-10) and exact["c"] == pytest.approx(2.5)
    assert exact["residual_rms"] < 1e-10


def test_bootstrap_interval_covers_the_truth_most_of_the_time():
    # A case bootstrap over 18 runs undercovers a little; 95 % nominal gives ~85 % here.
    hits = 0
    for seed in range(30):
        rng = np.random.default_rng(seed)
        depths = np.repeat(DEPTHS, 3)
        losses = 2.5 * depths ** -1.0 * np.exp(rng.normal(0, 0.05, len(depths)))
        lo, hi = bootstrap_alpha(depths, losses, n_boot=200, seed=seed)[0]
        hits += lo < 1.0 < hi
    assert hits >= 21


def test_fit_with_floor():
    losses = 0.8 * DEPTHS ** -1.5 + 0.3
    naive = fit_power_law(DEPTHS, losses)
    assert naive["alpha"] < 0.5  # a floor hides the power law
    fitted = fit_power_law(DEPTHS, losses, floor="fit")
    assert fitted["alpha"] == pytest.approx(1.5, abs=1e-3) and fitted["floor"] == pytest.approx(0.3, abs=1e-4)
    fixed = fit_power_law(DEPTHS, losses, floor=0.3)
    assert fixed["alpha"] == pytest.approx(1.5, abs=1e-9)
    with pytest.raises(ValueError, match="not below"):
        fit_power_law(DEPTHS, losses, floor=5.0)


def test_evaluator_reports_value_interval_and_counts(make_run):
    runs = [make_run(int(d), float(d ** -1.0 * (1 + 0.02 * s)), seed=s) for d in DEPTHS for s in range(2)]
    runs.append(make_run(64, None, status="failed"))
    out = AlphaEll(n_boot=200).evaluate_sweep(runs, task=None)
    assert out["value"] == pytest.approx(1.0, abs=0.01)
    assert out["n_runs"] == 12 and out["n_depths"] == 6
    assert out["ci95"][0] <= out["value"] <= out["ci95"][1]
    one = AlphaEll().evaluate_sweep(runs[:1], task=None)
    assert one["value"] is None and "two depths" in one["note"]


def test_no_interval_when_the_fit_passes_through_every_run(make_run):
    ev = AlphaEll(floor="fit")
    runs = [make_run(d, 1.0 + 2.0 * d ** -1.5) for d in (3, 6, 12)]
    out = ev.evaluate_sweep(runs, task=None)
    assert out["value"] == pytest.approx(1.5, abs=1e-3) and out["ci95"] is None and "add seeds" in out["note"]
    rising = [make_run(d, 3.0 + 0.01 * d, seed=i) for i, d in enumerate((3, 6, 12, 12))]
    out = ev.evaluate_sweep(rising, task=None)
    assert out["value"] < 1e-6 and "does not fall with depth" in out["note"]


def test_the_interval_resamples_replicates_and_a_single_one_gives_none(make_run):
    """Each replicate (a teacher, say) shifts the loss at every depth alike: a bootstrap that moves a
    replicate's runs together sees no noise in the slope; one over single runs would see the shifts."""
    scale = (1.0, 1.3, 0.8)
    runs = [make_run(int(d), float(c * d ** -2.0), seed=s) for s, c in enumerate(scale) for d in DEPTHS]
    out = AlphaEll(n_boot=200).evaluate_sweep(runs, task=None)
    assert out["value"] == pytest.approx(2.0) and out["n_replicates"] == 3
    assert out["ci95"] == pytest.approx([2.0, 2.0], abs=1e-9)
    case, _ = bootstrap_alpha([r.depth for r in runs], [r.final_loss for r in runs], n_boot=200)
    assert case[1] - case[0] > 0.05
    first = out["per_depth"][0]
    assert first["depth"] == 6 and first["n"] == 3
    assert first["mean"] == pytest.approx(np.mean(scale) / 36)
    assert first["se"] == pytest.approx(np.std(scale, ddof=1) / np.sqrt(3) / 36)
    one = AlphaEll().evaluate_sweep(runs[:6], task=None)  # one replicate: its pairwise slopes are not an interval
    assert one["value"] == pytest.approx(2.0) and one["ci95"] is None and "one replicate" in one["note"]
    assert one["per_depth"][0]["se"] is None


def test_alpha_against_training_steps_from_the_held_out_losses_along_training(make_run):
    runs = []
    for s, c in enumerate((1.0, 1.2)):
        for d in DEPTHS:
            run = make_run(int(d), float(c * d ** -2.0), seed=s)
            run.eval_history = [[100, float(c * d ** -1.0)], [200, float(c * d ** -2.0)]]
            runs.append(run)
    runs[0].eval_history.insert(0, [50, 1.0])  # a step not every run measured is left out
    out = AlphaEll(n_boot=100).evaluate_sweep(runs, task=None)
    assert [b["step"] for b in out["by_step"]] == [100, 200]
    assert [b["value"] for b in out["by_step"]] == pytest.approx([1.0, 2.0])
    assert out["by_step"][0]["ci95"] == pytest.approx([1.0, 1.0]) and out["by_step"][1]["per_depth"][0]["n"] == 2
    assert "by_step" not in AlphaEll().evaluate_sweep([make_run(d, d ** -1.0) for d in (2, 4)], task=None)


def test_alpha_against_a_swept_knob_is_drawn_per_value_of_the_other(tmp_path):
    points = [{"vary": {"task.temperature": t, "task.teacher": kind}, "value": v, "ci95": [v - 0.1, v + 0.1]}
              for kind, v0 in (("independent", 1.0), ("tied", 2.0)) for t, v in ((0.01, v0), (0.1, v0 + 0.5), (1.0, v0 + 1))]
    path = tmp_path / "a.png"
    assert AlphaEll().plot_points(["task.temperature", "task.teacher"], points, path) and path.stat().st_size > 1000
    kinds = [{"vary": {"task.teacher": k}, "value": 1.0, "ci95": None} for k in ("independent", "tied")]
    assert not AlphaEll().plot_points(["task.teacher"], kinds, tmp_path / "b.png")  # nothing numeric to draw against
