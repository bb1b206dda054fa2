"""The torch twin's Linear (nanobert/torch_cpu.py): on x86 CPUs not made by Intel its three
matmuls run on oneDNN, with a hand-written backward. It must give F.linear's output and
gradients (up to fp32 summation order) for every kind of shape the model has, and be what the
model runs where the vendor rule picks it. The oneDNN path is tested on every x86 machine
(forced on where the rule would pick MKL)."""

import copy
import os
import pickle
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nanobert import torch_cpu
from nanobert.training import cpu_vendor_and_model

X86 = platform.machine().lower() in ("x86_64", "amd64")
HAS_ONEDNN = X86 and torch.backends.mkldnn.is_available()


@pytest.fixture
def onednn(monkeypatch):
    """torch_cpu.linear on oneDNN, whatever this CPU's vendor."""
    if not HAS_ONEDNN:
        pytest.skip("oneDNN is used on x86 CPUs only; elsewhere Linear is F.linear")
    monkeypatch.setattr(torch_cpu, "ONEDNN", True)


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
def test_matches_f_linear_forward_and_backward(x_shape, n, with_bias, monkeypatch):
    monkeypatch.setattr(torch_cpu, "ONEDNN", HAS_ONEDNN)
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


def test_frozen_weight_gets_no_gradient_and_grads_accumulate(monkeypatch):
    """LoRA freezes the base weight (no weight gradient computed); .grad accumulates over calls."""
    monkeypatch.setattr(torch_cpu, "ONEDNN", HAS_ONEDNN)
    torch.manual_seed(0)
    layer = torch_cpu.Linear(16, 40)
    layer.weight.requires_grad_(False)
    x = torch.randn(4, 16, requires_grad=True)
    layer(x).sum().backward()
    layer(x).sum().backward()
    assert layer.weight.grad is None
    torch.testing.assert_close(layer.bias.grad, torch.full((40,), 8.0))
    torch.testing.assert_close(x.grad, 2 * layer.weight.sum(0).expand(4, 16))


def test_the_rule_picks_onednn_off_intel_and_mkl_on_intel():
    rule = torch_cpu.use_onednn
    assert rule(None, "x86_64", "AuthenticAMD", True) and rule("", "AMD64", "HygonGenuine", True)
    assert not rule(None, "x86_64", "GenuineIntel", True)
    assert rule("1", "x86_64", "GenuineIntel", True) and not rule("0", "x86_64", "AuthenticAMD", True)
    assert not rule("1", "x86_64", "AuthenticAMD", False) and not rule("1", "arm64", "", True)
    with pytest.raises(ValueError, match="NANOBERT_ONEDNN must be 0 or 1, got 'yes'"):
        rule("yes", "x86_64", "AuthenticAMD", True)


def test_this_machine_runs_what_the_rule_picks():
    vendor, model = cpu_vendor_and_model()
    assert model  # bench.py names it
    assert torch_cpu.ONEDNN == torch_cpu.use_onednn(os.environ.get("NANOBERT_ONEDNN"), platform.machine(), vendor,
                                                    torch.backends.mkldnn.is_available())
    x = torch.randn(2, 16, requires_grad=True)
    assert ran_onednn(torch_cpu.Linear(16, 8)(x)) == torch_cpu.ONEDNN


def test_the_model_runs_onednn_when_on(onednn, monkeypatch):
    """When on, the Linears go through oneDNN (else the speed in docs/cpu-speed.md is not what
    runs); float64, and torch's switch for oneDNN set off, fall back to F.linear."""
    x = torch.randn(2, 16, requires_grad=True)
    assert ran_onednn(torch_cpu.Linear(16, 8)(x))
    assert not ran_onednn(torch_cpu.Linear(16, 8).double()(x.double()))
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert not ran_onednn(torch_cpu.Linear(16, 8)(x))


@pytest.mark.parametrize("setting", ["0", "1"])
def test_nanobert_onednn_overrides_the_rule(setting):
    env = {**os.environ, "NANOBERT_ONEDNN": setting}
    out = subprocess.run([sys.executable, "-c", "from nanobert import torch_cpu; print(torch_cpu.ONEDNN)"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == str(setting == "1" and HAS_ONEDNN), out.stderr


def test_under_torch_compile_it_is_f_linear(monkeypatch):
    """torch.compile (--compile) cannot lower the oneDNN op with trainable weights: compiled,
    Linear is F.linear, with the same output and gradients as eager."""
    monkeypatch.setattr(torch_cpu, "ONEDNN", HAS_ONEDNN)
    torch.manual_seed(0)
    layer = torch_cpu.Linear(16, 8)
    x = torch.randn(3, 16)
    eager = forward_and_grads(lambda x, w, b: layer(x), x, layer.weight, layer.bias, torch.ones(3, 8))
    compiled = forward_and_grads(lambda x, w, b: torch.compile(layer)(x), x, layer.weight, layer.bias,
                                 torch.ones(3, 8))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_inference_keeps_a_reordered_weight_while_the_weight_is_unchanged(onednn):
    """Eval mode without autograd: the output is the oneDNN Linear's, from a reordered copy of
    the weight made once; an in-place update, new values under the same tensor (load_state_dict)
    or a new weight tensor makes a new copy, so the output always follows the weight; training,
    deepcopy and pickling drop the copy."""
    torch.manual_seed(0)
    layer = torch_cpu.Linear(16, 8).eval()
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        y = layer(x)
        copy_made = layer.packed[3]
        assert copy_made.is_mkldnn
        torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        assert torch.equal(layer(x), y) and layer.packed[3] is copy_made  # reused, not made again
        layer.weight.mul_(2)  # an optimizer's in-place update
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        layer.load_state_dict({"weight": torch.randn(8, 16), "bias": layer.bias.clone()})
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        layer.weight = torch.nn.Parameter(torch.randn(8, 16))
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        assert copy.deepcopy(layer).packed is None and pickle.loads(pickle.dumps(layer)).packed is None
    assert layer(x).requires_grad and layer.packed is None  # autograd on: the trainable path, no copy
    with torch.no_grad():
        layer(x)
        layer.train()(x)
    assert layer.packed is None
