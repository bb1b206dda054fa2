"""Both twins compute exactly what HF BERT computes: every hidden state, the pooled output,
logits, loss and *every parameter gradient*, for the three heads, on fixed and on
hypothesis-generated configs and inputs, and on a real checkpoint (all-MiniLM-L6-v2).
Weights always travel through the shared format (HF save_pretrained -> twin from_pretrained).
"""

import numpy as np
import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_reference import (HEADS, TOL, TWINS, assert_close, random_batch, hf_config, hf_forward_and_grads, hf_model, load_twin,
                      numpy, to_backend, twin_forward_and_grads)
from nanobert import hub
from nanobert.tokenizer import load_tokenizer


def compare(backend, head, config, batch, tmp_path, seed=0):
    """Build HF + twin from the same file; compare all outputs and all gradients."""
    hf = hf_model(head, config, seed)
    hf.save_pretrained(tmp_path)
    twin = load_twin(backend, head, tmp_path)
    ref, ref_grads = hf_forward_and_grads(hf, batch)
    out, grads = twin_forward_and_grads(backend, twin, batch)
    tol = TOL[backend]
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert_close(a, b.detach().numpy(), tol, f"{backend} {head} hidden_states[{i}]")
    if head == "BertForQuestionAnswering":
        assert_close(out.start_logits, ref.start_logits.detach().numpy(), tol, f"{backend} start_logits")
        assert_close(out.end_logits, ref.end_logits.detach().numpy(), tol, f"{backend} end_logits")
    else:
        assert_close(out.logits, ref.logits.detach().numpy(), tol, f"{backend} {head} logits")
    assert_close(out.loss, ref.loss.item(), tol, f"{backend} {head} loss")
    assert set(grads) == set(ref_grads), f"gradient names differ: {set(grads) ^ set(ref_grads)}"
    for name, g in ref_grads.items():
        assert_close(grads[name], g, tol, f"{backend} {head} grad {name}")
    return twin


@pytest.mark.parametrize("head", HEADS)
def test_forward_and_every_gradient_match_hf(backend, head, tmp_path):
    config = hf_config()
    compare(backend, head, config, random_batch(np.random.default_rng(0), head, config, B=4, T=13), tmp_path)


def test_sequence_regression_matches_hf(backend, tmp_path):
    """num_labels = 1: regression with MSE, as HF."""
    config = hf_config(num_labels=1)
    batch = random_batch(np.random.default_rng(1), "BertForQuestionAnswering", config, B=3, T=9)
    batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    hf = hf_model("BertForSequenceClassification", config)
    hf.save_pretrained(tmp_path)
    twin = load_twin(backend, "BertForSequenceClassification", tmp_path)
    batch["labels"] = np.array([0.5, -1.0, 2.0], np.float32)
    ref = hf(**{k: torch.from_numpy(v) if k == "labels" else torch.from_numpy(v).long() for k, v in batch.items()})
    out, _ = twin_forward_and_grads(backend, twin, batch)
    assert_close(out.logits, ref.logits.detach().numpy(), TOL[backend], "regression logits")
    assert_close(out.loss, ref.loss.item(), TOL[backend], "regression loss")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(head=st.sampled_from(HEADS), backend=st.sampled_from(["torch", "mlx"]),
       layers=st.integers(1, 3), heads=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([4, 8]),
       act=st.sampled_from(["gelu", "relu", "gelu_new"]), B=st.integers(1, 4), T=st.integers(2, 17),
       seed=st.integers(0, 2**16))
def test_random_configs_and_inputs_match_hf(tmp_path_factory, head, backend, layers, heads, head_dim, act, B, T, seed):
    config = hf_config(num_hidden_layers=layers, num_attention_heads=heads, hidden_size=heads * head_dim,
                       intermediate_size=2 * heads * head_dim + 3, hidden_act=act,
                       num_labels={"BertForSequenceClassification": 3, "BertForTokenClassification": 5}.get(head, 2))
    batch = random_batch(np.random.default_rng(seed), head, config, B, T)
    compare(backend, head, config, batch, tmp_path_factory.mktemp("ckpt"), seed)


def test_sparse_mlm_head_equals_dense(backend, tmp_path):
    """Decoding only the masked positions gives the same loss and the same logits there."""
    config = hf_config()
    batch = random_batch(np.random.default_rng(2), "BertForMaskedLM", config, B=3, T=15)
    hf = hf_model("BertForMaskedLM", config)
    hf.save_pretrained(tmp_path)
    twin = load_twin(backend, "BertForMaskedLM", tmp_path)
    ref, _ = hf_forward_and_grads(hf, batch)
    flat = np.flatnonzero(batch["labels"].reshape(-1) != -100).astype(np.int32)
    padded = np.concatenate([flat, np.zeros(5, np.int32)])  # padding entries point at [CLS] (label -100)
    out, _ = twin_forward_and_grads(backend, twin, {**batch, "masked_positions": padded})
    dense = ref.logits.detach().numpy().reshape(-1, config.vocab_size)
    assert out.logits.shape == (len(padded), config.vocab_size)
    assert_close(out.logits[: len(flat)], dense[flat], TOL[backend], "sparse logits")
    assert_close(out.loss, ref.loss.item(), TOL[backend], "sparse loss")


@pytest.mark.parametrize("head", HEADS)
def test_hidden_states_only_when_asked(backend, head, tmp_path):
    """As HF: without output_hidden_states=True no hidden states come back (an inference pass
    then frees each layer's output after its use), and every other output is the same."""
    config = hf_config()
    batch = random_batch(np.random.default_rng(3), head, config, B=2, T=7)
    hf_model(head, config).save_pretrained(tmp_path)
    twin = load_twin(backend, head, tmp_path)
    inputs = to_backend(backend, batch)
    plain, full = twin(**inputs), twin(**inputs, output_hidden_states=True)
    assert plain.hidden_states is None and len(full.hidden_states) == config.num_hidden_layers + 1
    for field, value in plain._asdict().items():
        if field != "hidden_states":
            assert (value is None) == (getattr(full, field) is None), field
            if value is not None:
                np.testing.assert_array_equal(numpy(value), numpy(getattr(full, field)), err_msg=field)


# --- a real checkpoint ------------------------------------------------------------------------

SENTENCES = ["The quick brown fox jumps over the lazy dog.",
             "Super Bowl 50 was an American football game to determine the champion of the NFL.",
             "Héllo wörld!"]


def minilm_batch():
    path = hub.resolve("all-MiniLM-L6-v2")  # installed by `make test`; a missing package fails, not skips
    tok = load_tokenizer(path)
    tok.enable_padding(pad_id=0)
    enc = tok.encode_batch([(s, "a second segment") if i == 1 else s for i, s in enumerate(SENTENCES)])
    batch = {k: np.array([getattr(e, a) for e in enc], np.int32)
             for k, a in (("input_ids", "ids"), ("attention_mask", "attention_mask"), ("token_type_ids", "type_ids"))}
    return path, batch


@pytest.fixture(scope="module")
def minilm_reference():
    path, batch = minilm_batch()
    hf = transformers.BertModel.from_pretrained(path).eval()
    with torch.no_grad():
        ref = hf(**{k: torch.from_numpy(v).long() for k, v in batch.items()}, output_hidden_states=True)
    return path, batch, [h.numpy() for h in ref.hidden_states], ref.pooler_output.numpy()


def twin_encoder_outputs(backend, path, batch, **overrides):
    """Hidden states + pooled output of a twin's BertForSequenceClassification encoder."""
    model = TWINS[backend].BertForSequenceClassification.from_pretrained(path, **overrides)  # overrides: mutations
    model.eval()
    out, _ = twin_forward_and_grads(backend, model, {**batch, "labels": np.zeros(len(batch["input_ids"]), np.int32)})
    return out.hidden_states, out.pooler_output


def test_real_checkpoint_minilm_matches_hf(backend, minilm_reference):
    path, batch, ref_hidden, ref_pooled = minilm_reference
    hidden, pooled = twin_encoder_outputs(backend, path, batch)
    assert len(hidden) == 7
    for i, (a, b) in enumerate(zip(hidden, ref_hidden)):
        assert_close(a, b, TOL[backend], f"MiniLM {backend} hidden_states[{i}]")
    assert_close(pooled, ref_pooled, TOL[backend], f"MiniLM {backend} pooler_output")


@pytest.mark.parametrize("mutation", [{"layer_norm_eps": 1e-5}, {"hidden_act": "gelu_new"}])
def test_parity_catches_bugs(backend, minilm_reference, mutation):
    """The tolerances are tight enough to catch real mistakes: MLX's default LayerNorm eps
    (1e-5) or the tanh GELU approximation make the parity check fail."""
    path, batch, ref_hidden, _ = minilm_reference
    hidden, _ = twin_encoder_outputs(backend, path, batch, **mutation)
    with pytest.raises(AssertionError, match="max abs difference"):
        assert_close(hidden[-1], ref_hidden[-1], TOL[backend], f"mutated {mutation}")


# --- the shared format, in HF's direction --------------------------------------------------

@pytest.mark.parametrize("head", HEADS)
def test_twin_checkpoint_loads_in_hf_bit_identically(backend, head, tmp_path):
    """twin.save_pretrained -> HF from_pretrained: same tensors bit for bit, same outputs."""
    config = hf_config()
    hf_model(head, config).save_pretrained(tmp_path / "hf")
    twin = load_twin(backend, head, tmp_path / "hf")
    twin.save_pretrained(tmp_path / "ours")
    back = getattr(transformers, head).from_pretrained(tmp_path / "ours").eval()
    ours = twin.state_numpy()
    theirs = {k: v.detach().numpy() for k, v in back.state_dict().items()}
    for name, v in ours.items():
        np.testing.assert_array_equal(v, theirs[name], err_msg=name)
    if head == "BertForMaskedLM":  # tied decoder rebuilt by HF from the word embeddings
        np.testing.assert_array_equal(theirs["cls.predictions.decoder.weight"],
                                      ours["bert.embeddings.word_embeddings.weight"])
