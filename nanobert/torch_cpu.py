"""torch on x86 CPUs: the Linear layers' matmuls on oneDNN where that is faster than MKL.

torch's own fp32 matmul (`mm`, `addmm`: what `nn.Linear`, and so HF, runs) on an x86 CPU is
MKL's, which takes its AVX-512 kernels on Intel CPUs only. On an AMD EPYC (Zen 5) MKL ran
(4096 x 384) @ (384 x 1536) at ~200 GFLOP/s and oneDNN, also built into torch's x86 builds,
at ~450; on an Intel Xeon (Sapphire Rapids class) MKL was the faster of the two in every
Linear GEMM, forward and backward (its weight gradients ~2x: docs/cpu-speed.md). So the rule
is by vendor: oneDNN on x86 CPUs that are not Intel's, MKL (F.linear) on Intel's.
NANOBERT_ONEDNN=1 / =0 overrides it. torch exposes oneDNN's inner product without autograd,
so the backward is written out here. The counterpart of mlx_cpu.py, which gives MLX its BLAS.

Also here: `attention`, a fused attention for inference (attention_cpu.c) on x86-64 Linux,
where PyPI's oneDNN is installed (requirements.txt); elsewhere, and in training, SDPA.
"""

import ctypes
import os
import platform

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanobert import native
from nanobert.training import cpu_vendor_and_model


def use_onednn(setting, machine, vendor, available):
    """The rule: oneDNN's Linears on x86 CPUs not made by Intel (where MKL is slow), when torch
    has oneDNN; `setting` ($NANOBERT_ONEDNN: "1", "0" or None) overrides the vendor rule."""
    if setting not in (None, "", "0", "1"):
        raise ValueError(f"NANOBERT_ONEDNN must be 0 or 1, got {setting!r}")
    if not available or machine.lower() not in ("x86_64", "amd64"):
        return False
    if setting:
        return setting == "1"
    return vendor != "GenuineIntel"


ONEDNN = use_onednn(os.environ.get("NANOBERT_ONEDNN"), platform.machine(), cpu_vendor_and_model()[0],
                    torch.backends.mkldnn.is_available())


def linear(x, weight, bias=None):
    """F.linear: x (..., K), weight (N, K), bias (N,) -> x W^T + b (..., N). oneDNN for fp32 on
    an x86 CPU, unless torch's own switch turns it off (torch.backends.mkldnn.enabled), outside
    autocast (which F.linear follows, casting to bf16) and torch.compile (whose lowering of the
    oneDNN op wants weights frozen into constants; it picks its own), and for x with rows
    (oneDNN builds no inner product over 0 of them, as the weight gradient would need)."""
    if on_onednn(x):
        return OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def _eager_cpu_fp32(x):
    """x is fp32 on the CPU, outside CPU autocast and torch.compile: where our own kernels may run."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling())


def on_onednn(x):
    """Whether `linear` runs x on oneDNN (its docstring says when)."""
    return bool(ONEDNN and x.numel() and torch.backends.mkldnn.enabled and _eager_cpu_fp32(x))


def onednn_linear(x, weight, bias=None):
    """x W^T + b on oneDNN (an inner product primitive; no autograd): x made contiguous,
    weight (N, K) any strides."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class OneDNNLinear(torch.autograd.Function):
    """A Linear's forward and backward, its three matmuls on oneDNN. With g = dL/dy (M, N)
    and x (M, K), over the M = B*T rows: dL/dx = g W, dL/dW = g^T x, dL/db = sum of g's rows."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g, x = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])  # (M, N), (M, K)
        grad_x = onednn_linear(grad, weight.t()) if ctx.needs_input_grad[0] else None
        grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            # oneDNN copies its first operand contiguous, and runs fastest with fewer output rows
            # than columns: g^T x as is when N <= K, else (x^T g)^T (the MLM decoder, N = 30522:
            # 56 ms vs 102 ms for g^T x, 752 rows).
            N, K = weight.shape
            grad_w = onednn_linear(g.t(), x.t()) if N <= K else onednn_linear(x.t(), g.t()).t()
        if ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b


class Linear(nn.Linear):
    """nn.Linear (same parameters and names), through `linear`. In inference (eval mode, no
    autograd) on oneDNN, the weight is reordered into oneDNN's own blocked layout once and
    that copy kept while the weight is unchanged (same tensor, same storage, same version:
    an in-place update bumps it); oneDNN would otherwise reorder the weight on every call
    (QA inference B16 T384 on an AMD Zen 4: 1.015 -> 0.975 s a step, docs/cpu-speed.md).
    Training drops the copy."""

    packed = None  # (weight, its data_ptr, its version, the reordered copy)

    def forward(self, x):
        if self.training or torch.is_grad_enabled() or not on_onednn(x):
            self.packed = None
            return linear(x, self.weight, self.bias)
        w = self.weight
        if self.packed is None or self.packed[0] is not w or self.packed[1:3] != (w.data_ptr(), w._version):
            self.packed = None  # free the old copy first
            self.packed = (w, w.data_ptr(), w._version, torch.ops.mkldnn._reorder_linear_weight(w.detach()))
        return torch.ops.mkldnn._linear_pointwise(x, self.packed[3], self.bias, "none", [], "")

    def __getstate__(self):  # copy.deepcopy and pickle: without the copy (oneDNN's own tensor type has no storage to copy)
        return {**super().__getstate__(), "packed": None}


_attention_lib = False  # not loaded yet; then the library, or None where it cannot be built


def fused_attention_available():
    """Whether `attention` can run here: x86-64 Linux with PyPI's oneDNN and a C compiler
    (the kernel is built on first use, ~1 s). NANOBERT_FUSED_ATTENTION=0 turns it off."""
    global _attention_lib
    if _attention_lib is False:
        path = native.attention_kernel()
        _attention_lib = path and ctypes.CDLL(path)
        if path:
            _attention_lib.nanobert_attention.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] + [
                ctypes.c_void_p] * 2 + [ctypes.c_int] * 4 + [ctypes.c_float, ctypes.c_int]
    return bool(_attention_lib)


def on_fused_attention(x):
    """Whether the torch twin's attention runs on x through `attention`: inference (no
    autograd), fp32 on the CPU, outside torch.compile, where it is available."""
    return bool(not torch.is_grad_enabled() and _eager_cpu_fp32(x) and fused_attention_available())


def attention(q, k, v, mask, heads):
    """softmax(q k^T / sqrt(d) + mask) v per head, fused (attention_cpu.c): q, k, v (B, T, H)
    fp32 on the CPU, heads side by side in H, each with unit stride along H and one row stride
    (the Linears' outputs, or column slices of one fused QKV); mask None or (B, 1, 1, T)
    additive -> (B, T, H) contiguous. No autograd: inference only (`on_fused_attention`)."""
    B, T, H = q.shape
    assert all(t.dtype == torch.float32 and t.stride() == q.stride() for t in (q, k, v))
    assert q.stride(2) == 1 and q.stride(0) == T * q.stride(1), "rows of one stride, unit stride along H"
    out = torch.empty(B, T, H)
    if mask is not None:
        mask = mask.expand(B, 1, 1, T).reshape(B, T).contiguous()
    if _attention_lib.nanobert_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), q.stride(1),
                                         None if mask is None else mask.data_ptr(), out.data_ptr(), B, heads, T,
                                         H // heads, (H // heads) ** -0.5, torch.get_num_threads()):
        raise MemoryError("nanobert attention: out of memory for its score buffers")
    return out
