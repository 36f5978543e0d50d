"""Invariants of the gated-residual family (blocks/gated.py)."""

import pytest
import torch

from archbench.blocks.gated import GatedAttention, Highway, LayerScale, ReZero, cait_init
from archbench.knobs import knobs_of

X = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))


def test_rezero_is_the_identity_at_init_and_learns_alpha():
    block = ReZero(dim=16, layer_idx=0, depth=4)
    assert torch.equal(block(X), X)
    block(X).square().sum().backward()
    assert block.alpha.grad.abs().item() > 0  # the branch is not zero, so α can move


def test_layerscale_init_rule_and_zero_identity():
    assert [cait_init(d) for d in (12, 24, 48)] == [0.1, 1e-5, 1e-6]
    assert LayerScale(dim=16, layer_idx=0, depth=24).gamma.tolist() == pytest.approx([1e-5] * 16)
    assert LayerScale(dim=16, layer_idx=0, depth=4, granularity="scalar").gamma.shape == (1,)
    zero = LayerScale(dim=16, layer_idx=0, depth=4, init=0.0)
    assert torch.equal(zero(X), X)
    small = LayerScale(dim=16, layer_idx=0, depth=48)
    assert 0 < (small(X) - X).abs().max() < 1e-4


def test_highway_starts_carry_biased():
    block = Highway(dim=16, layer_idx=0, depth=4, gate_bias=2.0)
    g = torch.sigmoid(block.gate(X))
    assert torch.allclose(g, torch.full_like(g, torch.sigmoid(torch.tensor(2.0)).item()))
    # zero-initialised branch: y = g·x at init
    assert torch.allclose(block(X), g * X)
    assert Highway(dim=16, layer_idx=0, depth=4, gate="scalar").gate.out_features == 1


@pytest.mark.parametrize("granularity, width", [("head", 4), ("channel", 16)])
def test_gated_attention_gate_shape_and_effect(granularity, width):
    block = GatedAttention(dim=16, layer_idx=0, depth=4, attn_gate=granularity, heads=4, zero_init=False)
    attn = block.branch.attn
    assert attn.gate.out_features == width
    base = block(X)
    with torch.no_grad():  # a closed gate removes attention entirely
        attn.gate.weight.zero_()
        attn.gate.bias.fill_(-1e4)
    closed = block(X)
    no_attn = X + block.branch.mlp(block.branch.norm2(X))
    assert torch.allclose(closed, no_attn, atol=1e-5) and not torch.allclose(base, closed)
    assert "attention" not in knobs_of(GatedAttention)  # pinned on: there is nothing to gate without it


def test_laurel_starts_as_the_residual_block_and_its_skip_map_has_the_rank():
    from archbench.blocks.laurel import LAuReL
    from archbench.nn import PreNormBlock

    torch.manual_seed(0)
    block = LAuReL(dim=16, layer_idx=0, depth=4, rank=3, zero_init=False)
    plain = PreNormBlock(16, zero_init=False)
    plain.branch.load_state_dict(block.branch.state_dict())
    assert torch.allclose(block(X), plain(X), atol=1e-6)  # B = 0, α = β = 1
    a = block.down.weight.T  # the paper's column-orthogonal A: entries 1/√(rD) where i ≡ j (mod r)
    assert torch.allclose(a.T @ a, torch.diag(torch.tensor([6.0, 5.0, 5.0]) / (3 * 16)))  # 16 rows: 6, 5, 5 per column
    with torch.no_grad():
        block.up.weight.normal_()
        block.weights.copy_(torch.tensor([0.5, 2.0]))
    # α·u(x) + β·(x + BAx): what is left after the branch and the plain skip is β·BAx, of rank 3
    rest = (block(X) - 0.5 * block.branch(X) - 2.0 * X).reshape(-1, 16)
    assert torch.allclose(rest, 2.0 * block.up(block.down(X)).reshape(-1, 16), atol=1e-5)
    assert torch.linalg.matrix_rank(rest).item() == 3
    assert LAuReL(dim=16, layer_idx=0, depth=4, variant="rw").down is None
    assert LAuReL(dim=16, layer_idx=0, depth=4, variant="lr").weights is None
