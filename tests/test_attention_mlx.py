"""The MLX twin's fused attention for inference on x86 CPUs (attention_cpu.c as an MLX primitive,
nanobert/attention_mlx.cpp through mlx_cpu.attention): softmax(q k^T / sqrt(d) + mask) v per
head, as the spelled-out attention computes it, forward and gradient, on any stream and under
mx.compile; and the model runs it in eval mode only. Where it can be built (x86-64 Linux with
PyPI's oneDNN and nanobind, as the README's install gives), it must."""

import importlib.util
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

from nanobert import mlx_cpu, native
import nanobert.model_mlx as MM
from tests.tiny import tiny_config
import mlx.core as mx

BUILDABLE = (sys.platform == "linux" and platform.machine() == "x86_64" and native.onednn_lib_dir() is not None
             and importlib.util.find_spec("nanobind") is not None and mlx_cpu.FAST)
pytestmark = pytest.mark.skipif(not BUILDABLE, reason="the primitive is built on x86-64 Linux CPUs with "
                                                      "onednn-cpu-gomp and nanobind")
MIN = float(np.finfo(np.float32).min)


def spelled_out(q, k, v, mask, heads):
    """The reference: MLX's own precise softmax on (B, T, H) inputs, heads side by side."""
    B, T, H = q.shape
    split = lambda t: t.reshape(B, T, heads, H // heads).transpose(0, 2, 1, 3)  # noqa: E731
    scores = (split(q) * (H // heads) ** -0.5) @ split(k).transpose(0, 1, 3, 2)
    probs = mx.softmax(scores if mask is None else scores + mask, axis=-1, precise=True)
    return (probs @ split(v)).transpose(0, 2, 1, 3).reshape(B, T, H)


def padding_mask(B, T):
    """(B, 1, 1, T) additive: row b attends to its first T - 5b tokens; the last row to none
    (every score the dtype's minimum: uniform weights, as HF's)."""
    keep = np.ones((B, T), np.float32)
    for b in range(B):
        keep[b, max(T - 5 * b, 0):] = 0
    keep[-1] = 0
    return mx.array((1.0 - keep[:, None, None, :]) * MIN)


def inputs(B, T, H, seed=0):
    rng = np.random.default_rng(seed)
    return [mx.array(rng.standard_normal((B, T, H)).astype(np.float32)) for _ in range(3)]


def close(a, b, rtol=1e-5, atol=2e-6):
    np.testing.assert_allclose(np.array(a), np.array(b), rtol=rtol, atol=atol)


def test_it_builds_where_it_can():
    assert mlx_cpu.on_fused_attention(mx.zeros((1, 1, 1)))
    assert not mlx_cpu.on_fused_attention(mx.zeros((1, 1, 1), mx.bfloat16))  # fp32 only


@pytest.mark.parametrize("B,T,H,heads", [(1, 1, 8, 1), (2, 37, 64, 2), (3, 128, 384, 12), (2, 384, 96, 3)])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_the_spelled_out_attention(B, T, H, heads, masked):
    q, k, v = inputs(B, T, H, seed=T)
    mask = padding_mask(B, T) if masked else None
    out = mlx_cpu.attention(q, k, v, mask, heads)
    assert out.shape == (B, T, H) and out.dtype == mx.float32
    close(out, spelled_out(q, k, v, mask, heads))


def test_gradients_match_the_spelled_out_attention():
    """Eval-mode gradients (the parity suite takes them): q, k, v and the mask's."""
    q, k, v = inputs(2, 37, 64)
    mask = padding_mask(2, 37)[:1]  # broadcast over rows, as a (1, 1, 1, T) mask would be
    cotangent = inputs(2, 37, 64, seed=1)[0]
    ours = mx.vjp(lambda *a: mlx_cpu.attention(*a, 2), [q, k, v, mask], [cotangent])[1]
    reference = mx.vjp(lambda *a: spelled_out(*a, 2), [q, k, v, mask], [cotangent])[1]
    for a, b in zip(ours, reference):
        assert a.shape == b.shape and a.dtype == mx.float32
        close(a, b, atol=1e-5)


def test_strided_inputs_on_another_stream_and_compiled():
    """Column slices of one (B, T, 3H) array (copied to rows by the op), on a stream of its
    own, and inside mx.compile."""
    qkv = mx.concatenate(inputs(2, 50, 64), axis=-1)
    q, k, v = qkv[..., :64] * 12.0, qkv[..., 64:128], qkv[..., 128:]  # q x 12: scores > 88 apart
    expected = spelled_out(q, k, v, None, 4)
    with mx.stream(mx.new_stream(mx.cpu)):
        close(mlx_cpu.attention(q, k, v, None, 4), expected)
    close(mx.compile(lambda q, k, v: mlx_cpu.attention(q, k, v, None, 4))(q, k, v), expected)


def test_bad_inputs_are_refused():
    q, k, v = inputs(2, 8, 16)
    with pytest.raises(ValueError, match="multiple of heads"):
        mlx_cpu.attention(q, k, v[:, :4], None, 2)
    with pytest.raises(ValueError, match="multiple of heads"):
        mlx_cpu.attention(q, k, v, None, 3)


def test_the_model_runs_it_in_eval_mode_only(monkeypatch):
    calls = []
    real, real_on = mlx_cpu.attention, mlx_cpu.on_fused_attention
    monkeypatch.setattr(mlx_cpu, "attention", lambda *a: calls.append(1) or real(*a))
    config = tiny_config()
    model = MM.BertForQuestionAnswering(config)
    ids = mx.array(np.random.default_rng(0).integers(5, config.vocab_size, (2, 16)))
    model.eval()
    fused = model(input_ids=ids, attention_mask=mx.ones_like(ids)).start_logits
    assert len(calls) == config.num_hidden_layers
    monkeypatch.setattr(mlx_cpu, "on_fused_attention", lambda x: False)
    close(fused, model(input_ids=ids, attention_mask=mx.ones_like(ids)).start_logits, atol=1e-5)
    monkeypatch.setattr(mlx_cpu, "on_fused_attention", real_on)
    model.train()
    model(input_ids=ids)
    assert len(calls) == config.num_hidden_layers  # training: the spelled-out attention, with its dropout


def test_nanobert_fused_attention_0_turns_it_off():
    code = "from nanobert import mlx_cpu; print(mlx_cpu.on_fused_attention(mlx_cpu.mx.zeros((1, 1, 1))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "NANOBERT_FUSED_ATTENTION": "0"})
    assert out.stdout.strip() == "False"
