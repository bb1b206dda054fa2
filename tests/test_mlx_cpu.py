"""MLX on Linux CPUs (nanobert/mlx_cpu.py): a real BLAS is loaded before mlx.core, and the
polynomial exp/erf behind softmax, GELU and logsumexp are accurate, gradients included.
The BLAS cases run in a fresh process: the preload must happen before MLX is first
imported, which only a new process can show."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the BLAS preload only exists on Linux")

PROBE = """
import numpy as np
import nanobert.model_mlx  # preloads a BLAS, then imports mlx.core
from nanobert import mlx_cpu
import mlx.core as mx
a = np.random.default_rng(0).standard_normal((300, 200)).astype(np.float32)
b = np.random.default_rng(1).standard_normal((200, 100)).astype(np.float32)
err = float(np.abs(np.array(mx.array(a) @ mx.array(b)) - a @ b).max())
print("LOADED", mlx_cpu.loaded_blas())
print("ERR", err)
"""


def run_probe(env=None, prelude=""):
    out = subprocess.run([sys.executable, "-c", "import os\n" + prelude + PROBE], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, **(env or {})}, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    return lines, out.stderr


def test_a_fast_blas_is_loaded_and_matmul_is_right():
    lines, err = run_probe()
    assert lines["LOADED"] != "None", err
    assert float(lines["ERR"]) < 1e-3
    assert "warning" not in err


def test_torch_fallback_works():
    """No system OpenBLAS: torch's own libtorch_cpu.so serves sgemm_ (see README numbers)."""
    import importlib.util
    torch_lib = os.path.join(importlib.util.find_spec("torch").submodule_search_locations[0], "lib", "libtorch_cpu.so")
    lines, err = run_probe({"NANOBERT_BLAS": torch_lib})
    assert lines["LOADED"] == torch_lib and float(lines["ERR"]) < 1e-3, err


def test_missing_blas_warns_once_and_still_computes():
    lines, err = run_probe({"NANOBERT_BLAS": "/nonexistent/libblas.so"})
    assert lines["LOADED"] == "None"
    assert err.count("no fast BLAS found for MLX") == 1
    assert float(lines["ERR"]) < 1e-3  # the reference BLAS is slow, not wrong


def test_importing_mlx_first_is_warned_about():
    _, err = run_probe(prelude="import mlx.core\n")
    assert "mlx.core was imported before nanobert.model_mlx" in err


# --- the polynomial exp/erf (in-process) ------------------------------------------------------

def float64_grad(f, x, weight):
    t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    (f(t) * torch.tensor(weight, dtype=torch.float64)).sum().backward()
    return f(t.detach()).numpy(), t.grad.numpy()


def mlx_value_and_grad(f, x, weight):
    import mlx.core as mx
    value, grad = mx.value_and_grad(lambda v: (f(v) * mx.array(weight)).sum())(mx.array(x))
    return np.array(f(mx.array(x))), np.array(grad)


@pytest.mark.parametrize("name", ["gelu", "softmax", "logsumexp"])
def test_fast_functions_match_float64(name):
    """Within a few fp32 ulps of the float64 truth, values and gradients, over the range that
    matters: GELU on [-12, 12] (both tails), softmax with masked (dtype-min) entries, logsumexp
    of large logits."""
    from nanobert import mlx_cpu
    rng = np.random.default_rng(0)
    if name == "gelu":
        x = np.linspace(-12, 12, 100001).astype(np.float32)
        ref = torch.nn.functional.gelu
    elif name == "softmax":
        x = (rng.standard_normal((3, 5, 64)) * 6).astype(np.float32)
        x[..., :9] = np.finfo(np.float32).min  # padding, as the attention mask makes it
        ref = lambda t: torch.softmax(t, -1)  # noqa: E731
    else:
        x = (rng.standard_normal((7, 3000)) * 20).astype(np.float32)
        ref = lambda t: torch.logsumexp(t, -1)  # noqa: E731
    weight = rng.standard_normal(ref(torch.tensor(x)).shape).astype(np.float32)
    value, grad = mlx_value_and_grad(getattr(mlx_cpu, name), x, weight)
    ref_value, ref_grad = float64_grad(ref, x, weight)
    scale = np.maximum(np.abs(ref_value), 1.0)
    assert np.abs((value - ref_value) / scale).max() < 2e-6
    assert np.abs(grad - ref_grad).max() < 2e-6 * max(1.0, np.abs(ref_grad).max())
    if name == "softmax":
        assert (value[..., :9] == 0).all()  # masked positions get exactly zero weight, as in HF
