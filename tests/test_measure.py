"""The measurement suite on known values and invariants: angles, CKA, update statistics, skips,
layer correspondence and the regime rule."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from archbench.evaluators.layer_correspondence import LayerCorrespondence
from archbench.evaluators.layer_similarity import LayerSimilarity
from archbench.evaluators.regime import Regime
from archbench.evaluators.skip_sensitivity import SkipSensitivity
from archbench.measure import CKA, angle, linear_cka
from archbench.model import InputSpec, Readout, StreamModel, Tap, build_model, run, trace
from archbench.registry import BLOCKS


class Const(nn.Module):
    """A layer that adds fixed attention and MLP contributions: h + a + m."""

    def __init__(self, a, m):
        super().__init__()
        self.register_buffer("a", torch.tensor(a, dtype=torch.float32))
        self.register_buffer("m", torch.tensor(m, dtype=torch.float32))
        self.attn_out, self.mlp_out = Tap(), Tap()

    def forward(self, h):
        a = self.attn_out(self.a.expand_as(h))
        return h + a + self.mlp_out(self.m.expand_as(h))


class Given(nn.Module):
    """Embed: the input vectors are h_0 themselves."""

    def forward(self, x):
        return x.unsqueeze(1)


class StubTask:
    """Vector inputs handed over as they are, one eval batch, loss = mean squared logit."""

    def __init__(self, x, dim_out=3):
        self.x = x
        self.input = InputSpec("vector", x.shape[-1], dim_out)

    def eval_batches(self, batch_size):
        return [(self.x, torch.zeros(len(self.x)))]

    def loss(self, logits, y):
        return logits.float().square().mean()


class TokenTask:
    """Random token sequences for a model built by build_model."""

    def __init__(self, vocab=11, seq_len=8, n=16):
        self.input = InputSpec("tokens", vocab, vocab, seq_len)
        g = torch.Generator().manual_seed(3)
        self.x = torch.randint(0, vocab, (n, seq_len), generator=g)
        self.y = torch.randint(0, vocab, (n, seq_len), generator=g)

    def eval_batches(self, batch_size):
        return list(zip(self.x.split(batch_size), self.y.split(batch_size)))

    def loss(self, logits, y):
        return nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())


def const_model(updates):
    torch.manual_seed(0)
    layers = [Const(a, m) for a, m in updates]
    return StreamModel(Given(), layers, Readout(len(updates[0][0]), 3, zero_init=False)).eval()


def random_model(name="residual", depth=4, task=None, seed=0, **kw):
    torch.manual_seed(seed)
    model = build_model(BLOCKS.get(name).obj, kw, depth, (task or TokenTask()).input, 16, zero_head=False)
    with torch.no_grad():  # zero-initialised projections would make every layer the identity
        for p in model.parameters():
            if p.dim() == 2 and not p.any():
                p.normal_(0, 0.2)
    return model.eval()


def test_angles_of_known_vectors():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 2.0], [1.0, 1.0], [-3.0, 0.0], [1.0, 0.0]])
    assert torch.allclose(angle(a, b), torch.tensor([math.pi / 2, math.pi / 4, math.pi, math.pi / 2]))


def test_cka_known_values_and_invariances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 12, generator=g, dtype=torch.float64)
    y = x @ torch.randn(12, 12, generator=g, dtype=torch.float64) + 0.5 * torch.randn(500, 12, generator=g,
                                                                                        dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    base = linear_cka(x, y)
    assert 0.1 < base < 0.99
    assert linear_cka(x @ q, y) == pytest.approx(base, abs=1e-10)  # orthogonal transform
    assert linear_cka(3.7 * x, y) == pytest.approx(base, abs=1e-10)  # isotropic scaling
    assert linear_cka(x + 5.0, y) == pytest.approx(base, abs=1e-10)  # centring removes offsets
    layers = torch.stack([x, y, x @ q * 2.0])
    exact = CKA("exact")
    for part in layers.split(128, dim=1):  # streamed in four batches
        exact.add(part)
    m = exact.matrix()
    assert np.allclose(np.diag(m), 1.0)
    assert m[0, 1] == pytest.approx(base, abs=1e-10) and m[0, 2] == pytest.approx(1.0, abs=1e-10)
    mini = CKA("minibatch", n=100)
    mini.add(layers)
    mm = mini.matrix()
    assert np.allclose(np.diag(mm), 1.0) and mm[0, 2] == pytest.approx(1.0, abs=1e-10)
    assert mm[0, 1] == pytest.approx(base, abs=0.05)  # unbiased estimator, close to the full-data value


def test_update_statistics_of_a_hand_built_stream():
    # h0 = (1, 0); layer 0 adds a = (0, 0.5), m = (0, 0.5) -> h1 = (1, 1); layer 1 adds (-1, 0) -> h2 = (0, 1)
    model = const_model([([0.0, 0.5], [0.0, 0.5]), ([-0.5, 0.0], [-0.5, 0.0])])
    task = StubTask(torch.tensor([[1.0, 0.0]] * 4))
    r = LayerSimilarity(lens_tokens=4).evaluate_model(model, task)
    pl, ps = r["per_layer"], r["per_state"]
    assert pl["theta"] == pytest.approx([math.pi / 4, math.pi / 4])
    assert pl["phi"] == pytest.approx([math.pi / 2])
    assert ps["norm"] == pytest.approx([1, math.sqrt(2), 1])
    assert ps["angle_to_final"] == pytest.approx([math.pi / 2, math.pi / 4, 0], abs=1e-6)
    assert ps["chord_progress"] == pytest.approx([0, 0.5, 1])
    assert pl["rel_contribution"] == pytest.approx([1.0, 1 / math.sqrt(2)])
    assert pl["cos_contribution"] == pytest.approx([0.0, -1 / math.sqrt(2)])
    assert pl["attn_rel"] == pytest.approx([0.5, 0.5 / math.sqrt(2)])
    # m is added to h + a: (1, 0.5) then (0.5, 1)
    assert pl["mlp_rel"] == pytest.approx([0.5 / math.sqrt(1.25), 0.5 / math.sqrt(1.25)])
    assert pl["block_influence"] == pytest.approx([1 - math.cos(math.pi / 4)] * 2)
    d = np.array(r["angular_distance"])
    assert d[0, 2] == pytest.approx(0.5) and d[0, 1] == pytest.approx(0.25) and np.allclose(d, d.T)
    assert r["prunable"] == [{"n": 1, "start": 0, "distance": pytest.approx(0.25)}]  # a tie: the first start
    # one position per sequence here: Gromov's last-token distances are the same numbers
    assert np.allclose(r["angular_distance_last"], d) and r["prunable_last"] == r["prunable"]
    assert ps["lens_kl"][-1] == pytest.approx(0, abs=1e-9) and ps["lens_top5"][-1] == 1.0
    assert len(pl["last_block_loss"]) == 2


def test_token_classes_follow_the_documented_rule():
    # depth 6; token 0 moves evenly in the middle, token 1 stops moving after the third layer
    ev = LayerSimilarity()
    even = torch.tensor([1.0, 0.2, 0.2, 0.2, 0.2, 0.9], dtype=torch.float64)
    early = torch.tensor([1.0, 0.5, 0.3, 0.01, 0.0, 0.0], dtype=torch.float64)
    from archbench.measure import Sums

    counts = ev._classify(torch.stack([even, early], 1), Sums())
    assert counts.tolist() == [1, 1, 0]


def test_skipping_an_identity_layer_changes_nothing_and_local_equals_full_at_the_last_layer():
    task = TokenTask()
    model = random_model(task=task, depth=4)
    with torch.no_grad():  # layer 1 writes nothing: x + 0
        model.layers[1].branch.attn.proj.weight.zero_()
        model.layers[1].branch.mlp.fc2.weight.zero_()
    r = SkipSensitivity().evaluate_model(model, task)
    full, local, attn, mlp = (r["variants"][k] for k in ("layer", "local", "attn", "mlp"))
    assert full["output_l2"][1] == pytest.approx(0, abs=1e-6) and full["loss_increase"][1] == pytest.approx(0, abs=1e-6)
    assert np.allclose(np.array(full["later_mean"][1][2:], float), 0, atol=1e-5)
    assert attn["output_l2"][1] == pytest.approx(0, abs=1e-6) and mlp["output_l2"][1] == pytest.approx(0, abs=1e-6)
    assert full["output_l2"][0] > 1e-3 and full["top1_flip"][0] > 0  # a real layer matters
    for name in ("output_l2", "output_kl", "top1_flip", "loss_increase"):
        assert local[name][-1] == pytest.approx(full[name][-1], abs=1e-6)
    assert local["output_l2"][0] != pytest.approx(full["output_l2"][0], abs=1e-6)  # propagation matters earlier
    e = r["skip_effect"]
    assert r["skip_centre"] == pytest.approx(sum(s * v for s, v in enumerate(e)) / sum(e))
    # the future variant measures from t on only, so the last position's layer still counts
    assert r["variants"]["future"]["t"] == 4 and r["variants"]["future"]["output_l2"][0] > 0


def test_the_first_token_is_never_skipped():
    task = TokenTask()
    model = random_model(task=task, depth=3)
    seen = []
    from archbench import model as model_module

    real_run = model_module.run

    def spy(m, x, on_layer=None, on_sublayer=None, **resume):
        def wrapped(l, h_in, h_out):
            h = on_layer(l, h_in, h_out)
            seen.append(torch.equal(h[:, 0], h_out[:, 0]))
            return h
        return real_run(m, x, wrapped if on_layer else None, on_sublayer, **resume)

    import archbench.evaluators.skip_sensitivity as sk

    sk.run, orig = spy, sk.run
    try:
        SkipSensitivity(sublayers=False, local=False).evaluate_model(model, task)
    finally:
        sk.run = orig
    assert seen and all(seen)


@pytest.mark.parametrize("name", ["residual", "denseformer", "recurrent-depth"])
def test_resuming_from_a_traced_state_gives_the_full_forward(name):
    """run(start=s, h_start=h_s) runs only the later layers where the model can (a plain stack) and
    patches h_s into a full forward where it cannot (a Stack with state beyond the stream)."""
    task = TokenTask()
    model = random_model(name, depth=6, task=task)
    x = task.x[:4]
    t = trace(model, x)
    calls = []
    for s in (1, 3, model.effective_depth - 1):
        logits = run(model, x, lambda l, h_in, h_out: calls.append(l) or h_out, start=s, h_start=t.states[s])
        assert torch.allclose(logits, t.logits, atol=1e-5)
        assert calls == list(range(s, model.effective_depth))
        calls.clear()


def test_layer_correspondence_finds_inserted_identity_layers():
    task = TokenTask(n=64)
    shallow = random_model(task=task, depth=3, seed=1)
    deep = random_model(task=task, depth=6, seed=2)
    with torch.no_grad():  # deep = each shallow layer followed by an identity layer
        deep.embed.load_state_dict(shallow.embed.state_dict())
        for i in range(3):
            deep.layers[2 * i].load_state_dict(shallow.layers[i].state_dict())
            deep.layers[2 * i + 1].branch.attn.proj.weight.zero_()
            deep.layers[2 * i + 1].branch.mlp.fc2.weight.zero_()
    ev = LayerCorrespondence(ridge=1e-9)  # the default ridge (1e-4) shrinks the exact maps by ~1e-3
    r = ev.compare(shallow, deep, task)
    err = np.array(r["relative_error"])
    assert err.shape == (4, 7)
    for i in range(1, 4):
        assert err[i, 2 * i] < 1e-3 and err[i, 2 * i - 1] < 1e-3
        assert r["best_target"][i] in (2 * i - 1, 2 * i)
    assert r["relative_depth_deviation"] <= 1 / 6 + 1e-9
    self_map = ev.compare(shallow, shallow, task)
    assert self_map["best_target"] == [0, 1, 2, 3] and self_map["relative_depth_deviation"] == 0


@pytest.mark.parametrize("evidence, regime", [
    ({"alpha": 1.05, "phi_mid": 1.5, "skip_effect_mean": 0.1}, "ensemble-averaging"),
    ({"alpha": 2.8, "phi_mid": 0.3, "skip_effect_mean": 0.1}, "procedural"),
    ({"alpha": 2.2, "phi_mid": 1.4, "skip_effect_mean": 0.9}, "compositional"),
    ({"alpha": None, "phi_mid": 1.4, "skip_effect_mean": 0.9}, "compositional"),
    ({"alpha": 1.0, "phi_mid": 0.3, "skip_effect_mean": 0.1}, "undetermined"),  # smooth updates, yet α ≈ 1
    ({"alpha": 2.5, "phi_mid": 1.5, "skip_effect_mean": 0.1}, "undetermined"),  # steep, but nothing breaks
    ({"alpha": 1.0, "phi_mid": None, "skip_effect_mean": None}, "undetermined"),
])
def test_regime_rule(evidence, regime):
    call, reasons = Regime().call(evidence)
    assert call == regime and reasons


@pytest.mark.parametrize("name", BLOCKS.names())
def test_every_block_is_measurable(name):
    """layer-similarity and skip-sensitivity run on every registered block through the protocol."""
    task = TokenTask(n=4)
    depth = 4
    entry = BLOCKS.get(name)
    check = getattr(entry.obj, "check_depth", None)
    try:
        if check:
            check(depth, {k.name: k.default for k in __import__("archbench").knobs.knobs_of(entry.obj).values()})
    except Exception:
        depth = 6
    model = random_model(name, depth=depth, task=task)
    L = model.effective_depth
    sim = LayerSimilarity(lens_tokens=8).evaluate_model(model, task)
    skip = SkipSensitivity(max_tokens=16).evaluate_model(model, task)
    assert len(sim["per_layer"]["theta"]) == L and len(sim["cka"]) == L + 1
    assert len(skip["variants"]["layer"]["output_l2"]) == L
    assert np.isfinite(sim["per_layer"]["theta"]).all() and np.isfinite(skip["variants"]["layer"]["output_l2"]).all()
    json.dumps(sim), json.dumps(skip)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_evaluators_run_on_cuda(dtype):
    task = TokenTask()
    task.x, task.y = task.x.cuda(), task.y.cuda()
    model = random_model("residual", depth=4, task=task).cuda().to(dtype)
    sim = LayerSimilarity(lens_tokens=32).evaluate_model(model, task)
    skip = SkipSensitivity().evaluate_model(model, task)
    cpu = LayerSimilarity(lens_tokens=32).evaluate_model(model.cpu().float(), TokenTask())
    assert np.allclose(sim["per_layer"]["theta"], cpu["per_layer"]["theta"], rtol=0.05 if dtype == torch.bfloat16 else 1e-4)
    assert np.isfinite(skip["variants"]["layer"]["output_l2"]).all()


def test_eval_runs_the_measurement_suite_end_to_end(main, tmp_path):
    base = ["eval", "--preset", "smoke", "--depths", "2,4", "--set", "train.steps=60", "--runs-dir", tmp_path / "runs"]
    out = tmp_path / "r.json"
    r = main(*base, "--evaluators", "regime,layer-correspondence", "--out", out)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert list(res["config"]["evaluators"]) == ["layer-similarity", "skip-sensitivity", "regime", "layer-correspondence"]
    reg = res["metrics"]["regime"]
    assert reg["regime"] in ("compositional", "procedural", "ensemble-averaging", "undetermined") and reg["reasons"]
    assert reg["evidence"]["evidence_depth"] == 4 and reg["evidence"]["alpha"] is not None
    assert f"regime: {reg['regime']}" in r.stdout
    pair = res["metrics"]["layer-correspondence"]["pairs"][0]
    assert (pair["shallow"], pair["deep"]) == (2, 4) and len(pair["relative_error"]) == 3
    plots = res["files"]["plots"]
    assert len(plots) == 4 and all(Path(p).stat().st_size > 10_000 for p in plots)
    # a cached run is re-measured only when the evaluator's knobs change
    r = main(*base, "--evaluators", "layer-similarity", "--set", "layer-similarity.max_tokens=64", "--out", out)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert all(run["cached"] for run in res["runs"])
    assert [v["tokens"] for v in res["metrics"]["layer-similarity"]["per_run"].values()] == [64, 64]
    r = main(*base, "--evaluators", "regime", "--set", "regime.alpha_band=lots")
    assert r.returncode == 2 and "alpha_band" in r.stderr and "Traceback" not in r.stderr


def test_token_batches_count_positions_not_examples():
    from archbench.measure import token_batches

    batches = token_batches(TokenTask(seq_len=8, n=16), max_tokens=100, batch_size=32)
    assert [x.shape for x, _ in batches] == [(4, 8), (4, 8), (4, 8)]  # 32-token batches, 96 ≤ 100 tokens
    vectors = token_batches(StubTask(torch.ones(10, 2)), max_tokens=7, batch_size=64)
    assert sum(len(x) for x, _ in vectors) == 7


def test_angular_distance_per_token():
    """arccos(cos)/π per token: the first token keeps its direction, the second turns by 90° (1/2)."""
    from archbench.evaluators.layer_similarity import angular_distances

    states = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[2.0, 0.0], [0.0, 3.0]]])  # (L+1, tokens, D)
    d = angular_distances(states)
    assert d.shape == (2, 2, 2) and d[0, 1].tolist() == pytest.approx([0.0, 0.5], abs=1e-6)


def test_depth_score_as_paper_2_computes_it():
    from archbench.evaluators.skip_sensitivity import depth_score, future_max

    # e_0 = (1 + 1) / 2 later layers, e_1 = 0.5 / 1: the score is (0·1 + 1·0.5) / 1.5
    m = torch.zeros(3, 3, 1, dtype=torch.float64)
    m[0, 1, 0] = m[0, 2, 0] = 1.0
    m[1, 2, 0] = 0.5
    r = depth_score([(m, torch.zeros(3, 1, dtype=torch.float64))])
    assert r["value"] == pytest.approx(1 / 3) and r["relative"] == pytest.approx(1 / 6) and r["prompts"] == 1
    # on a causal model: skipping a layer that adds nothing changes nothing; skipping another before
    # the cut reaches later layers at positions after it only through attention
    torch.manual_seed(0)
    model = build_model(BLOCKS.get("residual").obj, {}, 3, InputSpec("tokens", size=11, out_dim=11, seq_len=24), 16)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
        for p in model.effective_layers()[1].parameters():
            p.zero_()
    x = torch.randint(0, 11, (2, 24))
    later, output = future_max(model, x, trace(model, x), [[8, 16], [8, 16]])
    assert later.shape == (3, 3, 2) and output.shape == (3, 2)
    assert torch.all(later[1] == 0) and torch.all(output[1] == 0)
    assert torch.all(torch.triu(later.permute(2, 0, 1), diagonal=1).permute(1, 2, 0) == later)  # only j > s
    assert torch.all(later[0, 2] > 0) and torch.all(output[0] > 0)


def test_depth_score_cuts_are_drawn_per_prompt_as_the_authors_draw_them():
    import random

    from archbench.evaluators.skip_sensitivity import draw_cuts, future_max

    # the authors' draw on 64-token windows: random.seed(123) once, then one shuffle of {8, …, 56} per prompt
    rng = random.Random(123)
    assert [draw_cuts(rng, 64, 4) for _ in range(3)] == [[48, 40, 16, 32], [40, 48, 16, 24], [48, 8, 32, 40]]
    assert draw_cuts(random.Random(0), 12, 4) == []  # no cut fits before T − 4
    # prompts with different cuts in one batch get exactly what each gets alone
    torch.manual_seed(0)
    model = build_model(BLOCKS.get("residual").obj, {}, 3, InputSpec("tokens", size=11, out_dim=11, seq_len=24), 16)
    x = torch.randint(0, 11, (2, 24))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
        later, output = future_max(model, x, trace(model, x), [[8], [16, 8]])
        for b, cuts in enumerate([[8], [16, 8]]):
            alone = future_max(model, x[b:b + 1], trace(model, x[b:b + 1]), [cuts])
            assert torch.allclose(later[..., b:b + 1], alone[0], rtol=1e-5, atol=1e-7)
            assert torch.allclose(output[:, b:b + 1], alone[1], rtol=1e-5, atol=1e-7)
        only_8 = future_max(model, x, trace(model, x), [[8], [8]])
    assert not torch.equal(later[..., 1], only_8[0][..., 1])  # prompt 1's cut at 16 counts
    assert torch.equal(later[..., 0], only_8[0][..., 0])
