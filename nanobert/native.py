"""The small C files in nanobert/, compiled on first use with the machine's C compiler (the one
MLX needs anyway for its kernels) and cached in ~/.cache/nanobert: MLX's BLAS shims
(mlx_cpu.py) and the torch twin's fused attention (torch_cpu.py). Imports neither framework."""

import hashlib
import importlib.metadata
import os
import subprocess
import sys

from nanobert.fileio import atomic_path


def cache_dir():
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nanobert")


def onednn_lib_dir():
    """The folder of PyPI's onednn-cpu-gomp libdnnl.so.3 (oneDNN's GEMM, dnnl_sgemm), or None."""
    try:
        dist = importlib.metadata.distribution("onednn-cpu-gomp")
    except importlib.metadata.PackageNotFoundError:
        return None
    lib = next((dist.locate_file(f) for f in dist.files or [] if f.name == "libdnnl.so.3"), None)
    return os.path.dirname(os.path.realpath(lib)) if lib is not None and os.path.exists(lib) else None


def build(name, lib_dir, link, flags=("-O2",), machine=""):
    """nanobert/<name> compiled with `flags` against the library in lib_dir (found through an
    rpath) into the cache, once per source, library folder, flags and `machine` (code built
    with -march=native runs only on CPUs like this one: pass the CPU's name): written to a
    temporary name, then renamed, so that concurrent processes never load half a file. Returns
    its path, or None (warned) if it cannot be built."""
    source = os.path.join(os.path.dirname(__file__), name)
    with open(source, "rb") as f:
        key = hashlib.sha256(f.read() + repr((os.path.realpath(lib_dir), flags, machine)).encode()).hexdigest()[:16]
    lib = os.path.join(cache_dir(), f"{name[:-2]}-{key}.so")
    if os.path.exists(lib):
        return lib
    try:
        with atomic_path(lib) as tmp:
            subprocess.run([os.environ.get("CC", "cc"), *flags, "-shared", "-fPIC", source, "-o", tmp,
                            f"-L{lib_dir}", link, f"-Wl,-rpath,{lib_dir}"], check=True, capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        print(f"nanobert: warning: could not build {source} ({e}); going on without it", file=sys.stderr)
        return None
    return lib
