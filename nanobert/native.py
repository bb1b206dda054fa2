"""The small C and C++ files in nanobert/, compiled on first use with the machine's compilers
(MLX needs one anyway for its kernels) and cached in ~/.cache/nanobert: MLX's BLAS shims
(mlx_cpu.py), the fused attention kernel (attention_cpu.c) and its bindings, by ctypes for
the torch twin (torch_cpu.py) and as an MLX primitive for the MLX twin (attention_mlx.cpp,
mlx_cpu.py). Imports neither framework."""

import hashlib
import importlib.metadata
import os
import platform
import subprocess
import sys

from nanobert.fileio import atomic_path
from nanobert.training import cpu_vendor_and_model


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


def link(lib_dir, lib):
    """The compiler arguments that link `lib` (e.g. -l:libdnnl.so.3) from lib_dir, found at
    run time through an rpath."""
    lib_dir = os.path.realpath(lib_dir)
    return [f"-L{lib_dir}", lib, f"-Wl,-rpath,{lib_dir}"]


def build(name, args, machine=""):
    """nanobert/<name> (C, or C++ if it ends in .cpp) compiled with `args` (flags, more
    sources, libraries: see `link`) into a shared library in the cache, once per source, args
    and `machine` (code built with -march=native runs only on CPUs like this one: pass the
    CPU's name; or the versions of the headers it was built against): written to a temporary
    name, then renamed, so that concurrent processes never load half a file. Returns its path,
    or None (warned) if it cannot be built."""
    source = os.path.join(os.path.dirname(__file__), name)
    with open(source, "rb") as f:
        key = hashlib.sha256(f.read() + repr((args, machine)).encode()).hexdigest()[:16]
    lib = os.path.join(cache_dir(), f"{os.path.splitext(name)[0]}-{key}.so")
    if os.path.exists(lib):
        return lib
    compiler = os.environ.get("CXX", "c++") if name.endswith(".cpp") else os.environ.get("CC", "cc")
    try:
        with atomic_path(lib) as tmp:
            subprocess.run([compiler, "-shared", "-fPIC", source, *args, "-o", tmp], check=True, capture_output=True,
                           timeout=300)
    except (OSError, subprocess.SubprocessError) as e:
        print(f"nanobert: warning: could not build {source} ({e}); going on without it", file=sys.stderr)
        return None
    return lib


def attention_kernel():
    """The path of attention_cpu.c built for this CPU, or None: it needs x86-64 Linux, PyPI's
    oneDNN and a C compiler (~1 s, once). NANOBERT_FUSED_ATTENTION=0 turns it off (both twins)."""
    if sys.platform != "linux" or platform.machine() != "x86_64" or os.environ.get("NANOBERT_FUSED_ATTENTION",
                                                                                  "1") == "0":
        return None
    lib_dir = onednn_lib_dir()
    return lib_dir and build("attention_cpu.c", ["-O3", "-march=native", "-fopenmp", *link(lib_dir, "-l:libdnnl.so.3")],
                             machine=cpu_vendor_and_model()[1])
