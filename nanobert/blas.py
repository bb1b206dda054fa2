"""Give MLX a fast BLAS on Linux, before `mlx.core` is first imported.

Why: the `mlx[cpu]` wheel for Linux links the reference (netlib) BLAS, which multiplies
fp32 matrices at ~3.5 GFLOP/s on the 2-core reference machine, 40x slower than a tuned
BLAS. MLX calls `cblas_sgemm`; the reference `cblas_sgemm` calls `sgemm_`. Both are
resolved by the dynamic linker, which looks in the process's *global* scope before a
library's own dependencies. So a tuned library opened with RTLD_GLOBAL before MLX loads
takes over those symbols for the whole process ("symbol interposition"), no rebuild
needed. Measured on the reference machine (2048x2048 fp32 matmul, see README):
reference 3.3 GFLOP/s, torch's bundled BLAS 83 GFLOP/s, Debian OpenBLAS 144 GFLOP/s.

Order of preference:
  1. $NANOBERT_BLAS: a path to a shared library exporting `sgemm_` ("none" disables this),
  2. the system OpenBLAS (`apt-get install libopenblas0-pthread`; fastest),
  3. torch's own `libtorch_cpu.so` (torch is a nanobert dependency anyway).
On macOS MLX uses Accelerate and nothing is done.
"""

import ctypes
import ctypes.util
import importlib.util
import os
import sys

from nanobert.training import launched_world_size

_loaded = None   # path of the BLAS we loaded, once `preload()` ran
_done = False

OPENBLAS_PATHS = ("/usr/lib/x86_64-linux-gnu/libopenblas.so.0", "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
                  "/usr/lib64/libopenblas.so.0", "/usr/lib/libopenblas.so.0")


def candidates():
    """Shared libraries to try, best first (paths or sonames for the dynamic linker)."""
    if os.environ.get("NANOBERT_BLAS"):
        return [os.environ["NANOBERT_BLAS"]]
    found = [ctypes.util.find_library("openblas")] + [p for p in OPENBLAS_PATHS if os.path.exists(p)]
    spec = importlib.util.find_spec("torch")
    if spec and spec.submodule_search_locations:
        found.append(os.path.join(spec.submodule_search_locations[0], "lib", "libtorch_cpu.so"))
    return [c for c in found if c]


def preload():
    """Load the first working BLAS with RTLD_GLOBAL; warn once if none works. Idempotent.

    Returns the library's path (or soname), or None.
    """
    global _loaded, _done
    if _done or sys.platform != "linux":
        return _loaded
    _done = True
    if os.environ.get("NANOBERT_BLAS", "").lower() == "none":
        return None
    world = launched_world_size()
    if world > 1:  # N processes on one machine: share the cores instead of oversubscribing them
        threads = str(max(1, (os.cpu_count() or 1) // world))
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
            os.environ.setdefault(var, threads)
    if "mlx.core" in sys.modules:
        print("nanobert: warning: mlx.core was imported before nanobert.model_mlx, so MLX may keep its slow "
              "reference BLAS; import nanobert first", file=sys.stderr)
    for path in candidates():
        try:
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        if hasattr(lib, "sgemm_"):
            _loaded = path
            return _loaded
    print("nanobert: warning: no fast BLAS found for MLX; its matmuls will be ~40x slower. "
          "Install one with `sudo apt-get install libopenblas0-pthread` (or `pip install torch`), "
          "or point NANOBERT_BLAS at a library exporting sgemm_.", file=sys.stderr)
    return None


def loaded():
    """The BLAS `preload` loaded (None before it ran or when none was found)."""
    return _loaded
