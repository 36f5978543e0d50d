import subprocess
import sys
import textwrap

import pytest
import torch

import archbench
from archbench.errors import UsageError
from archbench.registry import BLOCKS, TASKS, Registry


def test_builtins_are_registered_under_the_archbench_namespace(tmp_path):
    assert {"residual", "residual-mlp"} <= set(BLOCKS.names())
    assert {"teacher-student", "lm-char", "lm-word", "k-hop", "word-problem", "variable-binding", "modular-chain",
            "cfg-language"} <= set(archbench.TASKS.names())
    assert {"alpha-ell", "depth-to-solve", "test-time-depth"} <= set(archbench.EVALUATORS.names())
    # Outside the checkout, the installed package must not leak generic top-level names.
    code = ("import importlib.util as u, archbench.blocks, archbench.tasks, archbench.evaluators;"
            "print([n for n in ('blocks', 'tasks', 'evaluators') if u.find_spec(n)])")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_register_get_and_wildcards():
    reg = Registry("block", "archbench.blocks")

    @reg.register("alpha-one", family="f", citation="c")
    class A(torch.nn.Module):
        """First line of the docstring.

        More detail that is not the description."""

    reg.register("alpha-two", description="explicit")(A)
    reg.register("beta")(A)
    assert reg.get("alpha-one").description == "First line of the docstring."
    assert reg.get("alpha-two").description == "explicit"
    assert reg.names("alpha-*") == ["alpha-one", "alpha-two"]
    assert reg.names("*ta") == ["beta"]
    assert reg.get("alpha-one").family == "f"


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UsageError, match="did you mean 'residual-mlp'") as e:
        BLOCKS.get("residual_mlp")
    assert e.value.exit_code == 2 and "\n" not in str(e.value)


def test_knobs_from_signature_are_typed():
    knobs = BLOCKS.get("residual").knobs
    assert knobs["heads"].type is int and knobs["heads"].default == 4
    assert knobs["heads"].range.low == 1
    assert knobs["norm"].choices == ("rmsnorm", "layernorm")
    assert knobs["heads"].parse("8", "block") == 8
    assert knobs["zero_init"].parse("false", "block") is False
    with pytest.raises(UsageError, match="did you mean 'layernorm'"):
        knobs["norm"].parse("layernrom", "block")
    with pytest.raises(UsageError, match="block.heads='2.5' is not a valid int"):
        knobs["heads"].parse("2.5", "block")


def test_comma_values_are_sweeps_except_for_list_knobs():
    from archbench.knobs import resolve

    k = TASKS.get("k-hop").knobs
    assert k["k"].grid("1,2,4", "task") == [1, 2, 4] and k["k"].grid("2", "task") is None
    assert k["encoding"].grid("pair,tokens", "task") == ["pair", "tokens"]
    with pytest.raises(UsageError, match="task.k='x' is not a valid int"):
        k["k"].grid("1,x", "task")
    grid = {}
    assert resolve(TASKS.get("k-hop").obj, "task", {"k": "1,2", "pairs": "6"}, grid)["k"] == 1
    assert grid == {"task.k": [1, 2]}
    with pytest.raises(UsageError, match="one value expected here"):
        resolve(TASKS.get("k-hop").obj, "task", {"k": "1,2"})
    # a list knob reads the commas as its value
    r = archbench.EVALUATORS.get("test-time-depth").knobs["recurrence"]
    assert r.item_type is int and r.parse("1, 2,8", "test-time-depth") == (1, 2, 8) and r.grid("1,2", "x") is None
    assert r.describe_type() == "int,..."


def test_cli_list_filters_and_describes(main):
    r = main("list", "blocks", "residual*")
    assert r.returncode == 0, r.stderr
    assert "residual-mlp" in r.stdout and "Attention-free" in r.stdout
    r = main("list", "tasks", "teacher*")
    assert "teacher-student" in r.stdout and "lm-char" not in r.stdout
    r = main("list", "blocks", "-v", "recurrent-depth", "hrm")  # names after the flag, knobs, citations
    assert r.returncode == 0, r.stderr
    rows = [line.split()[0] for line in r.stdout.splitlines()[1:] if line[:1].strip()]
    assert rows == ["recurrent-depth", "hrm"]
    assert "k_bptt: int|None = None [1, 16]" in r.stdout and "Geiping et al. 2025" in r.stdout
    assert main("list", "blocks", "-v", "--bogus").returncode == 2


def test_cli_unknown_names_exit_2_with_one_line(main):
    r = main("list", "blokcs")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "did you mean 'blocks'" in r.stderr
    r = main("eval", "--block", "residul", "--preset", "smoke")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "'residual'" in r.stderr and "Traceback" not in r.stderr
    r = main("eval", "--task", "teacher-student", "--preset", "smok")
    assert r.returncode == 2 and "did you mean 'smoke'" in r.stderr
    r = main("eval", "--preset", "smoke", "--set", "train.stesp=10")
    assert r.returncode == 2 and "train.steps" in r.stderr


def test_entry_point_plugins_are_discovered(tmp_path, monkeypatch):
    """A real installed distribution (a .dist-info on the path) that declares an archbench.blocks entry point."""
    (tmp_path / "ep_block_pkg.py").write_text(textwrap.dedent('''
        import torch

        class Doubler(torch.nn.Module):
            """Entry-point block that adds its input to itself."""
            def __init__(self, dim, layer_idx, depth, **kw):
                super().__init__()
            def forward(self, x):
                return x + x
    '''))
    dist = tmp_path / "ep_block_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-block-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[archbench.blocks]\ndoubler = ep_block_pkg:Doubler\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    blocks = Registry("block", "archbench.blocks")  # as a fresh `archbench` process builds it
    assert blocks.names("doub*") == ["doubler"]
    entry = blocks.get("doubler")
    assert entry.description == "Entry-point block that adds its input to itself." and entry.version == 1
    x = torch.ones(2, 3)
    assert torch.equal(entry.obj(3, 0, 1)(x), 2 * x)
    del sys.modules["ep_block_pkg"]


def test_a_name_cannot_be_taken_twice():
    from archbench.errors import ArchbenchError

    reg = Registry("block", "archbench.blocks")

    class A(torch.nn.Module):
        pass

    class B(torch.nn.Module):
        pass

    reg.register("x")(A)
    reg.register("x")(A)  # the same object again (a plugin file loaded twice) is fine
    with pytest.raises(ArchbenchError, match="block 'x' is already registered by .*A; choose another name"):
        reg.register("x")(B)
