"""BertConfig reads and writes HF config.json and refuses what it cannot build, naming the field."""

import json

import pytest
import transformers

from nanobert.config import BertConfig, ConfigError


def test_round_trip_and_hf_reads_ours(tmp_path):
    c = BertConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=3, intermediate_size=100,
                   num_labels=3, layer_norm_eps=1e-7, extra={"_name_or_path": "x"})
    c.to_json(tmp_path / "config.json", architectures=["BertForSequenceClassification"])
    back = BertConfig.from_json(tmp_path / "config.json")
    assert back.to_dict() == c.to_dict(["BertForSequenceClassification"])
    assert back.extra == {"_name_or_path": "x", "architectures": ["BertForSequenceClassification"]}
    hf = transformers.BertConfig.from_pretrained(tmp_path)
    assert (hf.num_labels, hf.hidden_size, hf.layer_norm_eps, hf.num_hidden_layers) == (3, 64, 1e-7, 3)


def test_reads_hf_written_config(tmp_path):
    transformers.BertConfig(hidden_size=48, num_attention_heads=6, num_labels=5, hidden_act="relu").save_pretrained(tmp_path)
    c = BertConfig.from_json(tmp_path / "config.json")
    assert (c.hidden_size, c.num_attention_heads, c.head_dim, c.num_labels, c.hidden_act) == (48, 6, 8, 5, "relu")


def test_label_names_round_trip_through_hf(tmp_path):
    """id2label (as a token classifier's tags) is written as HF writes it and read back;
    a new head's num_labels drops the old names."""
    tags = {0: "O", 1: "B-NAME", 2: "I-NAME"}
    c = BertConfig(num_labels=3, id2label=tags)
    c.to_json(tmp_path / "config.json")
    hf = transformers.BertConfig.from_pretrained(tmp_path)
    assert hf.id2label == tags and hf.label2id == {"O": 0, "B-NAME": 1, "I-NAME": 2}
    assert BertConfig.from_json(tmp_path / "config.json").id2label == tags
    transformers.BertConfig(id2label={0: "neg", 1: "pos"}).save_pretrained(tmp_path / "hf")
    assert BertConfig.from_json(tmp_path / "hf" / "config.json").id2label == {0: "neg", 1: "pos"}
    assert BertConfig(num_labels=2).to_dict()["id2label"] == {"0": "LABEL_0", "1": "LABEL_1"}
    assert BertConfig.from_dict(BertConfig(num_labels=2).to_dict()).id2label is None  # placeholders
    assert c.updated(num_labels=2).id2label is None and c.updated(num_labels=2).num_labels == 2
    assert c.updated(hidden_dropout_prob=0.0).id2label == tags
    with pytest.raises(ConfigError, match="field 'id2label' must name labels 0..2"):
        BertConfig(num_labels=3, id2label={0: "O", 5: "X"})


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": 100, "num_attention_heads": 12}, "field 'hidden_size' (100) is not divisible by 'num_attention_heads' (12)"),
    ({"hidden_act": "swish"}, "field 'hidden_act' is 'swish'; supported: gelu, gelu_new, relu"),
    ({"hidden_size": "384"}, "field 'hidden_size' must be an integer, got '384'"),
    ({"num_hidden_layers": 0}, "field 'num_hidden_layers' must be >= 1, got 0"),
    ({"hidden_dropout_prob": 1.5}, "field 'hidden_dropout_prob' must be in [0, 1), got 1.5"),
    ({"layer_norm_eps": 0}, "field 'layer_norm_eps' must be > 0, got 0"),
    ({"pad_token_id": 40000}, "field 'pad_token_id' (40000) is outside the vocabulary (vocab_size 30522)"),
    ({"position_embedding_type": "relative_key"}, "field 'position_embedding_type' is 'relative_key'; nanobert supports only 'absolute'"),
    ({"model_type": "roberta"}, "field 'model_type' is 'roberta'; nanobert supports only 'bert'"),
    ({"is_decoder": True}, "field 'is_decoder' is True; nanobert supports only False"),
    ({"problem_type": "multi_label_classification"}, "field 'problem_type' is 'multi_label_classification'"),
])
def test_bad_values_name_file_and_field(tmp_path, change, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**BertConfig().to_dict(), **change}))
    with pytest.raises(ConfigError) as e:
        BertConfig.from_json(path)
    assert str(e.value).startswith(f"{path}: {message}")


def test_not_json_or_not_an_object(tmp_path):
    (tmp_path / "a.json").write_text("{oops")
    (tmp_path / "b.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"a.json: not valid JSON"):
        BertConfig.from_json(tmp_path / "a.json")
    with pytest.raises(ConfigError, match=r"b.json: expected a JSON object, got list"):
        BertConfig.from_json(tmp_path / "b.json")
    with pytest.raises(TypeError):  # a typo in Python code fails loudly too
        BertConfig(hiden_size=3)
