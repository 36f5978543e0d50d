"""Every registered block goes through the residual-stream protocol the day it is registered."""

import warnings

import pytest
import torch

from archbench.model import InputSpec, build_model, check_stream_shapes, trace
from archbench.registry import BLOCKS

WIDTH = 16
SPECS = {"tokens": InputSpec("tokens", size=11, out_dim=11, seq_len=5), "vector": InputSpec("vector", size=8, out_dim=7)}


def make(name, depth=3, spec="tokens", **kw):
    torch.manual_seed(0)
    return build_model(BLOCKS.get(name).obj, kw, depth, SPECS[spec], WIDTH, block_name=name)


def inputs(spec="tokens", batch=4):
    g = torch.Generator().manual_seed(1)
    s = SPECS[spec]
    if s.kind == "tokens":
        return torch.randint(0, s.size, (batch, s.seq_len), generator=g)
    return torch.randn(batch, s.size, generator=g)


def randomize(module, std=0.2):
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("name", BLOCKS.names())
@pytest.mark.parametrize("spec", ["tokens", "vector"])
def test_stream_shape_and_trace(name, spec):
    model = make(name, spec=spec)
    x = inputs(spec)
    check_stream_shapes(model, x, name)
    t = trace(model, x)
    seq = SPECS[spec].seq_len
    assert len(t.states) == model.effective_depth + 1
    assert all(h.shape == (4, seq, WIDTH) for h in t.states)
    assert t.logits.shape == (4, seq, SPECS[spec].out_dim)
    assert torch.allclose(t.logits, model.readout(t.states[-1]))
    assert len(t.sublayers) == model.effective_depth


@pytest.mark.parametrize("name", BLOCKS.names())
def test_gradients_reach_every_parameter(name):
    model = make(name)
    randomize(model)  # zero-initialised projections would block gradients at init by design
    model(inputs()).square().mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not dead, f"no gradient reaches {dead}"


@pytest.mark.parametrize("name", BLOCKS.names())
def test_skipping(name):
    entry = BLOCKS.get(name)
    model = make(name, depth=3)
    x = inputs()
    if entry.extra.get("identity_init"):
        layer = model.effective_layers()[1]
        h = torch.randn(4, 5, WIDTH)
        assert torch.equal(layer(h), h), "block registered identity_init=True is not the identity at init"
    # Randomise everything but layer 1: skipping it (identity at init) must change nothing,
    # while skipping a randomised layer must change the output.
    keep = {k: v.clone() for k, v in model.effective_layers()[1].state_dict().items()}
    randomize(model)
    if entry.extra.get("identity_init"):
        model.effective_layers()[1].load_state_dict(keep)
        base = trace(model, x).logits
        assert torch.allclose(trace(model, x, skip=[1]).logits, base, atol=1e-6)
    base = trace(model, x).logits
    assert not torch.allclose(trace(model, x, skip=[0]).logits, base, atol=1e-4)


def test_skip_passes_state_through():
    model = make("residual-mlp", depth=4)
    randomize(model)
    t = trace(model, inputs(), skip=[2])
    assert torch.equal(t.states[3], t.states[2])
    assert not torch.equal(t.states[2], t.states[1])


def test_sublayer_taps_of_the_transformer_block():
    model = make("residual", depth=2)
    randomize(model)
    x = inputs()
    t = trace(model, x)
    a, m = t.sublayers[0]["attn_out"], t.sublayers[0]["mlp_out"]
    assert torch.allclose(t.states[1], t.states[0] + a + m, atol=1e-5)  # h_{l+1} = h_l + a_l + m_l


def test_causal_attention_does_not_see_the_future():
    model = make("residual", depth=2)
    randomize(model)
    x = inputs()
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % SPECS["tokens"].size
    assert torch.allclose(model(x)[:, :-1], model(y)[:, :-1], atol=1e-6)
    assert not torch.allclose(model(x)[:, -1], model(y)[:, -1])


def test_wrong_shape_block_gets_one_clear_line():
    from archbench.errors import ArchbenchError

    class Bad(torch.nn.Module):
        def __init__(self, dim, layer_idx, depth, **kw):
            super().__init__()
            self.lin = torch.nn.Linear(dim, 2 * dim)

        def forward(self, x):
            return self.lin(x)

    model = build_model(Bad, {}, 2, SPECS["tokens"], WIDTH, block_name="bad")
    with pytest.raises(ArchbenchError, match=r"block 'bad' \(layer 0\) returned shape \(4, 5, 32\), expected \(4, 5, 16\)"):
        check_stream_shapes(model, inputs(), "bad")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_xformers_backend_matches_sdpa_on_cuda():
    pytest.importorskip("xformers.ops")
    model = make("residual", depth=2).cuda()
    randomize(model)
    x = inputs().cuda()
    ref = model(x)
    for layer in model.layers:
        layer.branch.attn.backend = "xformers"
    assert torch.allclose(model(x), ref, atol=1e-4)


def test_xformers_backend_falls_back_to_sdpa_off_cuda():
    model = make("residual", depth=2)
    randomize(model)
    x = inputs()
    ref = model(x)
    for layer in model.layers:
        layer.branch.attn.backend = "xformers"
    with pytest.warns(UserWarning, match="xformers attention runs on CUDA only"):
        import archbench.nn as ann

        ann._warned_xformers = False
        out = model(x)
    assert torch.allclose(out, ref)


@pytest.mark.parametrize("name", BLOCKS.names())
@pytest.mark.parametrize("task", ["teacher-student", "lm-char"])
def test_every_block_trains_on_every_builtin_task(name, task, tmp_path):
    from archbench.config import EvalSpec
    from archbench.sweep import run_eval

    spec = EvalSpec(block=name, task=task, preset="smoke", depths=[3, 4], device="cpu", runs_dir=str(tmp_path),
                    sets={"train": {"steps": "8", "log_every": "4"}, "model": {"width": "16"}})
    res = run_eval(spec)
    assert [r["status"] for r in res["runs"]] == ["ok", "ok"]
    assert all(0 < r["final_loss"] < 10 for r in res["runs"])


@pytest.mark.parametrize("name", BLOCKS.names())
def test_every_block_runs_under_bf16_autocast(name):
    """The CUDA training path autocasts to bf16; CPU autocast exercises the same dtype handling."""
    model = make(name)
    randomize(model)
    x = inputs()
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
        warnings.filterwarnings("error", "Mismatch dtype")  # a norm read a bf16 copy of an fp32 stream
        out = model(x)
    out.float().square().mean().backward()
    assert torch.isfinite(out).all() and (out.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.05
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the residual stream is carried in fp32, as in a plain stack
        assert {s.dtype for s in trace(model, x).states} == {torch.float32}
