"""MLX on Linux CPUs: four fixes that make the MLX twin fast where MLX is least tuned.

MLX is built for Apple silicon. Its Linux CPU wheel works, but four things made a BERT
training step ~3x slower than PyTorch on the 2-core reference machine (README has numbers):

1. BLAS. The wheel links the reference (netlib) BLAS, ~3.5 GFLOP/s for fp32 matmul, 40x
   slower than a tuned BLAS. MLX calls `cblas_sgemm`; the reference `cblas_sgemm` calls
   `sgemm_`. Both are resolved by the dynamic linker, which looks in the process's
   *global* scope before a library's own dependencies, so a tuned library opened with
   RTLD_GLOBAL before MLX loads takes over those symbols ("symbol interposition").
   $NANOBERT_BLAS names one (a path; "none": MLX's own). Else the tuned ones found here:
   the system OpenBLAS (`apt-get install libopenblas0-pthread`), and from PyPI (both in
   requirements.txt) oneDNN's GEMM (`onednn-cpu-gomp`, x86-64) and OpenBLAS
   (`scipy-openblas32`), each reached through a small forwarding library (onednn_shim.c,
   openblas_shim.c) compiled once with the C compiler MLX needs anyway, and cached. Which
   is fastest depends on the CPU (on an AMD Zen 4, oneDNN's by 8-13%), so each is timed
   once under MLX on this machine and the fastest is loaded (`fastest`); torch's own
   libtorch_cpu.so (MKL: fast on Intel CPUs, slower on AMD's) is the last resort.
2. Memory. MLX hands every freed buffer back to malloc, and glibc returns big blocks to
   the OS (mmap/munmap, heap trimming), so each op on a large array page-faults its output
   in anew (x * 2 + 1 on 12.6M floats: 52 ms; 16 ms once blocks are reused).
   training.keep_freed_memory(), which both engines call at import, keeps freed blocks in
   the heap for reuse.
3. exp and erf. MLX's CPU backend evaluates transcendental functions one element at a
   time (~18 ns each, vs ~1 ns for torch's vectorised ones), and softmax + GELU then take
   most of a forward pass. Below they are rebuilt from multiplies and adds (range-reduced
   polynomial exp, a rational erf), with their exact derivatives as custom gradients.
   `mx.compile` fuses them into a few kernels, C++ that MLX writes and builds with g++ at
   run time; g++ vectorises a kernel's loop only if it holds no bool (no comparison, no
   `where`, no max/min: MLX's check for NaN) and reads no broadcast input (MLX then takes
   its strided path), so the functions are written to avoid both, and memory passes
   between kernels are few (`_cut`, `_exp`). Accuracy: exp ~3e-7 relative, GELU as torch's
   own fp32 GELU (tests/test_mlx_cpu.py). MLX 0.32's Linux wheel builds them for baseline
   x86-64 (SSE2, 4 floats per instruction); on a CPU with AVX2 and FMA a `g++` first on
   PATH adds the flags later MLX versions pass (`jit_flags`): 8 floats and fused multiply-add.
4. Threads. MLX's CPU backend runs each op on a single thread: the thread of its stream.
   MLX's answer to CPU parallelism is streams, so engine_mlx splits each batch's rows over
   CPU_STREAMS streams, one per core (per process under a launcher), and everything
   elementwise runs on all cores. OpenBLAS then runs one thread per call: two streams each
   asking for two BLAS threads would put four threads on two cores.

Also here: `attention`, the fused attention kernel of the torch twin (attention_cpu.c) as
an MLX primitive (attention_mlx.cpp), for inference on x86-64 Linux.

On macOS (and MLX on a GPU) nothing here is needed: `softmax`, `gelu` and `logsumexp`
are MLX's own there.
"""

import ctypes
import ctypes.util
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig

from nanobert import native
from nanobert.fileio import atomic_path
from nanobert.training import cpu_vendor_and_model, launched_world_size

OPENBLAS_PATHS = ("/usr/lib/x86_64-linux-gnu/libopenblas.so.0", "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
                  "/usr/lib64/libopenblas.so.0", "/usr/lib/libopenblas.so.0")
_blas = None  # the library we loaded


def blas_candidates():
    """Shared libraries to try, best first (paths or sonames for the dynamic linker): the one
    $NANOBERT_BLAS names, else the tuned ones found here, the fastest on this machine first
    (`fastest`), then torch's."""
    if os.environ.get("NANOBERT_BLAS"):
        return [os.environ["NANOBERT_BLAS"]]
    system = [ctypes.util.find_library("openblas")] + [p for p in OPENBLAS_PATHS if os.path.exists(p)]
    tuned = list(dict.fromkeys(c for c in system + [_pypi_onednn(), _pypi_openblas()] if c))
    if len(tuned) > 1:
        best = fastest(tuned)
        tuned.sort(key=lambda c: c != best)
    return [c for c in tuned + [_torch_blas()] if c]


def fastest(libraries):
    """The library on which MLX's matmuls run fastest here, on one thread (nanobert/blas_timer.py,
    each library in a fresh process). Measured once per machine and set of libraries, then read
    back from ~/.cache/nanobert/blas-<key>.json (key: the CPU and the libraries' paths, sizes
    and dates), so that only the first process pays for it (~1 s a library). A library that
    fails to load or run gets no time and is not chosen."""
    def stamp(lib):
        try:
            st = os.stat(lib)
            return [os.path.realpath(lib), st.st_size, st.st_mtime_ns]
        except OSError:
            return [lib]
    cpu = cpu_vendor_and_model()
    key = hashlib.sha256(json.dumps([cpu, [stamp(l) for l in libraries]]).encode()).hexdigest()[:16]
    record = os.path.join(native.cache_dir(), f"blas-{key}.json")
    try:
        with open(record) as f:
            times = json.load(f)["seconds"]
    except (OSError, ValueError, KeyError):
        times = {}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where `nanobert` is importable
        path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        for lib in libraries:
            out = subprocess.run([sys.executable, "-m", "nanobert.blas_timer", lib], capture_output=True, text=True,
                                 timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join([root] + path)})
            times[lib] = float(out.stdout) if out.returncode == 0 and out.stdout.strip() else None
        try:
            with atomic_path(record) as tmp, open(tmp, "w") as f:
                json.dump({"cpu": cpu[1], "seconds": times}, f, indent=1)
        except OSError:
            pass  # an unwritable cache: measure again next time
    timed = [lib for lib in libraries if times.get(lib) is not None]
    return min(timed, key=times.get) if timed else libraries[0]


def _pypi_onednn():
    """The forwarding library for onednn-cpu-gomp's oneDNN (onednn_shim.c), built on first use
    and cached; None if the package or a C compiler is missing."""
    lib_dir = native.onednn_lib_dir()
    return native.build("onednn_shim.c", ["-O2", *native.link(lib_dir, "-l:libdnnl.so.3")]) if lib_dir else None


def _pypi_openblas():
    """The forwarding library for scipy-openblas32's OpenBLAS (openblas_shim.c), built on first
    use and cached; None if the package or a C compiler is missing."""
    spec = importlib.util.find_spec("scipy_openblas32")
    if not (spec and spec.submodule_search_locations):
        return None
    lib_dir = os.path.join(spec.submodule_search_locations[0], "lib")
    return native.build("openblas_shim.c", ["-O2", *native.link(lib_dir, "-lscipy_openblas")])


# The flags later MLX versions pass their JIT compiler when MLX itself is built for AVX2.
AVX2_FLAGS = "-mavx2 -mfma -mf16c"
_jit_flags = ""  # the flags our g++ wrapper adds ("": none, MLX's defaults)


def _cpu_flags():
    """The CPU's feature flags, from /proc/cpuinfo (an empty set where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((l for l in f if l.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


def _jit_wrapper():
    """Fix 3's compiler flags. MLX builds each fused kernel with `g++ -std=c++17 -O3 ...`,
    found on PATH, and no -m flags: SSE2 code on any x86 CPU. We put a two-line `g++` first
    on PATH that adds AVX2_FLAGS ($NANOBERT_MLX_JIT_FLAGS overrides; empty: no wrapper).
    MLX caches built kernels by name in $TMPDIR/mlx/<version>/cpu, so kernels built before
    (without the flags) are reused until that directory is removed. Returns the flags."""
    flags = os.environ.get("NANOBERT_MLX_JIT_FLAGS")
    if flags is None:
        flags = AVX2_FLAGS if {"avx2", "fma", "f16c"} <= _cpu_flags() else ""
    prefix = os.path.join(native.cache_dir(), "jit-")  # our wrappers (a child process inherits its parent's PATH)
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if not p.startswith(prefix)]
    gxx = shutil.which("g++", path=os.pathsep.join(path))
    if not flags.strip() or gxx is None:
        return ""
    script = f'#!/bin/sh\nexec "{gxx}" {flags} "$@"\n'
    folder = prefix + hashlib.sha256(script.encode()).hexdigest()[:16]
    wrapper = os.path.join(folder, "g++")
    if not os.path.exists(wrapper):
        tmp = f"{wrapper}.{os.getpid()}.tmp"
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "w") as f:
            f.write(script)
        os.chmod(tmp, 0o755)
        os.replace(tmp, wrapper)
    os.environ["PATH"] = os.pathsep.join([folder] + path)
    return flags


def jit_flags():
    """The flags added to MLX's kernel builds ("": MLX's own)."""
    return _jit_flags


def _torch_blas():
    """torch's libtorch_cpu.so (it exports sgemm_, backed by MKL or OpenBLAS), if torch is installed."""
    spec = importlib.util.find_spec("torch")
    if spec and spec.submodule_search_locations:
        path = os.path.join(spec.submodule_search_locations[0], "lib", "libtorch_cpu.so")
        return path if os.path.exists(path) else None
    return None


def _preload():
    """Fix 1 and fix 3's compiler flags; must run before mlx.core is first imported (this
    module's import does it)."""
    global _blas, _jit_flags
    if sys.platform != "linux":
        return
    _jit_flags = _jit_wrapper()
    if os.environ.get("NANOBERT_BLAS", "").lower() == "none":
        return
    if "mlx.core" in sys.modules:
        print("nanobert: warning: mlx.core was imported before nanobert.model_mlx, so MLX may keep its slow "
              "reference BLAS; import nanobert first", file=sys.stderr)
    # OpenBLAS's idle threads spin for a while after each call; in a process that also runs
    # torch (tests, bench.py) they would steal its cores: let them sleep at once.
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    world = launched_world_size()
    if world > 1:  # N processes on one machine: share the cores instead of oversubscribing them
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
            os.environ.setdefault(var, str(max(1, (os.cpu_count() or 1) // world)))
    torch_blas = _torch_blas()
    if torch_blas:
        # torch resolves its own `sgemm_` through the same global scope: open it first, so
        # torch keeps its BLAS (an OpenBLAS sgemm_ called from inside torch's OpenMP threads
        # oversubscribes the cores: 6x slower attention). MLX calls `cblas_sgemm`, which
        # only the OpenBLAS below defines, if there is one.
        ctypes.CDLL(torch_blas, mode=ctypes.RTLD_GLOBAL)
    for path in blas_candidates():
        try:
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        if hasattr(lib, "cblas_sgemm") or hasattr(lib, "sgemm_"):
            _blas = path
            break
    else:
        print("nanobert: warning: no fast BLAS found for MLX; its matmuls will be ~40x slower. "
              "Install one with `pip install scipy-openblas32` (and a C compiler) or `sudo apt-get install libopenblas0-pthread`, "
              "or point NANOBERT_BLAS at a library exporting cblas_sgemm or sgemm_.", file=sys.stderr)


def loaded_blas():
    """The BLAS library loaded for MLX (None: none found, or not on Linux)."""
    return _blas


_preload()

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

FAST = sys.platform == "linux" and mx.default_device() == mx.cpu  # fix 3 applies
CORES = max(1, (os.cpu_count() or 1) // launched_world_size())  # this process's share of the machine
# Fix 4: the streams engine_mlx splits a batch over (and optim_mlx the parameters) ($NANOBERT_MLX_STREAMS overrides; 1 off Linux CPUs).
CPU_STREAMS = (int(os.environ.get("NANOBERT_MLX_STREAMS", 0)) or CORES) if FAST else 1


def set_blas_threads(n):
    """Run each of MLX's BLAS calls on n threads (OpenBLAS, or oneDNN through onednn_shim.c)."""
    lib = ctypes.CDLL(_blas) if _blas else None
    for name in ("openblas_set_num_threads", "onednn_shim_set_num_threads"):
        if hasattr(lib, name):
            getattr(lib, name)(n)


if CPU_STREAMS > 1:
    set_blas_threads(1)  # the streams are the threads now
STREAMS = [mx.default_stream(mx.default_device())] + [mx.new_stream(mx.cpu) for _ in range(CPU_STREAMS - 1)]
LOG2E, LN2_HI, LN2_LO = 1.4426950408889634, 0.693359375, -2.12194440e-4  # ln 2 = HI + LO, HI exact in fp32
INV_SQRT_2PI = 0.3989422804014327


def _cut(x):
    """x itself, as a kernel boundary that costs nothing (two bit-casts of one buffer).

    mx.compile fuses at most 11 ops deep and cuts longer chains where the depth runs out. A
    cut that lands on a broadcast scalar (the constants of a polynomial) makes that
    broadcast an input of the next kernel, and an input with stride 0 sends MLX 0.32 down
    its strided code path, which the compiler cannot vectorise: 2-3x slower. So the long
    chains below are cut where we choose, between full arrays."""
    return mx.view(mx.view(x, mx.int32), mx.float32)


def _poly5(c, x, x2, x4):
    """c[0] + c[1] x + ... + c[5] x^5 given x, x^2, x^4, in Estrin's form: 4 ops deep over x,
    so that it fuses with what comes before and after it (MLX fuses at most 11 deep)."""
    return ((c[0] + c[1] * x) + x2 * (c[2] + c[3] * x)) + x4 * (c[4] + c[5] * x)


# e^r on |r| <= ln2/2 by a degree-5 polynomial: near-minimax for relative error (Lawson's
# iteration on 2,000 Chebyshev nodes; max 7.5e-8 in float64, checked in tests/test_mlx_cpu.py).
EXP_COEFFS = (1.0000000716868866, 0.999999691849954, 0.49998894517838344,
              0.1666757500916874, 0.04191541965190584, 0.008297649365701593)
ROUND = 12582912.0  # 1.5 * 2^23: (y + ROUND) - ROUND rounds y to the nearest integer


def _exp(x):
    """exp(x) for x <= 88 from + and *, as three kernels. x = k ln2 + r, |r| <= ln2/2; e^r by
    EXP_COEFFS (Estrin's form: shallow), times 2^k built in a float's exponent bits. Below -88
    the clamp makes k = -127, exponent bits 0, exp = 0: masked attention scores.

    Why three: MLX fuses at most 11 ops deep, a bit-cast (mx.view) ends a kernel, and an op
    whose result feeds two kernels is written out. So: (1) the clamp, with whatever computed
    x, written out (`_cut`); (2) 2^k's bits, an int32 array that `view` then reads as float;
    (3) r and the polynomial, with k read back from those bits, times 2^k: it reads t and
    the bits and writes the result. 7 passes over memory in all; a plainer spelling made 12,
    in 5 kernels."""
    t = _cut(mx.maximum(x, -88.0))
    bits = (((t * LOG2E + ROUND) - ROUND).astype(mx.int32) + 127) << 23  # k + 127 >= 0 as t >= -88
    a = bits.astype(mx.float32)  # (k + 127) 2^23, exactly
    # r = t - k ln2 = (t - k HI) - k LO, with k HI = a HI/2^23 - 127 HI: exact, and one op less
    # deep than k = a/2^23 - 127 first (which keeps this chain within the 11).
    r = (t - (a * (LN2_HI / 2**23) - 127 * LN2_HI)) - (a * (LN2_LO / 2**23) - 127 * LN2_LO)
    r2 = r * r
    return _poly5(EXP_COEFFS, r, r2, r2 * r2) * mx.view(bits, mx.float32)


# erf(x / sqrt2) = x P(x^2) / Q(x^2) for |x| <= 4 sqrt2 (beyond, erf is +-1 in fp32): a
# degree-5/5 rational, fitted for absolute error (Sanathanan-Koerner, then Lawson's iteration,
# on 4,000 Chebyshev nodes; max 2.1e-8 in float64, checked in tests/test_mlx_cpu.py). All
# coefficients are positive: no cancellation in fp32.
ERF_P = (0.797884425955617, 0.06938473511414162, 0.00945182097838671,
         0.0003538784719081841, 1.272980349198774e-05, 4.363797820317039e-08)
ERF_Q = (1.0, 0.25362644864814626, 0.029119179005151312,
         0.001930560477557299, 7.602303635740747e-05, 1.1712786954481275e-06)
ERF_X = 4 * 2 ** 0.5


def _erf_parts(x, backward=False):
    """(xc, R) with erf(x / sqrt2) = xc R: x clamped to +-ERF_X, written out (`_cut`: a kernel
    holding max/min stays scalar), and the rational's ratio (Estrin's form), which the caller
    multiplies in, so the chain stays within MLX's 11 ops of fusion depth. The backward pass
    spells the clamp in the other order: mx.compile compiles forward and backward as one
    graph and would merge two identical clamps, keeping the forward's arrays alive until the
    backward pass (+266 MiB in the classification step)."""
    clamped = mx.maximum(mx.minimum(x, ERF_X), -ERF_X) if backward else mx.minimum(mx.maximum(x, -ERF_X), ERF_X)
    xc = _cut(clamped)
    w = xc * xc
    w2 = w * w
    w4 = w2 * w2
    return xc, _poly5(ERF_P, w, w2, w4) / _poly5(ERF_Q, w, w2, w4)


@mx.compile
def _gelu(x):
    # GELU(x) = x Phi(x) = x/2 + (x/2) erf(x / sqrt2), as torch computes it.
    h = 0.5 * x
    xc, R = _erf_parts(x)
    return h + (h * xc) * R


@mx.compile
def _gelu_grad(x, cotangent):
    # d/dx x Phi(x) = Phi(x) + x phi(x), phi(x) = exp(-x^2/2) / sqrt(2 pi) (written out first).
    e = _cut(_exp(-0.5 * x * x))
    xc, R = _erf_parts(x, backward=True)
    return cotangent * (0.5 + x * INV_SQRT_2PI * e) + (cotangent * (0.5 * xc)) * R


@mx.custom_function
def _fast_gelu(x):
    return _gelu(x)


@_fast_gelu.vjp
def _fast_gelu_vjp(x, cotangent, y):
    return (_gelu_grad(x, cotangent),)


@mx.compile
def _exp_shifted(x, m):
    return _exp(x - m)


@mx.custom_function
def _exp_minus_max(x, axis):
    return _exp_shifted(x, x.max(axis=axis, keepdims=True))


@_exp_minus_max.vjp
def _exp_minus_max_vjp(primals, cotangent, output):
    return (cotangent * output,)  # the max held constant: exact for anything divided by the sum


def softmax_parts(x, axis):
    """(e, total): e = exp(x - max) over `axis` and its sum there, softmax = e / total, for a
    caller that divides later, on fewer values (the MLX attention in eval mode). Linux CPUs
    (FAST) only."""
    e = _exp_minus_max(x, axis)
    return e, e.sum(axis=axis, keepdims=True)


@mx.custom_function
def _fast_softmax(x, axis):
    e, total = softmax_parts(x, axis)
    return e / total


@_fast_softmax.vjp
def _fast_softmax_vjp(primals, cotangent, output):
    _, axis = primals
    return (output * (cotangent - (cotangent * output).sum(axis=axis, keepdims=True)),)


@mx.custom_function
def _fast_logsumexp(x):
    m = x.max(axis=-1)
    return m + mx.log(_exp_shifted(x, m[..., None]).sum(axis=-1))


@_fast_logsumexp.vjp
def _fast_logsumexp_vjp(primals, cotangent, output):
    return (cotangent[..., None] * _exp_shifted(primals, output[..., None]),)  # softmax * g


def gelu(x):
    """Exact (erf) GELU, as mlx.nn.gelu."""
    return _fast_gelu(x) if FAST else nn.gelu(x)


def softmax(x, axis=-1):
    """Softmax over `axis`, as mx.softmax(x, axis=axis, precise=True)."""
    return _fast_softmax(x, axis) if FAST else mx.softmax(x, axis=axis, precise=True)


def logsumexp(x):
    """log(sum(exp(x))) over the last axis, as mx.logsumexp(x, axis=-1)."""
    return _fast_logsumexp(x) if FAST else mx.logsumexp(x, axis=-1)


# The fused attention (attention_cpu.c) as an MLX primitive: attention_mlx.cpp, built on first
# use against this MLX's headers with nanobind (in requirements.txt), into the cache. Its
# OpenMP threads per call: the streams are the threads, as for the BLAS (fix 4).
ATTENTION_THREADS = 1 if CPU_STREAMS > 1 else CORES
_attention_ext = False  # not loaded yet; then the module, or None where it cannot be built


def _build_attention_ext():
    try:
        import nanobind
    except ImportError:
        return None
    kernel = native.attention_kernel()
    if not kernel:
        return None
    mlx_dir = os.path.dirname(mx.__file__)
    args = ["-std=c++20", "-O2", "-fvisibility=hidden", "-DNDEBUG", "-fopenmp",
            "-DNB_DOMAIN=mlx",  # MLX's own bindings are built in nanobind's domain "mlx": so mx.array is shared
            f"-I{sysconfig.get_paths()['include']}", f"-I{nanobind.include_dir()}",
            f"-I{os.path.join(os.path.dirname(nanobind.include_dir()), 'ext', 'robin_map', 'include')}",
            f"-I{os.path.join(mlx_dir, 'include')}", os.path.join(nanobind.source_dir(), "nb_combined.cpp"),
            *native.link(os.path.join(mlx_dir, "lib"), "-lmlx"), kernel]
    path = native.build("attention_mlx.cpp", args, machine=f"mlx {mx.__version__}, nanobind {nanobind.__version__}")
    if not path:
        return None
    spec = importlib.util.spec_from_file_location("nanobert_attention_mlx", path)
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    try:  # an mx.array it cannot take: a nanobind whose internals differ from the one that built MLX
        mx.eval(ext.attention(*[mx.zeros((1, 1, 1))] * 3, None, 1, 1))
    except TypeError as e:
        print(f"nanobert: warning: {path} does not take this MLX's arrays ({e}); going on without it", file=sys.stderr)
        return None
    return ext


def on_fused_attention(x):
    """Whether the MLX twin's attention on x can run through `attention`: fp32 on a Linux
    CPU, where the primitive builds (x86-64; NANOBERT_FUSED_ATTENTION=0 turns it off)."""
    global _attention_ext
    if not (FAST and x.dtype == mx.float32):
        return False
    if _attention_ext is False:
        _attention_ext = _build_attention_ext()
    return bool(_attention_ext)


def attention(q, k, v, mask, heads):
    """softmax(q k^T / sqrt(d) + mask) v per head, fused (attention_cpu.c inside MLX's graph):
    q, k, v (B, T, H) fp32, heads side by side in H; mask None or (B, 1, 1, T) additive ->
    (B, T, H). Its gradient is the spelled-out attention's (attention_mlx.cpp)."""
    B, T, _ = q.shape
    if mask is not None:
        mask = mx.broadcast_to(mask, (B, 1, 1, T)).reshape(B, T)
    return _attention_ext.attention(q, k, v, mask, heads, ATTENTION_THREADS)
