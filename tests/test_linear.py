"""The torch twin's Linear (nanobert/torch_cpu.py): on an x86 CPU its three matmuls run on
oneDNN, with a hand-written backward. It must give F.linear's output and gradients (up to
fp32 summation order) for every kind of shape the model has, and be what the model runs."""

import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nanobert import torch_cpu

X86 = platform.machine().lower() in ("x86_64", "amd64")


def ran_onednn(y):
    """Whether y came out of OneDNNLinear (its autograd node), not F.linear."""
    return type(y.grad_fn).__name__ == "OneDNNLinearBackward"


def forward_and_grads(fn, x, weight, bias, grad):
    """fn(x, weight, bias) and the gradients of <fn(...), grad> for whichever inputs require them."""
    inputs = [t for t in (x, weight, bias) if t is not None and t.requires_grad]
    y = fn(x, weight, bias)
    return [y.detach()] + list(torch.autograd.grad(y, inputs, grad))


@pytest.mark.parametrize("x_shape, n", [
    ((3, 5, 16), 8),   # N < K, (B, T, K) input: the weight gradient as g^T x
    ((3, 5, 16), 40),  # N > K: as (x^T g)^T, a transposed result (the MLM decoder's case)
    ((7, 16), 16),     # 2-D input, N == K
    ((2, 0, 16), 8),   # no rows (F.linear: oneDNN builds no inner product over 0 rows)
])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_f_linear_forward_and_backward(x_shape, n, with_bias):
    torch.manual_seed(0)
    x = torch.randn(*x_shape, requires_grad=True)
    weight = torch.randn(n, x_shape[-1], requires_grad=True)
    bias = torch.randn(n, requires_grad=True) if with_bias else None
    grad = torch.randn(*x_shape[:-1], n)
    if torch_cpu.ONEDNN and x.numel():  # what is compared is oneDNN's
        assert ran_onednn(torch_cpu.linear(x, weight, bias))
    ours = forward_and_grads(torch_cpu.linear, x, weight, bias, grad)
    ref = forward_and_grads(F.linear, x, weight, bias, grad)
    assert len(ours) == len(ref) == 3 + with_bias
    for a, b, what in zip(ours, ref, ("output", "grad x", "grad weight", "grad bias")):
        assert a.shape == b.shape, what
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=what)


def test_frozen_weight_gets_no_gradient_and_grads_accumulate():
    """LoRA freezes the base weight (no weight gradient computed); .grad accumulates over calls."""
    torch.manual_seed(0)
    layer = torch_cpu.Linear(16, 40)
    layer.weight.requires_grad_(False)
    x = torch.randn(4, 16, requires_grad=True)
    layer(x).sum().backward()
    layer(x).sum().backward()
    assert layer.weight.grad is None
    torch.testing.assert_close(layer.bias.grad, torch.full((40,), 8.0))
    torch.testing.assert_close(x.grad, 2 * layer.weight.sum(0).expand(4, 16))


@pytest.mark.skipif(not X86, reason="oneDNN is used on x86 CPUs only; elsewhere Linear is F.linear")
def test_the_model_runs_onednn_on_an_x86_cpu(monkeypatch):
    """Where torch has oneDNN, the Linears go through it (else the speed in the README is not
    what runs); float64, and torch's switch for oneDNN set off, fall back to F.linear."""
    assert torch_cpu.ONEDNN == torch.backends.mkldnn.is_available()
    if not torch_cpu.ONEDNN:
        pytest.skip("this torch build has no oneDNN")
    x = torch.randn(2, 16, requires_grad=True)
    assert ran_onednn(torch_cpu.Linear(16, 8)(x))
    assert not ran_onednn(torch_cpu.Linear(16, 8).double()(x.double()))
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert not ran_onednn(torch_cpu.Linear(16, 8)(x))


def test_nanobert_onednn_0_turns_it_off():
    env = {**os.environ, "NANOBERT_ONEDNN": "0"}
    out = subprocess.run([sys.executable, "-c", "from nanobert import torch_cpu; print(torch_cpu.ONEDNN)"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_under_torch_compile_it_is_f_linear():
    """torch.compile (--compile) cannot lower the oneDNN op with trainable weights: compiled,
    Linear is F.linear, with the same output and gradients as eager."""
    torch.manual_seed(0)
    layer = torch_cpu.Linear(16, 8)
    x = torch.randn(3, 16)
    eager = forward_and_grads(lambda x, w, b: layer(x), x, layer.weight, layer.bias, torch.ones(3, 8))
    compiled = forward_and_grads(lambda x, w, b: torch.compile(layer)(x), x, layer.weight, layer.bias,
                                 torch.ones(3, 8))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
