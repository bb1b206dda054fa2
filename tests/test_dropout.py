"""The torch twin's Dropout (nanobert/model_torch.py): its cheaper mask must still drop each
unit independently with probability p and keep the expected output equal to the input."""

import math

import pytest
import torch

from nanobert.model_torch import Dropout


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drops_units_independently_with_probability_p_and_is_unbiased(p):
    torch.manual_seed(0)
    n = 1_000_003  # the last 64-bit draw is used for three units only
    x = torch.ones(n, requires_grad=True)
    drop = Dropout(p).train()
    y = drop(x)
    dropped = y == 0
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(dropped.float().mean().item() - p) < 5 * sigma
    # the four 15-bit quarters of each 64-bit draw are uniform and independent of each other
    quarters = dropped[: n - n % 4].view(-1, 4)
    for i in range(4):
        assert abs(quarters[:, i].float().mean().item() - p) < 8 * sigma
        for j in range(i):
            assert abs((quarters[:, i] & quarters[:, j]).float().mean().item() - p * p) < 8 * sigma
    scale = y[~dropped].unique()
    assert scale.numel() == 1
    assert abs(scale.item() * (1 - round(p * 32768) / 32768) - 1) < 1e-6  # E[y] = x exactly
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d y / d x: the same mask and scale


def test_identity_in_eval_mode_or_at_p_zero():
    x = torch.randn(3, 5)
    assert Dropout(0.1).eval()(x) is x
    assert Dropout(0.0).train()(x) is x


def test_the_seed_fixes_the_mask():
    x = torch.ones(4, 7, 9)
    drop = Dropout(0.3).train()
    masks = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        masks.append(drop(x) == 0)
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    assert masks[0].shape == x.shape


def test_attention_scales_v_instead_of_the_probabilities():
    """BertSelfAttention's training path on a CPU: zero_some(probs) @ (v * scale) drops the
    same units as dropout(probs) @ v (same seed) and gives the same result."""
    torch.manual_seed(0)
    probs, v = torch.rand(2, 3, 16, 16).softmax(-1), torch.randn(2, 3, 16, 8)
    drop = Dropout(0.2).train()
    torch.manual_seed(5)
    dropped = drop(probs)
    torch.manual_seed(5)
    zeroed = drop.zero_some(probs)
    assert torch.equal(zeroed == 0, dropped == 0) and (zeroed == 0).any()
    torch.testing.assert_close(zeroed @ (v * drop.scale), dropped @ v, rtol=1e-6, atol=1e-6)
