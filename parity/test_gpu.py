"""On a CUDA GPU, in bf16 as bench.py runs there: the torch twin under engine_torch's autocast
matches HF under the same autocast, and the MLX twin with bf16 weights (when MLX sees the GPU:
mlx[cuda]) matches HF in fp32, outputs, loss and every gradient, to bf16's precision. These
need a GPU and skip, saying so, on a machine without one (the fp32 parity of test_models.py
holds everywhere)."""

import numpy as np
import pytest
import torch

from hf_reference import HEADS, hf_config, hf_model, load_twin, random_batch, twin_forward_and_grads

import nanobert.engine_torch as ET

pytestmark = pytest.mark.skipif(ET.DEVICE != "cuda", reason="needs a CUDA GPU (the bf16 path of engine_torch)")
OUTPUT = {"BertForMaskedLM": "logits", "BertForSequenceClassification": "logits",
          "BertForTokenClassification": "logits", "BertForQuestionAnswering": "start_logits"}


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def hf_on_gpu(head, config, batch, tmp_path, autocast):
    """HF's (output, loss, {name: grad}) as numpy, run on the GPU; its weights saved to tmp_path."""
    hf = hf_model(head, config)
    hf.save_pretrained(tmp_path)
    hf.to("cuda")
    with ET.autocast() if autocast else torch.autocast("cuda", enabled=False):
        out = hf(**{k: torch.from_numpy(v).long().cuda() for k, v in batch.items()})
    out.loss.backward()
    grads = {k: p.grad.float().cpu().numpy() for k, p in hf.named_parameters() if p.grad is not None}
    return out[OUTPUT[head]].float().detach().cpu().numpy(), out.loss.item(), grads


def nonzero(grads):
    """The gradients to compare: not those that are 0 in exact arithmetic, where all
    implementations give rounding noise (key biases: softmax ignores a constant added to a row
    of scores; QA's last LayerNorm bias: likewise for the logits over positions)."""
    largest = max(np.linalg.norm(g) for g in grads.values())
    return {k: g for k, g in grads.items() if np.linalg.norm(g) > 1e-5 * largest}


@pytest.mark.parametrize("head", HEADS)
def test_torch_twin_in_bf16_autocast_matches_hf_in_bf16_autocast(head, tmp_path):
    config = hf_config(hidden_size=64, intermediate_size=128)
    batch = random_batch(np.random.default_rng(0), head, config, B=4, T=32)
    ref, ref_loss, ref_grads = hf_on_gpu(head, config, batch, tmp_path, autocast=True)
    twin = ET.prepare(load_twin("torch", head, tmp_path))
    with ET.autocast():
        out = twin(**ET.tensors({k: v.astype(np.int64) for k, v in batch.items()}))
    assert ET.autocast()._enabled and getattr(out, OUTPUT[head]).dtype == torch.bfloat16
    out.loss.backward()
    assert rel_err(getattr(out, OUTPUT[head]).float().detach().cpu().numpy(), ref) < 1e-2
    assert abs(out.loss.item() - ref_loss) < 1e-2 * abs(ref_loss)
    params = dict(twin.named_parameters())
    for name, ref_grad in nonzero(ref_grads).items():
        p = params[name]
        assert p.grad.dtype == torch.float32 and rel_err(p.grad.cpu().numpy(), ref_grad) < 5e-2, name


@pytest.mark.parametrize("head", HEADS)
def test_mlx_twin_in_bf16_on_gpu_matches_hf(head, tmp_path):
    mx = pytest.importorskip("mlx.core")
    if mx.default_device() != mx.gpu:
        pytest.skip("MLX sees no GPU (install mlx[cuda13] or mlx[cuda12])")
    from mlx.utils import tree_flatten
    config = hf_config(hidden_size=64, intermediate_size=128)
    batch = random_batch(np.random.default_rng(0), head, config, B=4, T=32)
    ref, ref_loss, ref_grads = hf_on_gpu(head, config, batch, tmp_path, autocast=False)
    twin = load_twin("mlx", head, tmp_path)
    twin.set_dtype(mx.bfloat16)
    assert all(p.dtype == mx.bfloat16 for _, p in tree_flatten(twin.parameters()))
    out, grads = twin_forward_and_grads("mlx", twin, batch)  # bf16 arrays, as fp32 numpy
    assert rel_err(getattr(out, OUTPUT[head]), ref) < 3e-2
    assert abs(float(out.loss) - ref_loss) < 3e-2 * abs(ref_loss)
    for name, ref_grad in nonzero(ref_grads).items():
        assert rel_err(grads[name], ref_grad) < 1e-1, name
