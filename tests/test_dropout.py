"""The twins' Dropout (nanobert/model_torch.py, model_mlx.py): their cheaper masks (four
16-bit integers per 64-bit word of random bits) must still drop each unit independently
with probability p and keep the expected output equal to the input."""

import math

import numpy as np
import pytest
import torch

import nanobert.model_mlx as MM  # first: MLX's BLAS fix (nanobert/mlx_cpu.py)
import nanobert.model_torch as MT

import mlx.core as mx  # noqa: E402

BACKENDS = ["torch", "mlx"]


def seed(backend, s):
    torch.manual_seed(s) if backend == "torch" else mx.random.seed(s)


def dropout(backend, p):
    return (MT if backend == "torch" else MM).Dropout(p).train()


def array(backend, x):
    return torch.from_numpy(x) if backend == "torch" else mx.array(x)


def numpy(y):
    return y.detach().numpy() if isinstance(y, torch.Tensor) else np.array(y)


def output_and_grad(backend, drop, x):
    """(dropout(x), d sum(dropout(x)) / dx) as numpy, with the same mask for both."""
    if backend == "torch":
        x = torch.from_numpy(x).requires_grad_()
        y = drop(x)
        y.sum().backward()
        return numpy(y), numpy(x.grad)
    seed(backend, 7)
    y = drop(mx.array(x))
    seed(backend, 7)
    return numpy(y), numpy(mx.grad(lambda a: drop(a).sum())(mx.array(x)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drops_units_independently_with_probability_p_and_is_unbiased(backend, p):
    seed(backend, 0)
    n = 1_000_003  # the last 64-bit word is used for three units only
    drop = dropout(backend, p)
    y, grad = output_and_grad(backend, drop, np.ones(n, np.float32))
    dropped = y == 0
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(dropped.mean() - p) < 5 * sigma
    # the four 16-bit quarters of each 64-bit word are uniform and independent of each other
    quarters = dropped[: n - n % 4].reshape(-1, 4)
    for i in range(4):
        assert abs(quarters[:, i].mean() - p) < 8 * sigma
        for j in range(i):
            assert abs((quarters[:, i] & quarters[:, j]).mean() - p * p) < 8 * sigma
    scale = np.unique(y[~dropped])
    assert scale.size == 1 and scale[0] == np.float32(drop.scale)
    assert abs(scale[0] * (1 - round(p * 65536) / 65536) - 1) < 1e-6  # E[y] = x exactly
    np.testing.assert_array_equal(grad, y)  # d y / d x: the same mask and scale


@pytest.mark.parametrize("backend", BACKENDS)
def test_identity_in_eval_mode_or_at_p_zero(backend):
    x = array(backend, np.random.default_rng(0).standard_normal((3, 5), np.float32))
    assert dropout(backend, 0.1).eval()(x) is x
    assert dropout(backend, 0.0)(x) is x


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_seed_fixes_the_mask(backend):
    x = array(backend, np.ones((4, 7, 9), np.float32))
    drop = dropout(backend, 0.3)
    masks = []
    for s in (1, 1, 2):
        seed(backend, s)
        masks.append(numpy(drop(x)) == 0)
    assert np.array_equal(masks[0], masks[1]) and not np.array_equal(masks[0], masks[2])
    assert masks[0].shape == (4, 7, 9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_scales_v_instead_of_the_probabilities(backend):
    """BertSelfAttention's training path: zero_some(probs) @ (v * scale) drops the same units
    as dropout(probs) @ v (same seed) and gives the same result."""
    rng = np.random.default_rng(0)
    probs = rng.random((2, 3, 16, 16), np.float32)
    probs = array(backend, probs / probs.sum(-1, keepdims=True))
    v = array(backend, rng.standard_normal((2, 3, 16, 8), np.float32))
    drop = dropout(backend, 0.2)
    seed(backend, 5)
    dropped = drop(probs)
    seed(backend, 5)
    zeroed = drop.zero_some(probs)
    assert np.array_equal(numpy(zeroed) == 0, numpy(dropped) == 0) and (numpy(zeroed) == 0).any()
    np.testing.assert_allclose(numpy(zeroed @ (v * drop.scale)), numpy(dropped @ v), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("training", [False, True])
def test_mlx_attention_keys_first_equals_the_other_layout(monkeypatch, training):
    """On a Linux CPU the MLX twin lays attention scores out keys first, (B, heads, T keys,
    T queries); elsewhere queries first (eval: mx.fast's fused attention). Both give the same
    output, eval and training; training with attention dropout through a fixed mask that is
    symmetric in (query, key), so both layouts drop the same pairs."""
    from tiny import tiny_config
    from nanobert import mlx_cpu
    config = tiny_config(attention_probs_dropout_prob=0.25)
    attention = MM.BertSelfAttention(config).train(training)
    mx.eval(attention.parameters())
    rng = np.random.default_rng(0)
    B, T = 2, 9
    x = mx.array(rng.standard_normal((B, T, config.hidden_size), np.float32))
    lengths = np.array([[7], [9]])  # row 0 padded
    mask = np.where(np.arange(T) < lengths, 0.0, np.finfo(np.float32).min).astype(np.float32)
    mask = mx.array(mask[:, None, None, :])
    keep = rng.random((T, T)) < 0.75
    keep = mx.array(keep & keep.T)
    monkeypatch.setattr(MM.Dropout, "zero_some", lambda self, p: mx.where(keep, p, 0.0))
    outputs = {}
    for fast in (True, False):
        monkeypatch.setattr(mlx_cpu, "FAST", fast)
        outputs[fast] = np.array(attention(x, mask))
    np.testing.assert_allclose(outputs[True], outputs[False], rtol=1e-5, atol=1e-5)
