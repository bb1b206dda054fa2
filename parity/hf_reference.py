"""Helpers of the parity suite: HF reference models, the twins, and the tolerances.

Tolerances (absolute, fp32), stated once and used by every parity test:
- torch twin vs HF: 1e-5. Same framework, same kernels: differences come only from a
  different but equivalent order of float operations (e.g. SDPA vs HF's attention path).
  In practice most outputs agree bit-for-bit.
- MLX twin vs HF: 1e-4. Another framework on another BLAS: each matmul rounds
  differently (~1e-7 relative per op); over several layers, LayerNorms and a softmax
  that grows to ~1e-6..1e-5 on activations of order 1-10, and gradients (sums over the
  batch) grow a little more. 1e-4 leaves headroom while a real bug (LayerNorm eps 1e-5
  instead of 1e-12, tanh instead of erf GELU, a missing mask) is caught: see
  test_models.py::test_parity_catches_*.
"""

import numpy as np
import torch
import transformers

import nanobert.model_mlx as M
import nanobert.model_torch as T

# Max abs difference to HF. Both twins' matmuls sum in another order than HF's (torch's
# own matmul, MKL): the torch twin's Linears run on oneDNN on an x86 CPU (torch_cpu.linear),
# MLX's on OpenBLAS on Linux, and MLX's Linux-CPU GELU (mlx_cpu: a rational erf, as accurate
# as torch's fp32 GELU but not bit-equal to it) differs by an ulp or so. On the real MiniLM
# checkpoint (values up to 10.5) that grows by layer 5 to 9.2e-5 (torch twin), 9.9e-5 (MLX),
# 1.25e-4 (MLX with the rational GELU). Bugs the suite must catch are 100x larger
# (test_parity_catches_bugs: 1.3e-2, 4.8e-2).
TOL = {"torch": 2e-4, "mlx": 2e-4}
HEADS = ("BertForMaskedLM", "BertForSequenceClassification", "BertForTokenClassification", "BertForQuestionAnswering")
TWINS = {"torch": T, "mlx": M}

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


def hf_model(head, config, seed=0):
    """A randomly initialised HF reference model (eval mode: no dropout)."""
    torch.manual_seed(seed)
    return getattr(transformers, head)(config).eval()


def hf_config(**kw):
    base = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                max_position_embeddings=64, type_vocab_size=2, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
    return transformers.BertConfig(**{**base, **kw})


def load_twin(backend, head, path):
    model = getattr(TWINS[backend], head).from_pretrained(str(path))
    model.eval()
    return model


def to_backend(backend, batch):
    if backend == "torch":
        return {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
    import mlx.core as mx
    return {k: mx.array(np.asarray(v)) for k, v in batch.items()}


def numpy(x):
    """A torch tensor or MLX array as numpy; bf16 as fp32 (numpy has no bf16)."""
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy() if x.dtype == torch.bfloat16 else x.detach().cpu().numpy()
    import mlx.core as mx
    return np.array(x.astype(mx.float32) if x.dtype == mx.bfloat16 else x)


def twin_forward_and_grads(backend, model, batch):
    """(Output with numpy fields, {param name: numpy grad}) for one forward + backward."""
    inputs = to_backend(backend, batch)
    if backend == "torch":
        model.zero_grad()
        out = model(**inputs, output_hidden_states=True)
        out.loss.backward()
        grads = {k: numpy(p.grad) for k, p in model.named_parameters() if p.grad is not None}
    else:
        import mlx.core as mx
        import mlx.nn as nn
        from mlx.utils import tree_flatten
        captured = {}

        def loss_fn(m):
            captured["out"] = m(**inputs, output_hidden_states=True)
            return captured["out"].loss
        _, g = nn.value_and_grad(model, loss_fn)(model)
        out = captured["out"]
        mx.eval(g)
        grads = {k: numpy(v) for k, v in tree_flatten(g)}
    out = out._replace(**{f: ([numpy(h) for h in v] if isinstance(v, list) else numpy(v))
                          for f, v in out._asdict().items() if v is not None})
    return out, grads


def hf_forward_and_grads(model, batch):
    inputs = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
    inputs = {k: v.long() if not v.is_floating_point() else v for k, v in inputs.items()}
    model.zero_grad()
    out = model(**inputs, output_hidden_states=True)
    out.loss.backward()
    grads = {k: p.grad.numpy() for k, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_close(a, b, tol, what):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, f"{what}: shape {a.shape} vs {b.shape}"
    err = float(np.abs(a - b).max()) if a.size else 0.0
    assert err <= tol, f"{what}: max abs difference {err:.3g} > {tol}"


CLS, SEP = 2, 3  # ids used as [CLS]/[SEP] in the random vocabularies


def random_batch(rng, head, config, B, T, min_len=2):
    """Token ids with [CLS] ... [SEP] then padding, random lengths (>= 2: a row may hold only
    [CLS][SEP]), token types switching inside each row, and labels for the head."""
    lengths = rng.integers(min_len, T + 1, B)
    lengths[0] = T  # one full row, so the batch really is T long
    ids = rng.integers(5, config.vocab_size, (B, T)).astype(np.int32)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    ids[:, 0] = CLS
    ids[np.arange(B), lengths - 1] = SEP
    ids[mask == 0] = config.pad_token_id
    types = ((np.arange(T)[None] >= rng.integers(1, T + 1, (B, 1))) & (mask == 1)).astype(np.int32)
    batch = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
    if head == "BertForMaskedLM":
        labels = np.where((rng.random((B, T)) < 0.3) & (mask == 1), ids, -100).astype(np.int32)
        labels[0, 1] = ids[0, 1]  # at least one target, else the loss is 0/0 (NaN, in HF too)
        batch["labels"] = labels
    elif head == "BertForSequenceClassification":
        batch["labels"] = rng.integers(0, config.num_labels, B).astype(np.int32)
    elif head == "BertForTokenClassification":
        # a tag on some real tokens (as on a word's first WordPiece), -100 on the others
        tagged = (rng.random((B, T)) < 0.6) & (mask == 1) & (ids != CLS) & (ids != SEP)
        tagged[0, 1] = True  # at least one, else the loss is 0/0
        batch["labels"] = np.where(tagged, rng.integers(0, config.num_labels, (B, T)), -100).astype(np.int32)
    else:
        # Positions beyond T are clamped to T and ignored (HF's rule): keep one in range.
        batch["start_positions"] = rng.integers(0, T + 3, B).astype(np.int32)
        batch["end_positions"] = rng.integers(0, T + 3, B).astype(np.int32)
        batch["start_positions"][0] = batch["end_positions"][0] = T - 1
    return batch
