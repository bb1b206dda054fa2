"""LoRA in both twins: apply_lora starts exactly at the base model and leaves only the adapters
and the task head trainable; training moves nothing else; merge_lora folds the adapters into
a plain checkpoint that computes what the adapters did; the two twins' LoRA layers agree."""

import re

import numpy as np
import pytest
from safetensors.numpy import load_file

from tiny import tiny_config
from nanobert import model_mlx, model_torch
from nanobert.training import load_backend

import mlx.core as mx  # noqa: E402  after nanobert.model_mlx: its BLAS preload must come first
import mlx.nn as nn  # noqa: E402
import torch  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

BACKENDS = ("torch", "mlx")
R, ALPHA = 2, 8.0
# MLX vs torch on the same weights: another BLAS, so each matmul rounds differently; the
# parity suite's tolerance for the MLX twin (parity/hf_reference.py, TOL["mlx"]).
TWIN_TOL = 1e-4
# Where each LoRA target sits in a BertLayer, and its Linear's (in, out) in tiny_config (H 16, I 32).
TARGETS = {"query": ("attention.self.query", 16, 16), "key": ("attention.self.key", 16, 16),
           "value": ("attention.self.value", 16, 16), "attention.output.dense": ("attention.output.dense", 16, 16),
           "intermediate.dense": ("intermediate.dense", 16, 32), "output.dense": ("output.dense", 32, 16)}


def config():
    return tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def qa_batch(seed, B=4, T=12):
    """Random tokens with padding, and answer spans inside each row."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(6, T + 1, B)
    lengths[0] = T
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(5, config().vocab_size, (B, T)).astype(np.int32) * mask
    start = rng.integers(1, lengths - 2).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
            "start_positions": start, "end_positions": start + 1}


def base_model(backend, head="BertForQuestionAnswering"):
    """The same random base weights in both twins (drawn once by torch); seeded, so that the
    LoRA A matrices drawn next are the same in every run."""
    torch.manual_seed(0)
    state = getattr(model_torch, head)(config()).init_weights().state_numpy()
    models, E = load_backend(backend)
    E.seed(0)
    model = getattr(models, head)(config())
    model.load_numpy(state)
    return model


def outputs(E, model, batch):
    out = E.predict(model, {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
    return np.concatenate([out["start_logits"], out["end_logits"]])


def trainable_names(backend, model):
    if backend == "torch":
        return {n for n, p in model.named_parameters() if p.requires_grad}
    return {n for n, _ in tree_flatten(model.trainable_parameters())}


def train(E, model, steps, lr=1e-2):
    opt = E.AdamW(model)
    for step in range(steps):
        E.train_step(model, opt, [qa_batch(step)], lr, 1.0, step)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_starts_exactly_at_the_base_model(backend):
    models, E = load_backend(backend)
    model, batch = base_model(backend), qa_batch(99)
    before = outputs(E, model, batch)
    models.apply_lora(model, R, ALPHA, ["query", "value", "intermediate.dense"])
    state = model.state_numpy()
    assert all(not state[k].any() for k in state if k.endswith("lora_B"))  # B = 0 ...
    assert all(state[k].std() > 0 for k in state if k.endswith("lora_A"))  # ... A random, so B's gradient is not 0
    np.testing.assert_array_equal(outputs(E, model, batch), before)  # the update adds exact zeros


@pytest.mark.parametrize("targets", [("query", "value"), tuple(TARGETS)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_only_adapters_and_head_train(backend, targets):
    """Trainable: lora_A/lora_B of each target in each layer + the QA head, nothing else; a
    few training steps change exactly those and leave every base weight bit-identical."""
    models, E = load_backend(backend)
    model = models.apply_lora(base_model(backend), R, ALPHA, targets)
    layers = config().num_hidden_layers
    expected = {f"bert.encoder.layer.{i}.{TARGETS[t][0]}.{ab}" for i in range(layers) for t in targets
                for ab in ("lora_A", "lora_B")} | {"qa_outputs.weight", "qa_outputs.bias"}
    assert trainable_names(backend, model) == expected
    trainable = model.state_numpy(trainable_only=True)
    assert set(trainable) == expected
    H = config().hidden_size
    assert sum(v.size for v in trainable.values()) == layers * sum(R * (TARGETS[t][1] + TARGETS[t][2])
                                                                   for t in targets) + 2 * H + 2
    before = {k: v.copy() for k, v in model.state_numpy().items()}  # torch's arrays share the live weights
    train(E, model, 3)
    after = model.state_numpy()
    assert set(after) == set(before)
    for name in before:
        if name == "qa_outputs.bias":
            continue  # softmax over positions ignores a shift common to all: its gradient is ~0 (fp32 noise)
        if name in expected:
            assert np.abs(after[name] - before[name]).max() > 1e-4, f"{name} did not train"
        else:
            np.testing.assert_array_equal(after[name], before[name], err_msg=f"{name} is frozen but moved")


@pytest.mark.parametrize("backend", BACKENDS)
def test_classification_head_trains_but_not_the_pooler(backend):
    """BertForSequenceClassification: the classifier is the task head; the pooler is part of
    the pretrained encoder and stays frozen (as PEFT's modules_to_save = ["classifier"])."""
    models, _ = load_backend(backend)
    model = models.apply_lora(base_model(backend, "BertForSequenceClassification"), R, ALPHA)
    names = trainable_names(backend, model)
    assert {n for n in names if "lora_" not in n} == {"classifier.weight", "classifier.bias"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_lora_gives_the_same_model_as_a_plain_checkpoint(backend, tmp_path):
    models, E = load_backend(backend)
    model = models.apply_lora(base_model(backend), R, ALPHA, ["query", "value", "output.dense"])
    train(E, model, 3)
    batch = qa_batch(99)
    lora_out = outputs(E, model, batch)
    assert np.abs(lora_out - outputs(E, base_model(backend), batch)).max() > 1e-3  # the adapters matter

    merged = models.merge_lora(model)
    merged_out = outputs(E, merged, batch)
    # W + (alpha/r) B A rounds once where the adapter path rounds per matmul: fp32 noise only.
    np.testing.assert_allclose(merged_out, lora_out, rtol=0, atol=1e-5)
    assert trainable_names(backend, merged) == set(base_model(backend).state_numpy())  # a plain model again

    merged.save_pretrained(tmp_path)
    assert set(load_file(tmp_path / "model.safetensors")) == set(base_model(backend).state_numpy())  # no lora_*
    for twin in (model_torch, model_mlx):
        loaded = twin.BertForQuestionAnswering.from_pretrained(str(tmp_path))
        _, twin_E = load_backend("torch" if twin is model_torch else "mlx")
        tol = 0.0 if twin.__name__.endswith(backend) else TWIN_TOL
        np.testing.assert_allclose(outputs(twin_E, loaded, batch), merged_out, rtol=0, atol=tol,
                                   err_msg=f"{backend} merged -> {twin.__name__}")


def test_lora_twins_compute_the_same_outputs_and_gradients():
    """Same base weights and same (non-zero) adapters in both twins: same loss, logits and
    gradients of every trainable tensor, and MLX has gradients for exactly those."""
    targets = tuple(TARGETS)
    tm = model_torch.apply_lora(base_model("torch"), R, ALPHA, targets)
    mm = model_mlx.apply_lora(base_model("mlx"), R, ALPHA, targets)
    rng = np.random.default_rng(0)
    adapters = {k: rng.normal(0, 0.3, v.shape).astype(np.float32)
                for k, v in tm.state_numpy(trainable_only=True).items()}
    tm.load_numpy(adapters)
    mm.load_numpy(adapters)
    batch = qa_batch(7)

    out = tm(**{k: torch.from_numpy(v) for k, v in batch.items()})
    out.loss.backward()
    t_grads = {n: p.grad.numpy() for n, p in tm.named_parameters() if p.grad is not None}
    captured = {}

    def loss_fn(m):
        captured["out"] = m(**{k: mx.array(v) for k, v in batch.items()})
        return captured["out"].loss
    _, grads = nn.value_and_grad(mm, loss_fn)(mm)
    m_grads = {n: np.array(g) for n, g in tree_flatten(grads)}

    np.testing.assert_allclose(np.array(captured["out"].loss), out.loss.item(), rtol=0, atol=TWIN_TOL)
    for f in ("start_logits", "end_logits"):
        np.testing.assert_allclose(np.array(getattr(captured["out"], f)), getattr(out, f).detach().numpy(),
                                   rtol=0, atol=TWIN_TOL, err_msg=f)
    assert set(m_grads) == set(t_grads) == set(adapters)
    for name, g in t_grads.items():
        if name != "qa_outputs.bias":  # softmax over positions ignores a common shift: gradient ~0
            assert np.abs(g).max() > 1e-3, f"{name}: no gradient to compare"
        np.testing.assert_allclose(m_grads[name], g, rtol=0, atol=TWIN_TOL, err_msg=name)


@pytest.mark.parametrize("target", ["querry", "attention.output", "output.LayerNorm", "attention.selff.query"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_target_is_a_clear_value_error(backend, target):
    models, _ = load_backend(backend)
    with pytest.raises(ValueError, match=re.escape(f"LoRA target {target!r} is not a Linear in a BertLayer")):
        models.apply_lora(base_model(backend), R, ALPHA, ["query", target])
