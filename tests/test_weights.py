"""The shared weight format: round trips between the twins and HF, real-world checkpoint
quirks, and bad files that must fail with one clear line naming the file and tensor."""

import json
import os

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import nanobert.model_mlx as M
import nanobert.model_torch as T
from nanobert.config import BertConfig, ConfigError
from nanobert.weights import WeightsError, read_checkpoint, write_checkpoint

HEADS = ("BertForMaskedLM", "BertForSequenceClassification", "BertForTokenClassification", "BertForQuestionAnswering")
SMALL = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
             max_position_embeddings=32)
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


def torch_model(head, seed=0):
    torch.manual_seed(seed)
    return getattr(T, head)(BertConfig(**SMALL)).init_weights()


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("head", HEADS)
def test_torch_mlx_torch_round_trip_is_bit_identical(head, tmp_path):
    original = torch_model(head)
    original.save_pretrained(tmp_path / "a")
    mlx_model = getattr(M, head).from_pretrained(str(tmp_path / "a"))
    mlx_model.save_pretrained(tmp_path / "b")
    back = getattr(T, head).from_pretrained(str(tmp_path / "b"))
    assert_same_state(original.state_numpy(), mlx_model.state_numpy())
    assert_same_state(original.state_numpy(), back.state_numpy())
    assert json.loads((tmp_path / "a" / "config.json").read_text()) == json.loads((tmp_path / "b" / "config.json").read_text())


@pytest.mark.parametrize("head", HEADS)
def test_hf_file_loads_into_both_twins_bit_identically(head, tmp_path):
    torch.manual_seed(0)
    hf = getattr(transformers, head)(transformers.BertConfig(**SMALL))
    hf.save_pretrained(tmp_path)
    ref = {k: v.numpy() for k, v in hf.state_dict().items()}
    for twin in (T, M):
        state = getattr(twin, head).from_pretrained(str(tmp_path)).state_numpy()
        for k, v in state.items():
            np.testing.assert_array_equal(v, ref[k], err_msg=k)


def test_saved_file_is_fp32_hf_names_without_tied_duplicate(tmp_path):
    torch_model("BertForMaskedLM").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert "bert.encoder.layer.1.attention.self.query.weight" in tensors
    assert "cls.predictions.transform.LayerNorm.weight" in tensors
    assert "cls.predictions.decoder.weight" not in tensors  # tied: it is the word embeddings
    assert {v.dtype for v in tensors.values()} == {np.dtype(np.float32)}
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]


def quirky_checkpoint(tmp_path, state, rename):
    """Write `state` under other names, as real checkpoints in the wild spell them."""
    os.makedirs(tmp_path, exist_ok=True)
    save_file({rename(k): v for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    BertConfig(**SMALL).to_json(tmp_path / "config.json")
    return str(tmp_path)


@pytest.mark.parametrize("rename", [
    lambda k: "module." + k,                                     # DataParallel / DDP
    lambda k: "_orig_mod." + k,                                  # torch.compile
    lambda k: "module._orig_mod." + k,
    lambda k: k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"),  # TF era
], ids=["module", "orig_mod", "both", "gamma_beta"])
def test_real_world_key_spellings_load(rename, tmp_path):
    model = torch_model("BertForMaskedLM")
    path = quirky_checkpoint(tmp_path, model.state_numpy(), rename)
    assert_same_state(T.BertForMaskedLM.from_pretrained(path).state_numpy(), model.state_numpy())


def test_bare_encoder_checkpoint_extra_keys_and_tied_decoder(tmp_path, capfd):
    """A BertModel checkpoint (no `bert.` prefix, with pooler + position_ids) into a QA model;
    an MLM checkpoint with an explicit tied decoder weight and NSP head."""
    encoder = torch_model("BertForSequenceClassification")
    state = {k[len("bert."):]: v for k, v in encoder.state_numpy().items() if k.startswith("bert.")}
    state["embeddings.position_ids"] = np.arange(32, dtype=np.int64)[None]
    qa = T.BertForQuestionAnswering.from_pretrained(quirky_checkpoint(tmp_path / "enc", state, lambda k: k))
    for k, v in qa.state_numpy().items():
        if k.startswith("bert."):
            np.testing.assert_array_equal(v, state[k[len("bert."):]])
    err = capfd.readouterr().err
    assert "newly initialized (train them): qa_outputs.weight, qa_outputs.bias" in err
    assert "unused weights" in err and "pooler.dense.weight" in err and "position_ids" not in err

    mlm = torch_model("BertForMaskedLM").state_numpy()
    extra = {**mlm, "cls.predictions.decoder.weight": mlm["bert.embeddings.word_embeddings.weight"],
             "cls.seq_relationship.weight": np.zeros((2, 16), np.float32)}
    loaded = M.BertForMaskedLM.from_pretrained(quirky_checkpoint(tmp_path / "mlm", extra, lambda k: k))
    assert_same_state(loaded.state_numpy(), mlm)
    assert "unused" not in capfd.readouterr().err


def test_bf16_and_fp16_checkpoints_are_widened_to_fp32(tmp_path):
    model = torch_model("BertForQuestionAnswering")
    state = model.state_numpy()
    for dtype in (torch.bfloat16, torch.float16):
        d = tmp_path / str(dtype)
        os.makedirs(d)
        narrow = {k: torch.from_numpy(v).to(dtype) for k, v in state.items()}
        from safetensors.torch import save_file as save_torch
        save_torch(narrow, str(d / "model.safetensors"))
        BertConfig(**SMALL).to_json(d / "config.json")
        loaded = M.BertForQuestionAnswering.from_pretrained(str(d)).state_numpy()
        for k, v in loaded.items():
            assert v.dtype == np.float32
            np.testing.assert_array_equal(v, narrow[k].float().numpy(), err_msg=k)


# --- bad files: one clear line naming the file and the tensor ------------------------------

def one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


def test_truncated_safetensors(tmp_path):
    torch_model("BertForMaskedLM").save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(WeightsError) as e:
        T.BertForMaskedLM.from_pretrained(str(tmp_path))
    assert "model.safetensors: truncated" in one_line(e)
    f.write_bytes(b"\x10\x00")  # not even a header
    with pytest.raises(WeightsError) as e:
        read_checkpoint(str(tmp_path))
    assert "not a safetensors file" in one_line(e)


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path):
    state = torch_model("BertForMaskedLM").state_numpy()
    state["bert.encoder.layer.1.intermediate.dense.weight"] = np.zeros((25, 16), np.float32)
    path = quirky_checkpoint(tmp_path, state, lambda k: k)
    with pytest.raises(WeightsError) as e:
        M.BertForMaskedLM.from_pretrained(path)
    assert one_line(e).endswith("tensor 'bert.encoder.layer.1.intermediate.dense.weight' has shape (25, 16), "
                                "the model expects (24, 16)")


def test_a_head_of_another_shape_is_a_new_head(tmp_path, capsys):
    """Another task's head (2 classes; here 5 tags) is replaced, saying so; the encoder loads."""
    two = torch_model("BertForSequenceClassification")
    two.save_pretrained(tmp_path)
    tagger = M.BertForTokenClassification.from_pretrained(str(tmp_path), num_labels=5)
    assert tagger.classifier.weight.shape == (5, 16)
    assert "newly initialized (train them): classifier.weight, classifier.bias" in capsys.readouterr().err
    np.testing.assert_array_equal(tagger.state_numpy()["bert.embeddings.word_embeddings.weight"],
                                  two.state_numpy()["bert.embeddings.word_embeddings.weight"])


def test_wrong_dtype_names_tensor(tmp_path):
    state = torch_model("BertForMaskedLM").state_numpy()
    state["bert.pooler.dense.bias"] = np.zeros(16, np.float32)  # harmless extra
    state["bert.embeddings.LayerNorm.weight"] = np.ones(16, np.int32)
    with pytest.raises(WeightsError) as e:
        T.BertForMaskedLM.from_pretrained(quirky_checkpoint(tmp_path, state, lambda k: k))
    assert "tensor 'bert.embeddings.LayerNorm.weight' has dtype int32, expected a float type" in one_line(e)


def test_missing_encoder_tensor_is_an_error(tmp_path):
    state = torch_model("BertForMaskedLM").state_numpy()
    del state["bert.encoder.layer.0.output.dense.bias"]
    with pytest.raises(WeightsError) as e:
        T.BertForMaskedLM.from_pretrained(quirky_checkpoint(tmp_path, state, lambda k: k))
    assert "missing 1 encoder tensor(s): bert.encoder.layer.0.output.dense.bias" in one_line(e)


def test_missing_config_and_pickle_only(tmp_path):
    torch_model("BertForMaskedLM").save_pretrained(tmp_path)
    os.remove(tmp_path / "config.json")
    with pytest.raises(ConfigError) as e:
        T.BertForMaskedLM.from_pretrained(str(tmp_path))
    assert one_line(e) == f"{tmp_path / 'config.json'}: no such file"
    pickle_dir = tmp_path / "bin"
    os.makedirs(pickle_dir)
    BertConfig(**SMALL).to_json(pickle_dir / "config.json")
    (pickle_dir / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(WeightsError) as e:
        T.BertForMaskedLM.from_pretrained(str(pickle_dir))
    assert "pytorch_model.bin, a pickle; nanobert never unpickles" in one_line(e)
    with pytest.raises(FileNotFoundError) as e:
        T.BertForMaskedLM.from_pretrained(str(tmp_path / "nowhere"))
    assert "no such file or directory" in one_line(e)


def test_sharded_checkpoint(tmp_path):
    state = torch_model("BertForQuestionAnswering").state_numpy()
    names = sorted(state)
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        save_file({k: state[k] for k in part}, str(tmp_path / f"model-0000{i + 1}-of-00002.safetensors"))
    index = {"weight_map": {k: f"model-0000{1 + (k in names[len(names) // 2:])}-of-00002.safetensors" for k in names}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    BertConfig(**SMALL).to_json(tmp_path / "config.json")
    assert_same_state(T.BertForQuestionAnswering.from_pretrained(str(tmp_path)).state_numpy(), state)


def test_write_checkpoint_leaves_no_temp_files(tmp_path):
    write_checkpoint(tmp_path, BertConfig(**SMALL), torch_model("BertForMaskedLM").state_numpy())
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
