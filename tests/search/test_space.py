"""The search space: the default conditional space, space files, and the example file in docs/search.md."""

import re
from pathlib import Path

import optuna
import pytest

from archbench.errors import UsageError
from archbench.registry import BLOCKS
from archbench.search import build_space, sample


def test_default_space_is_conditional_and_skips_pinned_knobs():
    space = build_space("teacher-student", "quick", {"block": {"mlp_ratio": "2"}}, None)
    assert set(space.blocks) == set(BLOCKS.names())
    # the quick preset pins attention/act on vectors and --set pins mlp_ratio: none of them is searched
    assert all(k not in space.params["residual"] for k in ("attention", "act", "mlp_ratio"))
    assert space.params["looped"]["loop_layers"].high == 4  # from the block's declared Range
    assert "norm" in space.params["residual"] and "attn_backend" not in space.params["residual"]  # NOT_SEARCHED
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        block, sets = sample(trial, space)
        seen.add(block)
        assert set(trial.params) == {"block"} | {f"{block}.{k}" for k in space.params[block]}
        assert set(sets["block"]) == set(space.params[block])
        study.tell(trial, 0.0)
    assert len(seen) >= 8  # families really vary


def test_space_file_narrows_pins_and_adds(tmp_path):
    f = tmp_path / "space.toml"
    f.write_text('blocks = ["residual-mlp", "looped"]\n[params]\n"looped.loop_layers" = {low = 1, high = 2}\n'
                 '"residual-mlp.mlp_ratio" = 2\n"train.lr" = {low = 1e-3, high = 1e-2, log = true}\n')
    space = build_space("teacher-student", "quick", {}, str(f))
    assert space.blocks == ["residual-mlp", "looped"]
    assert space.params["looped"]["loop_layers"].high == 2 and space.pinned["residual-mlp"] == {"mlp_ratio": 2}
    assert "mlp_ratio" not in space.params["residual-mlp"] and space.params["*"]["train.lr"].log
    study = optuna.create_study()
    study.enqueue_trial({"block": "residual-mlp"})
    block, sets = sample(study.ask(), space)
    assert sets["block"]["mlp_ratio"] == 2 and 1e-3 <= sets["train"]["lr"] <= 1e-2

    f.write_text('[params]\n"looped.loop_layer" = {low = 1, high = 2}\n')
    with pytest.raises(UsageError, match="looped.loop_layers"):  # a typo gets the close name
        build_space("teacher-student", "quick", {}, str(f))
    f.write_text('blocks = ["residul"]\n')
    with pytest.raises(UsageError, match="residual"):
        build_space("teacher-student", "quick", {}, str(f))
    f.write_text('[params]\n"looped.loop_layers" = {lo = 1}\n')
    with pytest.raises(UsageError, match="expected"):
        build_space("teacher-student", "quick", {}, str(f))


def test_docs_space_file_is_valid(tmp_path):
    doc = (Path(__file__).resolve().parents[2] / "docs" / "search.md").read_text()
    block = re.search(r"```toml\n# space.toml[^\n]*\n(.*?)```", doc, re.S).group(1)
    (tmp_path / "space.toml").write_text(block)
    space = build_space("teacher-student", "quick", {}, str(tmp_path / "space.toml"))
    assert space.blocks == ["residual", "rezero", "looped", "recurrent-depth"]
    assert space.pinned["residual"] == {"mlp_ratio": 4} and space.params["*"]["train.lr"].log


def test_blocks_that_cannot_be_built_at_the_studys_depths_are_left_out_with_the_reason():
    from archbench.search.space import only_buildable

    space = build_space("teacher-student", "smoke", {}, None)
    kept, left_out = only_buildable(space, "teacher-student", "smoke", [2, 4], {})
    assert {"recurrent-depth", "hourglass"} <= set(left_out) and "residual" in kept.blocks
    assert "recurrent-depth" not in kept.params and "depth" in left_out["recurrent-depth"]
    assert set(kept.blocks) | set(left_out) == set(space.blocks)
    assert "recurrent-depth" in only_buildable(space, "teacher-student", "smoke", [3, 6], {})[0].blocks
    with pytest.raises(UsageError, match="no block"):
        only_buildable(build_space("teacher-student", "smoke", {}, None), "teacher-student", "smoke", [1], {
            "block": {"no_such_knob": "1"}})
