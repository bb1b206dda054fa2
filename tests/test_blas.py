"""MLX on Linux gets a real BLAS before mlx.core loads (see nanobert/blas.py), and the
results it computes are right. Each case runs in a fresh process: the preload must
happen before MLX is first imported, which only a new process can show."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the BLAS preload only exists on Linux")

PROBE = """
import numpy as np
import nanobert.model_mlx  # preloads a BLAS, then imports mlx.core
from nanobert import blas
import mlx.core as mx
a = np.random.default_rng(0).standard_normal((300, 200)).astype(np.float32)
b = np.random.default_rng(1).standard_normal((200, 100)).astype(np.float32)
err = float(np.abs(np.array(mx.array(a) @ mx.array(b)) - a @ b).max())
print("LOADED", blas.loaded())
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
