"""The torch twin's Dropout (nanobert/model_torch.py): its cheaper mask must still drop each
unit independently with probability p and keep the expected output equal to the input."""

import math

import pytest
import torch

from nanobert.model_torch import Dropout


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drops_units_independently_with_probability_p_and_is_unbiased(p):
    torch.manual_seed(0)
    n = 1_000_003  # odd: the last 32-bit draw is used for one unit only
    x = torch.ones(n, requires_grad=True)
    drop = Dropout(p).train()
    y = drop(x)
    dropped = y == 0
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(dropped.float().mean().item() - p) < 5 * sigma
    # both 15-bit halves of each 32-bit draw are uniform and independent of each other
    pairs = dropped[: n - 1].view(-1, 2)
    assert abs(pairs[:, 0].float().mean().item() - p) < 8 * sigma
    assert abs(pairs[:, 1].float().mean().item() - p) < 8 * sigma
    assert abs((pairs[:, 0] & pairs[:, 1]).float().mean().item() - p * p) < 8 * sigma
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
