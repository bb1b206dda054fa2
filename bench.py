"""Benchmark: the torch twin, the MLX twin and HF transformers on the same work, in one process.

    python bench.py                          # every workload; a table, fp32 on CPU
    python bench.py --workloads mlm,qa_infer --repeats 7 --json bench.json
    python bench.py --compile                # the torch twin torch.compile'd
    NANOBERT_MLX_COMPILE=0 python bench.py   # the MLX twin's training step eager (default: mx.compile'd)
    python bench.py --alone                  # also each implementation alone in its own process: peak RSS, time
    python bench.py --profile torch --workloads qa   # where the time goes: torch.profiler table

Each workload builds HF's model from a random config, saves it, and loads both twins from
that file (the shared format), so all three start from the same weights and see the same
batches. Steps are interleaved (HF, torch, MLX, HF, ...) after warm-up, so a noisy machine
slows all three alike; we report the median and the spread (min-max) of the repeats,
tokens/s, the ratio to HF, and MFU: the step's matmul FLOPs (as that implementation runs
them) over the peak, measured in the same run, of the GEMM its Linears run (HF: torch's
matmul, MKL on x86; the torch twin: oneDNN on an x86 CPU, torch_cpu.linear). Training steps are
forward + backward + AdamW (HF: torch.optim.AdamW, sdpa attention, dense MLM head; ours:
the sparse MLM head, our AdamW); inference is a no-grad forward. In one process all three
share the allocator setting nanobert's engines make (training.keep_freed_memory); --alone
runs each in a fresh process as its users run it, HF with glibc's defaults.

On a CUDA GPU (when torch and MLX see one) the same workloads run in bf16: HF and the torch
twin under bf16 autocast (fp32 weights and AdamW, engine_torch.autocast), the MLX twin with
bf16 weights (MLX has no autocast); the GEMM peak is then an 8192^3 bf16 matmul, and instead
of RSS the table gives each step's GPU memory: its peak above what was allocated before it.
"""

import argparse
import ctypes
import ctypes.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

import nanobert.engine_mlx as EM  # first: MLX's BLAS + allocator fixes (nanobert/mlx_cpu.py)
import nanobert.engine_torch as ET
import nanobert.model_mlx as MM
import nanobert.model_torch as MT
from nanobert import mlx_cpu, torch_cpu
from nanobert.mlm_data import mask_tokens
from nanobert.training import cpu_vendor_and_model, micro_batches, peak_rss_mb, run_info

import mlx.core as mx  # noqa: E402  (after nanobert.mlx_cpu)
import torch  # noqa: E402
import transformers  # noqa: E402

CUDA = ET.DEVICE == "cuda"  # torch sees a GPU: bf16 there (the module docstring)
MLX_GPU = mx.default_device() == mx.gpu
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

MINILM = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
# name: (head, config, batch, seq, train?)
WORKLOADS = {
    "mlm": ("BertForMaskedLM", {**MINILM, "vocab_size": 30522}, 32, 128, True),
    "mlm_v8k": ("BertForMaskedLM", {**MINILM, "vocab_size": 8192}, 32, 128, True),
    "cls": ("BertForSequenceClassification", {**MINILM, "vocab_size": 30522}, 32, 128, True),
    "qa": ("BertForQuestionAnswering", {**MINILM, "vocab_size": 30522}, 8, 384, True),
    "qa_infer": ("BertForQuestionAnswering", {**MINILM, "vocab_size": 30522}, 16, 384, False),
    "mlm_base": ("BertForMaskedLM", {**BASE, "vocab_size": 30522}, 8, 128, True),
}


def make_batch(head, config, B, T, rng):
    ids = rng.integers(1000, config["vocab_size"], (B, T)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 101, 102
    batch = {"input_ids": ids, "attention_mask": np.ones((B, T), np.int32), "token_type_ids": np.zeros((B, T), np.int32)}
    if head == "BertForMaskedLM":
        masked, labels, positions = mask_tokens(ids, rng, (0, 100, 101, 102, 103), config["vocab_size"], 103)
        batch.update(input_ids=masked, labels=labels, masked_positions=positions)
    elif head == "BertForSequenceClassification":
        batch["labels"] = rng.integers(0, 2, B).astype(np.int32)
    else:
        batch["start_positions"] = rng.integers(0, T, B).astype(np.int32)
        batch["end_positions"] = rng.integers(0, T, B).astype(np.int32)
    return batch


def matmul_flops(head, config, B, T, n_masked, train, dense_head):
    """FLOPs of the step's matmuls (2 per multiply-add; backward = 2x forward)."""
    H, L, F, V = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"], config["vocab_size"]
    tokens = B * T
    per_token = L * (2 * 4 * H * H + 2 * 2 * H * F + 2 * 2 * T * H)  # QKV+O, FFN, scores + weighted sum
    flops = tokens * per_token
    if head == "BertForMaskedLM":
        decoded = tokens if dense_head else n_masked
        flops += decoded * (2 * H * H + 2 * H * V)  # transform + decoder
    elif head == "BertForQuestionAnswering":
        flops += tokens * 2 * H * 2
    return flops * (3 if train else 1)


def sync():
    """Wait for the GPU's queued work (torch's CUDA calls return before it is done; MLX's
    steps end in mx.eval and reading back a number, which wait)."""
    if CUDA:
        torch.cuda.synchronize()


def gemm_peak(framework, repeats=10):
    """Best GFLOP/s of an n x n matmul over `repeats` (the peak MFU is measured against):
    fp32 2048^3 on a CPU, bf16 8192^3 on a GPU. framework: torch (its matmul, as HF runs
    it), onednn (as the torch twin's Linears run on an x86 CPU) or mlx."""
    gpu = MLX_GPU if framework == "mlx" else CUDA  # onednn: torch's CPU path, measured only without CUDA
    n = 8192 if gpu else 2048
    if framework == "torch":
        dtype = torch.bfloat16 if gpu else torch.float32
        a, b = torch.randn(n, n, device=ET.DEVICE, dtype=dtype), torch.randn(n, n, device=ET.DEVICE, dtype=dtype)

        def run():
            a @ b
            sync()
    elif framework == "onednn":  # the torch twin's Linears on an x86 CPU (torch_cpu.linear): a b^T
        a, b = torch.randn(n, n), torch.randn(n, n)
        run = lambda: torch_cpu.onednn_linear(a, b)  # noqa: E731
    elif gpu:
        a, b = mx.random.normal((n, n)).astype(mx.bfloat16), mx.random.normal((n, n)).astype(mx.bfloat16)
        run = lambda: mx.eval(a @ b)  # noqa: E731
    else:  # rows split over the CPU streams, as the MLX twin runs (engine_mlx.STREAMS)
        rows, b = mx.split(mx.random.normal((n, n)), len(EM.STREAMS)), mx.random.normal((n, n))
        mx.eval(rows, b)

        def run():
            outs = []
            for part, stream in zip(rows, EM.STREAMS):
                with mx.stream(stream):
                    outs.append(part @ b)
            mx.eval(outs)
    run()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / min(times) / 1e9


def blas_kernels():
    """' (<name> kernels)' where MLX's BLAS is OpenBLAS: the CPU family it picked kernels for
    (its own detection, or $OPENBLAS_CORETYPE), which sets its GEMM speed, and the
    OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE overrides where the environment sets them;
    ' (oneDNN X.Y.Z)' where it is oneDNN (onednn_shim.c)."""
    lib = ctypes.CDLL(mlx_cpu.loaded_blas()) if mlx_cpu.loaded_blas() else None
    if lib is not None and hasattr(lib, "onednn_shim_set_num_threads"):
        lib.dnnl_version.restype = ctypes.POINTER(ctypes.c_int * 3)  # struct dnnl_version_t's major, minor, patch
        return " (oneDNN {}.{}.{})".format(*lib.dnnl_version().contents)
    if lib is None or not hasattr(lib, "openblas_get_corename"):
        return ""
    lib.openblas_get_corename.restype = ctypes.c_char_p
    overrides = "".join(f", {v}={os.environ[v]}" for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if v in os.environ)
    return f" ({lib.openblas_get_corename().decode()} kernels{overrides})"


def build(name, compile_twins=False, impls=("hf", "torch", "mlx")):
    """{impl: step function} for one workload, each from one saved HF checkpoint. Only the
    models of `impls` are kept (a process measuring one implementation's memory holds only it)."""
    head, config, B, T, train = WORKLOADS[name]
    torch.manual_seed(0)
    hf = getattr(transformers, head)(transformers.BertConfig(**config, attn_implementation="sdpa"))
    with tempfile.TemporaryDirectory() as tmp:  # the one weight format, read back by each twin
        hf.save_pretrained(tmp)
        twins = {impl: (getattr(M, head).from_pretrained(tmp), E)
                 for impl, M, E in (("torch", MT, ET), ("mlx", MM, EM)) if impl in impls}
    hf.to(ET.DEVICE)
    batch = make_batch(head, config, B, T, np.random.default_rng(0))
    hf_batch = {k: torch.from_numpy(v).long().to(ET.DEVICE) for k, v in batch.items() if k != "masked_positions"}
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    parts = micro_batches(batch, 0, 1, 1)
    steps = {}
    if "hf" in impls and train:
        hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-5, weight_decay=0.01)
        hf.train()

        def hf_step():
            with ET.autocast():  # bf16 on a GPU, as the torch twin (HF's --bf16)
                loss = hf(**hf_batch).loss
            loss.backward()
            hf_opt.step()
            hf_opt.zero_grad(set_to_none=True)
        steps["hf"] = hf_step
    elif "hf" in impls:
        hf.eval()
        hf_inputs = {k: torch.from_numpy(v).long().to(ET.DEVICE) for k, v in inputs.items()}

        def hf_step():
            with torch.inference_mode(), ET.autocast():
                return {k: v.cpu() for k, v in hf(**hf_inputs).items()}  # to the host, as the twins' predict
        steps["hf"] = hf_step
    for impl, (twin, E) in twins.items():
        if impl == "torch":
            ET.prepare(twin)
        elif MLX_GPU:
            twin.set_dtype(mx.bfloat16)
        if compile_twins and impl == "torch":
            E.compile(twin)
        if train:
            opt = E.AdamW(twin)
            steps[impl] = lambda E=E, twin=twin, opt=opt: E.train_step(twin, opt, parts, 1e-5, 1.0, 0)
        else:
            steps[impl] = lambda E=E, twin=twin: E.predict(twin, inputs)
    n_masked = int((batch["labels"] != -100).sum()) if head == "BertForMaskedLM" else 0
    flops = {impl: matmul_flops(head, config, B, T, n_masked, train, dense_head=impl == "hf") for impl in steps}
    return steps, flops, B * T


def restart_peak_rss():
    """Count peak RSS (VmHWM) afresh from here, from what the built models hold. Building a
    workload holds HF's model, its saved state and a twin at once (the twins load from HF's
    file), and the twins' allocator setting (training.keep_freed_memory) keeps the freed
    memory: hand it back (glibc's malloc_trim) and restart the count (Linux's clear_refs),
    so the peak is the work's, not the benchmark's. Elsewhere the peak includes building."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except (OSError, AttributeError):
        pass


def time_workload(name, repeats, warmup, compile_twins, impls):
    steps, flops, tokens = build(name, compile_twins, impls)
    restart_peak_rss()  # peak RSS (--alone) counts the steps from here
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {impl: [] for impl in steps}
    for _ in range(repeats):
        for impl, step in steps.items():  # interleaved: machine noise hits all alike
            t = time.perf_counter()
            step()
            sync()
            times[impl].append(time.perf_counter() - t)
    gpu_mib = {impl: step_gpu_memory(impl, step) for impl, step in steps.items()} if CUDA else {}
    return times, flops, tokens, gpu_mib


def step_gpu_memory(impl, step):
    """MiB of GPU memory one more step takes at its peak above what was allocated before it
    (activations, gradients, temporaries; not the weights and optimizer state it keeps)."""
    if impl == "mlx":
        if not MLX_GPU:
            return None
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        step()
        return (mx.get_peak_memory() - before) / 2 ** 20
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    sync()
    return (torch.cuda.max_memory_allocated() - before) / 2 ** 20


ALONE = """
import json, statistics
import bench
times, _, _, _ = bench.time_workload({name!r}, {repeats}, {warmup}, {compile_twins}, [{impl!r}])
print(json.dumps({{"peak_rss_mib": bench.peak_rss_mb(), "alone_s": statistics.median(times[{impl!r}])}}))
"""


def alone(name, impl, compile_twins, warmup, repeats):
    """{peak_rss_mib, alone_s (median step)} of a fresh process running only `impl` on `name`,
    as its users run it: HF with glibc's default allocator, the twins with the setting their
    engines make (training.keep_freed_memory), which in this process all three share."""
    code = ALONE.format(name=name, impl=impl, compile_twins=compile_twins, warmup=warmup, repeats=repeats)
    env = {**os.environ, "NANOBERT_KEEP_FREED_MEMORY": "0" if impl == "hf" else "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(__file__) or ".")
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def profile(name, impl, compile_twins, rows=12):
    """torch.profiler over 3 steps of `impl` (hf or torch) on `name`: the ops that take the time."""
    steps, _, _ = build(name, compile_twins, impls=[impl])
    for _ in range(2):  # warm-up
        steps[impl]()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    steps[impl]()
    unprofiled = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            steps[impl]()
    profiled = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults - unprofiled) / 3
    print(f"--- {name} {impl}: top ops by self CPU time (3 steps)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    # Profiling can cost the heap reuse of training.keep_freed_memory: big tensors then get
    # fresh pages, and their ops' times include the kernel zeroing them (README, Speed).
    print(f"minor page faults per step: {unprofiled:,} unprofiled, {profiled:,.0f} profiled")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {', '.join(WORKLOADS)}")
    parser.add_argument("--impls", default="hf,torch,mlx", help="comma-separated, of hf (always timed: the "
                        "ratios' reference), torch, mlx")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the torch twin (the MLX twin's training step is always mx.compile'd)")
    parser.add_argument("--alone", action="store_true",
                        help="also run each implementation alone in a fresh process, as its users run it: peak RSS, "
                             "step time, ratio to HF alone")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--profile", choices=["hf", "torch"], help="instead: torch.profiler tables of one implementation")
    args = parser.parse_args()
    names = args.workloads.split(",")
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        sys.exit(f"bench.py: error: unknown workload(s) {unknown}; known: {', '.join(WORKLOADS)}")
    requested = args.impls.split(",")
    impls = ["hf"] + [i for i in ("torch", "mlx") if i in requested]
    if set(requested) - {"hf", "torch", "mlx"}:
        sys.exit(f"bench.py: error: unknown implementation(s) in --impls {args.impls}; known: hf, torch, mlx")
    if args.profile:
        for name in names:
            profile(name, args.profile, args.compile)
        return
    if args.alone and CUDA:
        sys.exit("bench.py: error: --alone measures CPU processes (RSS); on a GPU the table gives step memory")
    info = run_info()  # the code as it was when the run began
    peaks = {"torch": gemm_peak("torch"), "mlx": gemm_peak("mlx")}
    if torch_cpu.ONEDNN and not CUDA:
        peaks["onednn"] = gemm_peak("onednn")
    # each implementation's MFU against the GEMM its Linears run: HF torch's matmul, the torch
    # twin oneDNN's where it uses it, the MLX twin MLX's matmul
    impl_peak = {"hf": peaks["torch"], "torch": peaks.get("onednn", peaks["torch"]), "mlx": peaks["mlx"]}
    gpu = f"{torch.cuda.get_device_name()}, bf16 (torch: autocast; MLX: {mx.default_device()}), " if CUDA else ""
    cpu = cpu_vendor_and_model()[1]
    linears = "oneDNN" if torch_cpu.ONEDNN else torch.backends.cpu.get_cpu_capability() + " " + (
        "MKL" if torch.backends.mkl.is_available() else "BLAS")
    attention = "attention_cpu.c" if not CUDA and torch_cpu.fused_attention_available() else "SDPA"
    mlx_attention = ("attention_mlx.cpp" if mlx_cpu.on_fused_attention(mx.zeros((1, 1, 1))) else "spelled out") \
        if mlx_cpu.FAST else "mx.fast"
    machine = f"{gpu}{cpu} ({platform.machine()}), {os.cpu_count()} cores, {platform.system()}; torch " \
              f"{torch.__version__} ({torch.get_num_threads()} threads, the twin's Linears on {linears}, its inference " \
              f"attention {attention}), mlx " \
              f"{mx.__version__} (BLAS: {mlx_cpu.loaded_blas()}{blas_kernels()}, {len(EM.STREAMS)} streams, " \
              f"kernels built with {mlx_cpu.jit_flags() or 'no -m flags'}, inference attention {mlx_attention}, " \
              f"training step {'compiled' if EM.COMPILE else 'eager'}), transformers {transformers.__version__}"
    print(f"machine: {machine}\nGEMM peak ({'8192^3 bf16' if CUDA else '2048^3 fp32'}): "
          f"torch {peaks['torch']:.0f} GFLOP/s, "
          + (f"oneDNN (the torch twin's Linears) {peaks['onednn']:.0f} GFLOP/s, " if "onednn" in peaks else "")
          + f"MLX {peaks['mlx']:.0f} GFLOP/s")
    print(f"{'workload':10s} {'impl':6s} {'median s':>9s} {'spread s':>15s} {'tokens/s':>9s} {'vs HF':>6s} {'MFU':>5s}"
          + (f" {'peak RSS MiB':>12s} {'alone s':>8s} {'vs HF':>6s}" if args.alone else "")
          + (f" {'step GPU MiB':>12s}" if CUDA else ""))
    results = []
    for name in names:
        times, flops, tokens, gpu_mib = time_workload(name, args.repeats, args.warmup, args.compile, impls)
        hf_rate = tokens / statistics.median(times["hf"])
        for impl, ts in times.items():
            med = statistics.median(ts)
            peak = impl_peak[impl]
            row = {"workload": name, "impl": impl, "median_s": med, "min_s": min(ts), "max_s": max(ts),
                   "tokens_per_s": tokens / med, "vs_hf": tokens / med / hf_rate,
                   "mfu": flops[impl] / med / (peak * 1e9),
                   "compiled": {"hf": False, "torch": args.compile, "mlx": EM.COMPILE and WORKLOADS[name][4]}[impl]}
            if CUDA:
                row["step_gpu_mib"] = gpu_mib[impl]
            if args.alone:
                row.update(alone(name, impl, args.compile, args.warmup, args.repeats))
                if impl == "hf":  # the first of each workload
                    hf_alone = row["alone_s"]
                row["alone_vs_hf"] = hf_alone / row["alone_s"]
            results.append(row)
            print(f"{name:10s} {impl:6s} {med:9.3f} {row['min_s']:7.3f}-{row['max_s']:<7.3f} {row['tokens_per_s']:9.0f} "
                  f"{row['vs_hf']:6.2f} {100 * row['mfu']:4.0f}%"
                  + (f" {row['peak_rss_mib']:12.0f} {row['alone_s']:8.3f} {row['alone_vs_hf']:6.2f}" if args.alone else "")
                  + (f" {'-' if row['step_gpu_mib'] is None else round(row['step_gpu_mib']):>12}" if CUDA else ""),
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**info, "machine": machine, "gpu": torch.cuda.get_device_name() if CUDA else None,
                       "torch_linears": "F.linear (cuBLAS)" if CUDA else linears, "torch_attention": attention,
                       "mlx_attention": mlx_attention,
                       "mlx_blas": mlx_cpu.loaded_blas(),
                       "mlx_blas_kernels": blas_kernels().strip(" ()"), "mlx_jit_flags": mlx_cpu.jit_flags(),
                       "gemm_peak_gflops": peaks, "repeats": args.repeats, "results": results,
                       "peak_rss_of_this_process_mib": peak_rss_mb()}, f, indent=1)


if __name__ == "__main__":
    main()
