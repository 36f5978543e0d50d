"""archbench.analyze (``archbench analyze``): the per-model evaluators on a pretrained causal LM."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from archbench.analyze import AnalyzeSpec, result_path, run_analyze
from archbench.errors import UsageError


def one_line(excinfo):
    text = str(excinfo.value)
    assert text and "\n" not in text, text
    return text


def test_analyze_smollm2_end_to_end(main, smollm2, tmp_path, monkeypatch):
    """`archbench analyze` on the real SmolLM2-135M: the evaluators, the paper-2 summary, resuming.

    The model is the session's (``load_hf_model("smollm2-135m")``, tested in tests/hf): loading it
    again for each command would cost ~20 s here and check nothing new."""
    import archbench.analyze

    asked = []

    def load_hf_model(name, *, device, dtype):
        asked.append((name, str(device), dtype))
        return smollm2[0].hf, smollm2[1]

    monkeypatch.setattr(archbench.analyze, "load_hf_model", load_hf_model)
    out = tmp_path / "smol.json"
    # --tokens and skip-sensitivity's max_tokens differ, so each evaluator is seen to get its own
    args = ["analyze", "--hf-model", "smollm2-135m", "--tokens", "32", "--seq-len", "16", "--set",
            "skip-sensitivity.max_tokens=16", "--set", "layer-similarity.lens_tokens=16", "--out", out]
    r = main(*args)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    sim, skip = res["metrics"]["layer-similarity"], res["metrics"]["skip-sensitivity"]
    assert sim["tokens"] == 32 and len(sim["per_layer"]["theta"]) == 30 and len(sim["cka"]) == 31
    assert sim["cka_method"] == "minibatch" and sim["lens_tokens"] == 16
    assert skip["tokens"] == 16 and set(skip["variants"]) == {"layer", "attn", "mlp", "local", "future"}
    assert "paper-2 pattern" in r.stdout and res["peak_rss_mib"] > 0 and len(res["files"]["plots"]) == 2
    # paper 2's statistic is the maximum over positions; the token mean is shown beside it, named as such
    top, mean = skip["halves"]["output_l2_max"], skip["halves"]["output_l2"]
    assert top["first_half"] >= mean["first_half"] and top["second_half"] >= mean["second_half"]
    assert "max over positions" in r.stdout and "the token mean, not paper 2's statistic" in r.stdout
    assert skip["depth_score"]["prompts"] == 1 and 0 < skip["depth_score"]["relative"] < 1  # one window, one cut (t = 8)
    assert "depth score (paper 2's" in r.stdout
    r = main(*args)  # everything is reused
    assert r.returncode == 0 and r.stderr.count("reusing the result") == 2
    assert asked == [("smollm2-135m", "cpu", torch.float32)] * 2
    # a usage error is found before the model loads
    r = main("analyze", "--hf-model", "smollm2-135m", "--evaluators", "alpha-ell")
    assert r.returncode == 2 and "needs a depth sweep" in r.stderr


@pytest.mark.parametrize("spec,says", [
    (AnalyzeSpec("smollm2-135m", tokens=16, seq_len=32), "--tokens 16"),
    (AnalyzeSpec("smollm2-135m", evaluators=["alpha-ell"]), "needs a depth sweep"),
    (AnalyzeSpec("smollm2-135m", evaluators=["layer-similarty"]), "layer-similarity"),
    (AnalyzeSpec("smollm2-135m", evaluators=["layer-similarity"], sets={"skip-sensitivity": {"max_tokens": "64"}}),
     "--set section"),
    (AnalyzeSpec("smollm2-135m", sets={"layer-similarity": {"no_such_knob": "0"}}), "layer-similarity.no_such_knob"),
    (AnalyzeSpec("smollm2-135m", dtype="float8"), "--dtype"),
])
def test_bad_specs_fail_in_one_line_before_loading(spec, says):
    with pytest.raises(UsageError) as e:
        run_analyze(spec)
    assert says in one_line(e)


def test_bad_set_on_the_command_line(main):
    r = main("analyze", "--hf-model", "smollm2-135m", "--set", "no-dot")
    err = r.stderr
    assert r.returncode == 2
    assert err.startswith("archbench: error:") and len(err.strip().splitlines()) == 1


def test_result_path():
    """The default result file is named by the model and a hash of the config: the same analysis finds
    the same file to resume from (the digits are those of a run key over the same JSON)."""
    config = {"model": "m", "dtype": "float32"}
    assert result_path(AnalyzeSpec("./models/SmolLM2 135M.gguf"), config) == Path(
        "runs/analyze/SmolLM2_135M.gguf__1f18d587.json")
    assert result_path(AnalyzeSpec("x", out="a/b.json"), config) == Path("a/b.json")
