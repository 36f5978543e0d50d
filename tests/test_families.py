"""Invariants of the stack-level families: dense, multi-stream, value residual, recurrent, hierarchical."""

import pytest
import torch

from archbench.blocks.hyper_connections import sinkhorn
from archbench.errors import UsageError
from archbench.model import InputSpec, build_model, trace
from archbench.registry import BLOCKS

WIDTH = 16
TOKENS = InputSpec("tokens", size=11, out_dim=11, seq_len=7)


def make(name, depth=4, **kw):
    torch.manual_seed(0)
    return build_model(BLOCKS.get(name).obj, kw, depth, TOKENS, WIDTH, block_name=name)


def tokens(batch=3, seq=7):
    return torch.randint(0, 11, (batch, seq), generator=torch.Generator().manual_seed(1))


def randomize(module, std=0.2, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def plain_twin(model, depth):
    """A `residual` stack with ``model``'s embedding, readout and per-layer branch weights."""
    ref = make("residual", depth)
    ref.embed.load_state_dict(model.embed.state_dict())
    ref.readout.load_state_dict(model.readout.state_dict())
    for mine, theirs in zip(ref.layers, model.effective_layers()):
        mine.branch.load_state_dict(theirs.branch.state_dict())
    return ref


@pytest.mark.parametrize("name, kw", [("hyper-connections", {"dynamic": False}), ("hyper-connections", {}),
                                      ("mhc", {}), ("denseformer", {}), ("denseformer", {"dilation": 2}),
                                      ("unet-skips", {"unet": False})])
def test_at_init_the_same_function_as_the_plain_prenorm_stack(name, kw):
    model = make(name, depth=5, **kw)
    for layer in model.effective_layers():  # random branches, connections left at their init
        randomize(layer.branch, seed=len(layer.branch.state_dict()))
    randomize(model.embed)
    randomize(model.readout)
    ref = plain_twin(model, 5)
    x = tokens()
    mine, theirs = trace(model, x), trace(ref, x)
    assert torch.allclose(mine.logits, theirs.logits, atol=1e-5)
    for a, b in zip(mine.states, theirs.states):
        assert torch.allclose(a, b, atol=1e-5)
    randomize(model)  # and the connections do change the function once they move
    assert not torch.allclose(model(x), plain_twin(model, 5)(x), atol=1e-3)


def test_unet_skips_pair_the_halves_mirrored_and_reinject_the_embedding():
    model = make("unet-skips", depth=5)
    randomize(model)
    stack, h0 = model.body, model.embed(tokens())
    lam, w, blocks = stack.lambdas, stack.skip_weights, stack.layers
    h, out = h0, []
    for i in range(5):  # blocks 0, 1 push; 4 adds block 0's output, 3 adds block 1's; 2 is unpaired
        x = lam[i, 0] * h + lam[i, 1] * h0
        if i >= 3:
            x = x + w[4 - i] * out[4 - i]
        h = blocks[i](x)
        out.append(h)
    assert stack.pairs == 2 and torch.allclose(stack(h0), h, atol=1e-5)
    with torch.no_grad():  # λ = (0, 1) everywhere and no skips: the last block reads the embedding alone
        lam.copy_(torch.tensor([[0.0, 1.0]] * 5))
        w.zero_()
    assert torch.allclose(stack(h0), blocks[4](h0), atol=1e-6)


def test_attention_residuals_mix_earlier_outputs_by_softmax_over_depth():
    model = make("attention-residuals", depth=3)
    stack, h0 = model.body, model.embed(tokens())
    b = [layer.branch for layer in stack.layers]

    def run(mix):
        vals = [h0]
        for l in range(3):
            x = h0 if l == 0 else mix(2 * l, vals)
            vals.append(b[l].attn(b[l].norm1(x)))
            vals.append(b[l].mlp(b[l].norm2(mix(2 * l + 1, vals))))
        return mix(6, vals)

    # zero queries: every sublayer reads the plain mean of the embedding and all earlier outputs
    assert torch.allclose(stack(h0), run(lambda k, vals: sum(vals) / len(vals)), atol=1e-5)

    def softmax_mix(k, vals):  # α_i = softmax_i(w_k · rmsnorm_k(v_i)), one weight per source and position
        scores = torch.stack([(stack.key_norms[k - 1](v) * stack.queries[k - 1]).sum(-1) for v in vals])
        return (torch.softmax(scores, 0).unsqueeze(-1) * torch.stack(vals)).sum(0)

    with torch.no_grad():
        stack.queries.normal_()
    randomize(stack.key_norms, std=1.0, seed=3)
    assert torch.allclose(stack(h0), run(softmax_mix), atol=1e-5)
    assert not torch.allclose(stack(h0), run(lambda k, vals: sum(vals) / len(vals)), atol=1e-3)


def test_sinkhorn_is_doubly_stochastic():
    logits = torch.randn(6, 4, 4, generator=torch.Generator().manual_seed(0))
    m = sinkhorn(logits, iters=20)  # the paper's 20 iterations, on logits of unit scale
    assert (m > 0).all()
    assert torch.allclose(m.sum(-1), torch.ones(6, 4), atol=1e-3)
    assert torch.allclose(m.sum(-2), torch.ones(6, 4), atol=1e-6)
    sharp = sinkhorn(3 * logits, iters=500)  # sharper matrices need more iterations, and get there
    assert torch.allclose(sharp.sum(-1), torch.ones(6, 4), atol=1e-5)
    model = make("mhc", depth=2)
    randomize(model)  # input-dependent mixing: every token's matrix is doubly stochastic
    layer = model.effective_layers()[1]
    H = torch.randn(3, 7, 4, WIDTH)
    _, r, _ = layer.mixing(H)
    assert r.shape == (3, 7, 4, 4)
    assert torch.allclose(r.sum(-1), torch.ones(3, 7, 4), atol=1e-3)
    assert torch.allclose(r.sum(-2), torch.ones(3, 7, 4), atol=1e-5)


def test_denseformer_dilation_and_period_choose_the_averaged_outputs():
    model = make("denseformer", depth=6, dilation=2, period=3)
    assert model.body.sources == [None, None, [1, 3], None, None, [0, 2, 4, 6]]
    assert [a.tolist() for a in model.body.alphas] == [[0.0, 1.0], [0.0, 0.0, 0.0, 1.0]]


def test_value_residual_mixes_the_first_layers_values():
    learned = make("value-residual", depth=3, mix="learned")
    randomize(learned)
    x = tokens()
    with torch.no_grad():
        learned.body.lambdas.copy_(torch.tensor([[0.0, 1.0], [0.0, 1.0]]))  # own values only: a plain stack
    assert torch.allclose(learned(x), plain_twin(learned, 3)(x), atol=1e-5)
    fixed = make("value-residual", depth=3)
    fixed.load_state_dict({**learned.state_dict(), "body.lambdas": torch.full((2, 2), 0.5)})
    assert "lambdas" not in dict(fixed.body.named_parameters())  # fixed 0.5/0.5 is not trained
    assert not torch.allclose(fixed(x), learned(x), atol=1e-4)
    with torch.no_grad():
        learned.body.lambdas.fill_(0.5)
    assert torch.allclose(fixed(x), learned(x), atol=1e-6)


@pytest.mark.parametrize("kw", [{}, {"prelude": 2, "core": 2, "coda": 1}, {"injection": "add"},
                                {"injection": "gate"}])
def test_recurrent_depth_trace_length_and_test_time_recurrence(kw):
    prelude, core, coda = kw.get("prelude", 1), kw.get("core", 1), kw.get("coda", 1)
    depth = prelude + 3 * core + coda
    model = make("recurrent-depth", depth=depth, **kw).eval()
    randomize(model)
    x = tokens()
    assert model.body.recurrence == 3
    assert len(trace(model, x).states) == depth + 1
    # More iterations at evaluation: same parameters, longer trace, different output, no retraining.
    deeper = make("recurrent-depth", depth=prelude + 8 * core + coda, **kw).eval()
    deeper.load_state_dict(model.state_dict())  # strict: the parameters do not depend on r
    out3 = model(x)
    model.body.recurrence = 8
    t8 = trace(model, x)
    assert len(t8.states) == prelude + 8 * core + coda + 1 == model.effective_depth + 1
    assert torch.allclose(t8.logits, deeper(x), atol=1e-5)
    assert not torch.allclose(t8.logits, out3, atol=1e-4) and torch.isfinite(t8.logits).all()


def test_recurrent_depth_draws_r_from_the_lognormal_poisson_reproducibly():
    model = make("recurrent-depth", depth=2 + 8, sampling="lognormal-poisson")
    body = model.body
    draws = [body.draw_recurrence() for _ in range(2000)]
    assert min(draws) >= 1 and max(draws) > 8
    assert abs(sum(draws) / len(draws) - 8) < 0.3  # mean r̄ = the depth's r
    again = make("recurrent-depth", depth=10, sampling="lognormal-poisson").body
    assert [again.draw_recurrence() for _ in range(50)] == draws[:50]  # same seed, same draws
    # the counter is state: a resumed run continues the sequence rather than restarting it
    resumed = make("recurrent-depth", depth=10, sampling="lognormal-poisson")
    resumed.load_state_dict({**model.state_dict(), "body.draws": torch.tensor(50)})
    assert [resumed.body.draw_recurrence() for _ in range(10)] == draws[50:60]


def test_recurrent_depth_truncated_backprop_still_reaches_the_prelude():
    model = make("recurrent-depth", depth=2 + 6, k_bptt=2)
    randomize(model)
    model(tokens()).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_recurrent_depths_that_do_not_fit_are_refused_with_the_valid_ones():
    with pytest.raises(UsageError, match=r"recurrent-depth cannot have effective depth 5: .*2 \+ r·2.*4, 6, 8"):
        make("recurrent-depth", depth=5, core=2)
    with pytest.raises(UsageError, match="hourglass .* needs effective depth ≥ 3"):
        make("hourglass", depth=2)


def test_looped_shares_its_layers():
    small, big = make("looped", depth=2, loop_layers=2), make("looped", depth=8, loop_layers=2)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(small) == count(big) and big.effective_depth == 8 and big.body.recurrence == 4
    assert big.effective_layers()[0] is big.effective_layers()[2]
    stepped = make("looped", depth=4, step_embedding=True)
    randomize(stepped)
    plain = make("looped", depth=4)
    plain.load_state_dict(stepped.state_dict())
    assert not torch.allclose(stepped(tokens()), plain(tokens()), atol=1e-4)


def test_hrm_schedule_and_cycles():
    model = make("hrm", depth=6, low_steps=2)
    assert model.body.schedule_kinds() == ["L", "L", "H", "L", "L", "H"]
    assert model.body.recurrence == 2
    assert [m is model.body.low for m in model.effective_layers()] == [True, True, False, True, True, False]
    model.body.recurrence = 4  # more cycles at evaluation, same parameters
    assert model.effective_depth == 12 and len(trace(model, tokens()).states) == 13
    assert make("hrm", depth=4).body.schedule_kinds() == ["L", "L", "H", "L"]  # ends mid-cycle


def test_hrm_one_step_gradient_matches_the_papers_pseudocode():
    model = make("hrm", depth=6, low_steps=2)
    randomize(model)
    x = model.embed(tokens()).detach()
    model.body(x).square().sum().backward()
    got = [p.grad.clone() for p in model.body.parameters()]
    model.zero_grad()
    low, high = model.body.low, model.body.high
    with torch.no_grad():  # every step but the last L and H without gradient
        zl, zh = x, torch.zeros_like(x)
        zl = low(zl + zh + x)
        zl = low(zl + zh + x)
        zh = high(zh + zl)
        zl = low(zl + zh + x)
    zl = low(zl + zh + x)
    zh = high(zh + zl)
    (zl + zh).square().sum().backward()
    want = [p.grad for p in model.body.parameters()]
    assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want))


@pytest.mark.parametrize("kw", [{}, {"shorten": 3, "down": "linear", "up": "linear"}, {"pre": 0, "post": 2}])
def test_hourglass_is_causal(kw):
    model = make("hourglass", depth=5, **kw)
    randomize(model)
    x = tokens(seq=7)
    base = model(x)
    for t in range(7):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % 11
        out = model(y)
        assert torch.allclose(out[:, :t], base[:, :t], atol=1e-6), f"position < {t} saw token {t}"
        assert not torch.allclose(out[:, t], base[:, t], atol=1e-6)


def test_hourglass_traces_the_full_resolution_stream():
    model = make("hourglass", depth=5, shorten=3)
    randomize(model)
    t = trace(model, tokens(seq=7))
    assert [h.shape for h in t.states] == [torch.Size([3, 7, WIDTH])] * 6
    skipped = trace(model, tokens(seq=7), skip=[2])  # a short layer: its state is kept
    assert torch.equal(skipped.states[3], skipped.states[2])


def test_rk2_student_block_is_the_midpoint_step():
    """residual-mlp-rk2: mid = h + ½·MLP₁(rmsnorm(h)), out = h + MLP₂(rmsnorm(mid)); the identity at init."""
    from archbench.blocks.residual import ResidualMLPRK2

    torch.manual_seed(0)
    block = ResidualMLPRK2(8, 0, 1, zero_init=False)
    x = torch.randn(4, 1, 8)

    def branch(mlp, h):
        return mlp.fc2(torch.relu(mlp.fc1(torch.nn.functional.rms_norm(h, (8,)))) ** 2)

    mid = x + 0.5 * branch(block.mlp1, x)
    assert torch.allclose(block(x), x + branch(block.mlp2, mid), atol=1e-6)
    assert torch.equal(ResidualMLPRK2(8, 0, 1)(x), x)


@pytest.mark.parametrize("kw", [{}, {"ways": "r"}, {"dynamic": False}])
def test_muddformer_at_init_is_the_plain_prenorm_stack(kw):
    model = make("muddformer", depth=4, **kw)
    for layer in model.effective_layers():
        randomize(layer.branch, seed=len(layer.branch.state_dict()))
    for l, norms in enumerate(model.body.kv_norms or [], start=1):  # keys' and values' norms as the queries'
        for norm in norms:
            norm.load_state_dict(model.body.layers[l].branch.norm1.state_dict())
    randomize(model.embed)
    randomize(model.readout)
    x = tokens()
    mine, theirs = trace(model, x), trace(plain_twin(model, 4), x)
    assert torch.allclose(mine.logits, theirs.logits, atol=1e-5)
    for a, b in zip(mine.states, theirs.states):
        assert torch.allclose(a, b, atol=1e-5)
    assert [m.ways for m in model.body.mixes] == ([1] * 4 if kw.get("ways") == "r" else [4, 4, 4, 1])


def test_muddformer_reads_queries_keys_values_and_residual_from_their_own_mixes():
    model = make("muddformer", depth=2, dynamic=False)
    randomize(model)
    stack, h0 = model.body, model.embed(tokens())
    with torch.no_grad():  # after block 0: queries from its output, keys and values the embedding, residual the sum
        stack.mixes[0].static.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 1.0]]))
    b0, b1 = stack.layers[0].branch, stack.layers[1].branch
    x1 = h0 + b0(h0)
    q, kv, r = x1, h0, h0 + x1
    kn, vn = stack.kv_norms[0]
    a = b1.attn(b1.norm1(q), kv=(kn(kv), vn(kv)))
    x2 = r + a + b1.mlp(b1.norm2(r + a))
    w = stack.mixes[1].static[0]
    assert torch.allclose(stack(h0), w[0] * h0 + w[1] * x1 + w[2] * x2, atol=1e-5)


def test_muddformer_weights_are_per_position_and_causal():
    model = make("muddformer", depth=3)
    randomize(model)  # dynamic weights on: they depend on each position's own state
    x = tokens()
    y = x.clone()
    y[:, 4:] = (y[:, 4:] + 1) % 11
    assert torch.allclose(model(x)[:, :4], model(y)[:, :4], atol=1e-6)
    assert not torch.allclose(model(x)[:, 4:], model(y)[:, 4:], atol=1e-3)


def test_mixture_of_depths_routes_a_causal_capacity_and_passes_the_rest_unchanged():
    model = make("mixture-of-depths", depth=4, capacity=0.3)
    randomize(model)
    stack = model.body
    assert stack.routed == [False, True, False, True]
    h = torch.randn(5, 20, WIDTH, generator=torch.Generator().manual_seed(3))
    r, chosen = stack.route(1, h)
    for i in range(20):  # token i goes through when fewer than 0.3 (i + 1) of tokens 0..i score higher
        above = (r[:, :i + 1] > r[:, i:i + 1]).sum(-1)
        assert torch.equal(chosen[:, i], above < 0.3 * (i + 1))
    assert 0.2 < chosen.float().mean() < 0.45 and chosen[:, 0].all()
    seen = {}
    model.body.layers[1].register_forward_hook(lambda m, i, o: seen.setdefault("block", o))
    trace_ = trace(model, tokens(seq=7))
    h_in, h_out = trace_.states[1], trace_.states[2]
    _, picked = stack.route(1, h_in)
    assert torch.equal(h_in[~picked], h_out[~picked]) and not torch.allclose(h_in[picked], h_out[picked])


def test_mixture_of_depths_is_causal_and_at_full_capacity_a_router_scaled_block():
    model = make("mixture-of-depths", depth=2, capacity=0.125)
    randomize(model)
    x = tokens()
    y = x.clone()
    y[:, 4:] = (y[:, 4:] + 1) % 11  # later tokens change: earlier outputs, routes included, do not
    assert torch.allclose(model(x)[:, :4], model(y)[:, :4], atol=1e-6)
    full = make("mixture-of-depths", depth=2, capacity=1.0)
    full.load_state_dict(model.state_dict())
    h = full.embed(x)
    b, w = full.body.layers, full.body.routers["1"].weight
    h1 = b[0](h)
    assert torch.allclose(full.body(h), h1 + (h1 @ w.T) * b[1].branch(h1), atol=1e-5)
