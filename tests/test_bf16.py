"""bf16, as the twins run on a GPU (bench.py there): the torch twin under bf16 autocast and the
MLX twin with bf16 weights, checked on a CPU on a tiny model against the same model in fp32."""

import numpy as np

from tiny import tiny_config
from nanobert import mlx_cpu
from nanobert.training import micro_batches

B, T = 4, 12


def qa_batch(vocab_size, rng):
    return {"input_ids": rng.integers(5, vocab_size, (B, T)).astype(np.int32),
            "attention_mask": np.ones((B, T), np.int32), "token_type_ids": np.zeros((B, T), np.int32),
            "start_positions": rng.integers(0, T, B).astype(np.int32),
            "end_positions": rng.integers(0, T, B).astype(np.int32)}


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_torch_twin_under_bf16_autocast_matches_fp32():
    """Autocast runs the matmuls in bf16 and keeps softmax, LayerNorm and the loss in fp32:
    the logits stay within bf16 rounding of fp32's, the weights' gradients are fp32. The
    engine turns autocast on on a GPU only (bf16 is the slow path on a CPU)."""
    import torch
    import nanobert.engine_torch as ET
    from nanobert import model_torch as MT
    torch.manual_seed(0)
    config = tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = MT.BertForQuestionAnswering(config).init_weights()
    batch = {k: torch.from_numpy(v).long() for k, v in qa_batch(config.vocab_size, np.random.default_rng(0)).items()}
    fp32 = model(**batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(**batch)
    assert bf16.start_logits.dtype == torch.bfloat16 and bf16.loss.dtype == torch.float32
    assert rel_err(bf16.start_logits.float().detach().numpy(), fp32.start_logits.detach().numpy()) < 2e-2
    assert abs(bf16.loss.item() - fp32.loss.item()) < 2e-2 * fp32.loss.item()
    bf16.loss.backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())
    assert ET.autocast()._enabled == (ET.DEVICE == "cuda")


def test_mlx_twin_in_bf16_trains_and_predicts_in_bf16(monkeypatch):
    """The MLX twin on a GPU holds bf16 weights: AdamW keeps weights and moments bf16 (its
    step sizes are fp32 arrays, which would promote them), the loss follows fp32's, and
    predict hands back fp32 numpy (numpy has no bf16). Run on the GPU's code path: MLX's
    own softmax / GELU / logsumexp (mlx_cpu's fp32 kernels are CPU-only)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    import nanobert.engine_mlx as EM
    from nanobert import model_mlx as MM
    monkeypatch.setattr(mlx_cpu, "FAST", False)
    config = tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    batch = qa_batch(config.vocab_size, np.random.default_rng(0))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    runs = {}
    for dtype in (mx.float32, mx.bfloat16):
        mx.random.seed(0)
        model = MM.BertForQuestionAnswering(config)
        model.set_dtype(dtype)
        opt = EM.AdamW(model)
        losses = [EM.train_step(model, opt, micro_batches(batch, 0, 1, 1), 1e-2, 1.0, step)[0] for step in range(3)]
        kept = [v.dtype for _, v in tree_flatten(model.parameters())] + [*opt.exp_avg.values(), *opt.exp_avg_sq.values()]
        assert all((v if isinstance(v, mx.Dtype) else v.dtype) == dtype for v in kept)
        runs[dtype] = losses, EM.predict(model, inputs)
    (losses32, out32), (losses16, out16) = runs[mx.float32], runs[mx.bfloat16]
    assert losses16[-1] < losses16[0]  # it learns
    assert np.allclose(losses16, losses32, rtol=3e-2)
    assert out16["start_logits"].dtype == np.float32
    assert rel_err(out16["start_logits"], out32["start_logits"]) < 5e-2
