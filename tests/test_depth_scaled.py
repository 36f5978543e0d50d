"""Invariants of the depth-scaled residual blocks (blocks/depth_scaled.py): LayerNorm Scaling and CompleteP."""

import math

import pytest
import torch

from archbench.blocks.depth_scaled import CompleteP, LayerNormScaling
from archbench.nn import PreNormBlock

X = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))


def _plain_like(block, scale_norms=1.0):
    """The plain pre-norm block with ``block``'s weights, its norms' gains multiplied by ``scale_norms``."""
    plain = PreNormBlock(16, zero_init=False)
    state = {k.replace(".norm.", "."): v for k, v in block.branch.state_dict().items()}
    plain.branch.load_state_dict(state)
    with torch.no_grad():
        plain.branch.norm1.weight.mul_(scale_norms)
        plain.branch.norm2.weight.mul_(scale_norms)
    return plain


@pytest.mark.parametrize("layer_idx", [0, 3, 8])
def test_layernorm_scaling_is_the_plain_block_with_its_norms_scaled_by_one_over_sqrt_l(layer_idx):
    torch.manual_seed(0)
    block = LayerNormScaling(dim=16, layer_idx=layer_idx, depth=12)
    assert any(p.abs().sum() > 0 for p in (block.branch.mlp.fc2.weight, block.branch.attn.proj.weight))  # no zero init
    want = _plain_like(block, 1 / math.sqrt(layer_idx + 1))(X)
    assert torch.allclose(block(X), want, atol=1e-5)
    if layer_idx:
        assert not torch.allclose(block(X), _plain_like(block)(X), atol=1e-3)


@pytest.mark.parametrize("alpha, depth, base", [(1.0, 8, 2), (0.5, 8, 2), (1.0, 2, 2)])
def test_completep_scales_the_branches_by_depth_and_the_learning_rate_to_match(alpha, depth, base):
    torch.manual_seed(0)
    block = CompleteP(dim=16, layer_idx=0, depth=depth, alpha=alpha, base_depth=base)
    m = (depth / base) ** -alpha
    b = block.branch
    h = X + m * b.attn(b.norm1(X))  # both sublayers' outputs scaled, the MLP reading the scaled stream
    assert torch.allclose(block(X), h + m * b.mlp(b.norm2(h)), atol=1e-6)
    if depth == base:
        assert torch.allclose(block(X), _plain_like(block)(X), atol=1e-6)
    want = (depth / base) ** (alpha - 1)  # CompleteP: 1; depth-µP: 1/√(L/L₀)
    assert all(p.lr_scale == pytest.approx(want) for p in block.parameters())
