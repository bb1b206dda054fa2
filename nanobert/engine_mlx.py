"""One training step, evaluation and DDP wiring in MLX: the MLX twin of engine_torch.py.

The training scripts are backend-agnostic; they call these few functions. MLX computes
lazily: nothing runs until `mx.eval`, so each step ends by evaluating the new weights and
optimizer state (else the graph of every step would pile up). Under
`mlx.launch -n N --backend ring`, processes talk through mx.distributed: broadcast the
weights once, then sum the gradients across processes once per step.
"""

import os

import numpy as np

from nanobert import mlx_cpu  # first: a fast BLAS for MLX on Linux (see mlx_cpu.py)

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402

from nanobert.optim_mlx import AdamW, clip_grad_norm  # noqa: E402,F401  (AdamW: the scripts use E.AdamW)
from nanobert import training  # noqa: E402
from nanobert.training import keep_freed_memory, launched_world_size, n_items  # noqa: E402

keep_freed_memory()  # MLX arrays reuse freed heap memory instead of page-faulting in fresh pages

GROUP = None  # the mx.distributed group, once init_distributed() ran under a launcher
# train_step mx.compiles the loss-and-gradient function: MLX then fuses chains of elementwise
# ops (softmax, GELU, dropout, LayerNorm and their backward passes) into single kernels, where
# eager MLX runs each op as its own pass over memory. On a Linux CPU that makes a step 1.3-2x
# faster. Every new batch shape traces and compiles again (~1 s), so the training data code
# pads T to a multiple of PAD_MULTIPLE to keep the shapes few. NANOBERT_MLX_COMPILE=0: eager.
COMPILE = os.environ.get("NANOBERT_MLX_COMPILE", "1") != "0"
PAD_MULTIPLE = 8 if COMPILE else 1
# MLX's CPU backend runs each op on one thread, its stream's: one stream per core, each given
# a slice of the batch's rows, puts every core to work (mlx_cpu.py, fix 4; one stream on a GPU).
STREAMS = mlx_cpu.STREAMS
# predict runs at most this many tokens per stream at once: smaller pieces hold smaller
# attention scores (B x heads x T x T floats). QA inference, B16 T384 on two streams, 8 rows
# per stream -> 2: peak RSS 1,416 -> 713 MiB, 1.14 -> 1.09 s.
PREDICT_TOKENS = 1024


def init_distributed():
    """(rank, world size). Under mlx.launch (its hostfile names the processes) join the group."""
    global GROUP
    if launched_world_size() > 1 and GROUP is None:
        GROUP = mx.distributed.init(strict=True)
    return (GROUP.rank(), GROUP.size()) if GROUP is not None else (0, 1)


def finish_distributed():
    """After training: leave the group together. An all_sum is the barrier that keeps a
    process from exiting while another still works (mx.distributed has no explicit teardown)."""
    all_sum(0)


def prepare(model):
    """With several processes, copy rank 0's weights to all (a newly initialised head must
    start identical everywhere). mx.distributed has no broadcast: sum rank 0's weights
    with zeros from the others."""
    if GROUP is not None:
        keep = GROUP.rank() == 0
        params = tree_flatten(model.parameters())
        model.update(tree_unflatten([(k, mx.distributed.all_sum(v if keep else mx.zeros_like(v), group=GROUP))
                                     for k, v in params]))
    mx.eval(model.parameters())
    return model


def seed(seed):
    """Seed the framework RNG (weight init of new heads and LoRA adapters, dropout)."""
    mx.random.seed(seed)


def loss_and_grad(model):
    """(batch, weight) -> (weight * mean loss, gradients of the trainable parameters); with
    COMPILE, mx.compile'd once per model (kept on the model). The compiled function reads and
    writes the model's parameters and the RNG (dropout), so those are declared as its state."""
    compiled = getattr(model, "_compiled_loss_and_grad", None)
    if compiled is not None:
        return compiled
    fun = nn.value_and_grad(model, lambda batch, weight: model(**batch).loss * weight)
    if not COMPILE:
        return fun
    state = [model.state, mx.random.state]
    model._compiled_loss_and_grad = mx.compile(fun, inputs=state, outputs=state)
    return model._compiled_loss_and_grad


def tensors(batch):
    """numpy batch -> arrays. An attention mask of all ones (no padding) is left out: it
    changes nothing, and costs an add over every attention score."""
    return {k: mx.array(v) for k, v in batch.items() if not (k == "attention_mask" and v.all())}


def all_sum(x):
    """Sum a Python number over all processes."""
    if GROUP is None:
        return x
    return mx.distributed.all_sum(mx.array(x, dtype=mx.float32), group=GROUP).item()


def train_step(model, opt, micro_batches, lr, grad_clip, seed):
    """One optimizer step over this process's micro-batches. Returns (loss, grad norm).

    Each micro-batch's mean loss is weighted by its share of the loss terms of the whole
    global batch (all micro-batches, all processes): summed gradients then equal those of
    one big batch exactly, for MLM too, where micro-batches hold different numbers of
    masked tokens. `seed` fixes this step's dropout, so a resumed run repeats it exactly.
    The rows of a micro-batch are split over STREAMS the same way (shards), and their
    forward and backward passes run at the same time, one per stream.
    """
    model.train()
    mx.random.seed(seed)
    step = loss_and_grad(model)
    counts = [n_items(b) for b in micro_batches]
    total = all_sum(sum(counts))
    grads, loss = None, mx.array(0.0)
    for batch, n in zip(micro_batches, counts):
        if n:
            for shard, stream in zip(training.micro_batches(batch, 0, 1, len(STREAMS), trim=False), STREAMS):
                if n_shard := n_items(shard):
                    with mx.stream(stream):  # this shard's graph, backward included, runs on `stream`
                        part, g = step(tensors(shard), mx.array(n_shard / total))
                    g = dict(tree_flatten(g))
                    grads = g if grads is None else {k: grads[k] + g[k] for k in grads}
                    loss = loss + part
            # MLX frees an array, or computes a result into its memory, once nothing refers to
            # it: holding the last shard's gradients in `g` would keep a model's worth of memory
            # to the end of the step (bert-base MLM: peak 2,645 -> 2,274 MiB with both `del`s)
            del g
            mx.eval(grads, loss)  # one micro-batch's graph at a time (its shards at once), not all of them
    if GROUP is not None:
        # Sum gradients across processes once, after the last micro-batch: the sum is
        # linear, so reducing every micro-step would send grad_accum times the bytes for
        # the same result.
        flat = mx.distributed.all_sum(mx.concatenate([g.reshape(-1) for g in grads.values()]), group=GROUP)
        sizes = [g.size for g in grads.values()]
        chunks = mx.split(flat, [sum(sizes[:i + 1]) for i in range(len(sizes) - 1)])
        grads = {k: c.reshape(g.shape) for (k, g), c in zip(grads.items(), chunks)}
    grads, norm = clip_grad_norm(grads, grad_clip)
    opt.step(grads, lr)
    del grads  # as `g` above: each parameter's update may now free its gradient
    mx.eval(model.parameters(), opt.exp_avg, opt.exp_avg_sq, norm)
    return all_sum(loss.item()), norm.item()


def predict(model, batch):
    """Eval-mode forward (no dropout; MLX builds no autograd graph unless asked) -> {name: numpy}.
    Without targets (no loss) every output is per row, so on a Linux CPU the rows are split
    into shards of at most PREDICT_TOKENS tokens, run a wave at a time, one shard per stream."""
    model.eval()
    if {"labels", "start_positions"} & batch.keys():
        waves = [[batch]]
    else:
        B, T = batch["input_ids"].shape
        rows = max(1, PREDICT_TOKENS // T) if mlx_cpu.FAST else B  # at most, per shard
        n = training.round_up(B, len(STREAMS) * rows) // rows  # a multiple of len(STREAMS): full waves
        shards = training.micro_batches(batch, 0, 1, n, trim=False)
        waves = [shards[i:i + len(STREAMS)] for i in range(0, len(shards), len(STREAMS))]
    outs = []
    for wave in waves:
        arrays = []
        for shard, stream in zip(wave, STREAMS):
            with mx.stream(stream):
                out = model(**tensors(shard))
            arrays.append({k: v for k, v in out._asdict().items() if isinstance(v, mx.array)})
        mx.eval(arrays)  # the wave's shards at once, each on its stream
        outs += [{k: np.array(v.astype(mx.float32)) for k, v in a.items()} for a in arrays]  # numpy has no bf16
    return outs[0] if len(outs) == 1 else {k: np.concatenate([out[k] for out in outs]) for k in outs[0]}
