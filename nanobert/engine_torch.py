"""One training step, evaluation and DDP wiring in PyTorch: the torch twin of engine_mlx.py.

The training scripts are backend-agnostic; they call these few functions. DDP is wired
by hand rather than with DistributedDataParallel, so it reads the same in both twins:
broadcast the weights once, then sum the gradients across processes once per step.
"""

import os

import numpy as np
import torch
import torch.distributed as dist

from nanobert.optim_torch import AdamW, clip_grad_norm  # noqa: F401  (AdamW: the scripts use E.AdamW)
from nanobert.training import keep_freed_memory, micro_batches, n_items, round_up

keep_freed_memory()  # CPU tensors reuse freed heap memory instead of page-faulting in fresh pages
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# On a GPU the forward pass runs under bf16 autocast (matmuls in bf16 on the tensor cores;
# softmax, LayerNorm, losses, weights, gradients and AdamW stay fp32), as HF's `--bf16`.
# On a CPU, fp32: bf16 matmuls there are ~400x slower (measured on the 2-core reference machine).
AUTOCAST_DTYPE = torch.bfloat16 if DEVICE == "cuda" else None
PAD_MULTIPLE = 1  # eager torch runs any batch shape as fast: pad T to the longest row only (engine_mlx: 8)
# predict runs at most this many tokens at once: a smaller piece holds smaller activations
# (the FFN's B x T x 4H floats). QA inference, B16 T384 -> chunks of 6, 5 and 5 rows: peak
# RSS alone 637-658 (two chunks of 8 rows) -> 605 MiB (HF 641-648) on an AMD Zen 4, as fast
# (0.886 vs 0.881 s, same process, interleaved, median of 12; 4 rows: 4% slower). engine_mlx's
# is smaller: its pieces run side by side, one per stream. On a GPU the rows run at once:
# there launching kernels bounds these shapes, and a chunk launches as many as the whole batch.
PREDICT_TOKENS = 2304  # 6 rows of 384


def init_distributed():
    """(rank, world size). Under `torchrun --nproc_per_node N` (WORLD_SIZE > 1) join the
    process group: gloo on CPU, nccl on GPU. torchrun already gives each process
    OMP_NUM_THREADS=1, so N processes share the cores instead of fighting over them."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def finish_distributed():
    """After training: leave the group together. The barrier keeps a process from exiting
    while another still works; destroying the group stops gloo's threads before exit
    (a process exiting with them alive can abort: "terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def prepare(model):
    """Move the model to the device; with several processes, copy rank 0's weights to all
    (a newly initialised head must start identical everywhere)."""
    model.to(DEVICE)
    if dist.is_initialized():
        with torch.no_grad():
            for p in model.parameters():
                dist.broadcast(p, src=0)
    return model


def seed(seed):
    """Seed the framework RNG (weight init of new heads and LoRA adapters, dropout)."""
    torch.manual_seed(seed)


def compile(model):
    """torch.compile the model's forward in place (state-dict names unchanged); new batch
    shapes trigger a recompile, marked dynamic after the first."""
    model.compile()


def autocast():
    """The context the forward pass runs in: bf16 autocast on a GPU, nothing on a CPU."""
    return torch.autocast(DEVICE, dtype=AUTOCAST_DTYPE, enabled=AUTOCAST_DTYPE is not None)


def tensors(batch):
    """numpy batch -> tensors on the device. An attention mask of all ones (no padding) is
    left out: it changes nothing, and without one SDPA may run flash attention (HF drops it too)."""
    return {k: torch.from_numpy(v).to(DEVICE) for k, v in batch.items() if not (k == "attention_mask" and v.all())}


def all_sum(x):
    """Sum a Python number over all processes."""
    if not dist.is_initialized():
        return x
    t = torch.tensor([x], dtype=torch.float64, device=DEVICE)
    dist.all_reduce(t)
    return t.item()


def train_step(model, opt, micro_batches, lr, grad_clip, seed):
    """One optimizer step over this process's micro-batches. Returns (loss, grad norm).

    Each micro-batch's mean loss is weighted by its share of the loss terms of the whole
    global batch (all micro-batches, all processes): summed gradients then equal those of
    one big batch exactly, for MLM too, where micro-batches hold different numbers of
    masked tokens. `seed` fixes this step's dropout, so a resumed run repeats it exactly.
    """
    model.train()
    torch.manual_seed(seed)
    counts = [n_items(b) for b in micro_batches]
    total = all_sum(sum(counts))
    loss = torch.zeros((), device=DEVICE)
    for batch, n in zip(micro_batches, counts):
        if n:
            with autocast():
                part = model(**tensors(batch)).loss * (n / total)
            part.backward()  # gradients add up in .grad across micro-batches
            loss += part.detach()
    if dist.is_initialized():
        # Sum gradients across processes once, after the last micro-batch: the sum is
        # linear, so reducing every micro-step would send grad_accum times the bytes for
        # the same result (DistributedDataParallel's no_sync() exists for this reason).
        grads = [p.grad for p in opt.params.values() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(chunk.view_as(g))
    norm = clip_grad_norm(model, grad_clip)
    opt.step(lr)
    opt.zero_grad()
    return all_sum(loss.item()), norm.item()  # read after the update: one wait for the GPU per step


@torch.no_grad()
def predict(model, batch):
    """Eval-mode forward (no dropout, no autograd graph) -> {output name: numpy array}.
    Without targets (no loss) every output is per row, so on a CPU the rows run in chunks of
    at most PREDICT_TOKENS tokens, each chunk's activations freed before the next one's."""
    model.eval()
    if {"labels", "start_positions"} & batch.keys():
        chunks = [batch]
    else:
        B, T = batch["input_ids"].shape
        rows = max(1, PREDICT_TOKENS // T) if DEVICE == "cpu" else B  # at most, per chunk
        chunks = micro_batches(batch, 0, 1, round_up(B, rows) // rows, trim=False)
    outs = []
    for chunk in chunks:
        with autocast():
            out = model(**tensors(chunk))
        outs.append({k: v.float().cpu().numpy() for k, v in out._asdict().items() if isinstance(v, torch.Tensor)})
    return outs[0] if len(outs) == 1 else {k: np.concatenate([out[k] for out in outs]) for k in outs[0]}

