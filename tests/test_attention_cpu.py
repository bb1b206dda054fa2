"""The torch twin's fused attention for inference on x86 CPUs (nanobert/attention_cpu.c through
torch_cpu.attention): softmax(q k^T / sqrt(d) + mask) v per head, as SDPA computes it, for
every shape and layout the model gives it; and the model runs it in inference only. Where the
kernel can be built (x86-64 Linux with PyPI's oneDNN, as the README's install gives), it must."""

import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nanobert import native, torch_cpu
import nanobert.model_torch as MT
from tests.tiny import tiny_config

BUILDABLE = sys.platform == "linux" and platform.machine() == "x86_64" and native.onednn_lib_dir() is not None
needs_kernel = pytest.mark.skipif(not BUILDABLE, reason="the fused attention is built on x86-64 Linux with onednn-cpu-gomp")


def sdpa(q, k, v, mask, heads):
    """The reference: F.scaled_dot_product_attention on (B, T, H) inputs, heads side by side."""
    B, T, H = q.shape
    split = lambda t: t.reshape(B, T, heads, H // heads).transpose(1, 2)  # noqa: E731
    return F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask).transpose(1, 2).reshape(B, T, H)


def padding_mask(B, T):
    """(B, 1, 1, T) additive, as the twin builds it: row b attends to its first T - 5b tokens; the
    last row attends to none (every score the dtype's minimum: uniform weights, as HF's)."""
    keep = torch.ones(B, T)
    for b in range(B):
        keep[b, max(T - 5 * b, 0):] = 0
    keep[-1] = 0
    return (1.0 - keep[:, None, None, :]) * torch.finfo(torch.float32).min


@needs_kernel
def test_it_builds_where_it_can():
    assert torch_cpu.fused_attention_available()


@needs_kernel
@pytest.mark.parametrize("B,T,H,heads", [(1, 1, 8, 1), (2, 37, 64, 2), (3, 128, 384, 12), (2, 384, 96, 3)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_matches_sdpa(B, T, H, heads, masked, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(B, T, H, generator=g) for _ in range(3))
    mask = padding_mask(B, T) if masked else None
    out = torch_cpu.attention(q, k, v, mask, heads)
    assert out.shape == (B, T, H) and out.is_contiguous()
    torch.testing.assert_close(out, sdpa(q, k, v, mask, heads), rtol=1e-5, atol=2e-6)


@needs_kernel
def test_column_slices_of_one_qkv_and_far_apart_scores():
    """q, k, v as views into one (B, T, 3H) tensor (row stride 3H), and scores more than 88
    apart within a row (exp underflows to 0 there, as in SDPA)."""
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 50, 3 * 64, generator=g)
    qkv[:, :, :64] *= 12.0  # q x 12: scores spread over hundreds
    q, k, v = qkv.split(64, dim=-1)
    torch.testing.assert_close(torch_cpu.attention(q, k, v, None, 4), sdpa(q, k, v, None, 4), rtol=1e-5, atol=2e-6)


@needs_kernel
def test_the_model_runs_it_in_inference_only(monkeypatch):
    calls = []
    real = torch_cpu.attention
    monkeypatch.setattr(torch_cpu, "attention", lambda *a: calls.append(1) or real(*a))
    config = tiny_config()
    model = MT.BertForQuestionAnswering(config).eval()
    ids = torch.randint(5, config.vocab_size, (2, 16))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert len(calls) == config.num_hidden_layers
    model(input_ids=ids)  # autograd on: SDPA, whose backward training needs
    assert len(calls) == config.num_hidden_layers


def test_nanobert_fused_attention_0_turns_it_off():
    code = "from nanobert import torch_cpu; print(torch_cpu.fused_attention_available())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "NANOBERT_FUSED_ATTENTION": "0"})
    assert out.stdout.strip() == "False"
