"""Token classification: the CoNLL reader, word tags on first WordPieces (as HF run_ner),
entity precision/recall/F1 on hand-computed cases (conlleval's rules, which seqeval follows),
and train_ner.py end to end on both backends: train, evaluate, --predict, bad input."""

import json
import re

import numpy as np
import pytest
import transformers

from test_training import BACKENDS, ok
from tiny import WORDS, run_script
from nanobert import glue, ner
from nanobert.tokenizer import load_tokenizer


def write_conll(path, sentences):
    path.write_text("".join("".join(f"{w} {t}\n" for w, t in zip(words, tags)) + "\n" for words, tags in sentences))
    return path


def test_read_conll_last_column_docstart_and_blank_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("-DOCSTART- -X- O O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n\nPeter NNP B-NP B-PER\n")
    assert ner.read_conll(path) == [(["EU", "rejects"], ["B-ORG", "O"]), (["Peter"], ["B-PER"])]
    assert ner.tag_names(ner.read_conll(path)) == ["O", "B-ORG", "I-ORG", "B-PER", "I-PER"]


@pytest.mark.parametrize("content, message", [
    ("EU B-ORG\nrejects\n", "line 2: expected a token and a tag, got 1 column"),
    ("EU ORG\n", "line 1: tag 'ORG' is not O, B-TYPE or I-TYPE"),
    ("EU B-\n", "line 1: tag 'B-' is not O, B-TYPE or I-TYPE"),
    ("\n\n", "no sentences"),
])
def test_bad_conll_is_one_line_naming_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    separator = " " if message.startswith("line") else ": "
    with pytest.raises(ValueError, match=f"^{re.escape(str(path) + separator + message)}$"):
        ner.read_conll(path)


@pytest.mark.parametrize("tags, spans", [
    (["B-PER", "I-PER", "O", "B-LOC"], {("PER", 0, 1), ("LOC", 3, 3)}),
    (["I-PER", "I-PER", "O"], {("PER", 0, 1)}),                      # IOB1: I- begins an entity
    (["B-PER", "B-PER"], {("PER", 0, 0), ("PER", 1, 1)}),             # B- ends the one before
    (["B-PER", "I-LOC", "I-LOC"], {("PER", 0, 0), ("LOC", 1, 2)}),    # a change of type
    (["O", "O"], set()),
    (["B-MISC"], {("MISC", 0, 0)}),                                   # an entity at the end
])
def test_entities_follow_conlleval(tags, spans):
    assert ner.entities(tags) == spans


def test_entity_scores_hand_computed():
    truth = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "B-LOC"]]
    # true entities 3, predicted 3 (PER 0-1, ORG, LOC 1), correct 2 (PER, ORG)
    s = ner.entity_scores(truth, pred)
    assert s["precision"] == pytest.approx(200 / 3) and s["recall"] == pytest.approx(200 / 3)
    assert s["f1"] == pytest.approx(200 / 3) and s["accuracy"] == pytest.approx(100 * 4 / 6)
    # a truncated span counts as wrong, not half right
    assert ner.entity_scores([["B-PER", "I-PER"]], [["B-PER", "O"]])["f1"] == 0.0
    assert ner.entity_scores([["O"]], [["O"]])["f1"] == 0.0  # no entities: 0, as seqeval's zero_division


def test_labels_on_first_wordpieces_equal_hf_run_ner(tmp_path):
    """encode_ner == HF's fast tokenizer with is_split_into_words and run_ner's alignment
    (label_all_tokens=False): first sub-token labelled, the rest and specials -100."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "black", "sea", "walk", "##ing", "##s", "1862", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    ours = load_tokenizer(str(tmp_path))
    hf = transformers.BertTokenizerFast(str(tmp_path / "vocab.txt"))
    sentences = [(["Walking", "the", "Black", "Sea", "1862", "."], ["O", "O", "B-NAME", "I-NAME", "B-DATE", "O"]),
                 (["walks", "xyz"], ["O", "B-NAME"])]
    label2id = {t: i for i, t in enumerate(["O", "B-DATE", "I-DATE", "B-NAME", "I-NAME"])}
    enc = ner.encode_ner(ours, sentences, label2id, max_length=6)
    for n, (words, tags) in enumerate(sentences):
        ref = hf(words, is_split_into_words=True, truncation=True, max_length=6)
        previous, labels = None, []
        for word in ref.word_ids():
            labels.append(-100 if word is None or word == previous else label2id[tags[word]])
            previous = word
        assert enc["input_ids"][n].tolist() == ref["input_ids"]
        assert enc["labels"][n].tolist() == labels
    assert enc["word_starts"][0].tolist() == [1, 3, 4, -1, -1, -1]  # "Walking" is 2 pieces; cut at 6 tokens
    assert ner.word_tags(np.eye(5)[[0, 0, 0, 3, 4, 0]], enc["word_starts"][0], list(label2id)) == \
        ["O", "B-NAME", "I-NAME", "O", "O", "O"]
    with pytest.raises(ValueError, match="dev.txt: sentence 1 has tag 'B-X', which training did not have"):
        ner.encode_ner(ours, [(["the"], ["B-X"])], label2id, where="dev.txt")


def test_token_labels_batch_padded_with_minus_100():
    enc = {"input_ids": [np.array([2, 5, 3]), np.array([2, 5, 6, 7, 3])],
           "token_type_ids": [np.zeros(3, np.int32), np.zeros(5, np.int32)]}
    labels = [np.array([-100, 1, -100]), np.array([-100, 0, 2, -100, -100])]
    batch = next(glue.glue_batches(enc, labels, 2, pad_to_multiple_of=8))
    assert batch["labels"].shape == (2, 8) and batch["labels"][0].tolist() == [-100, 1] + [-100] * 6
    assert batch["labels"][1, :5].tolist() == [-100, 0, 2, -100, -100] and (batch["labels"][:, 5:] == -100).all()


@pytest.fixture(scope="module")
def ner_dir(tmp_path_factory):
    """A learnable synthetic task: words of the tiny vocabulary, with some tagged by a rule."""
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("ner")
    names = set(WORDS[:6])
    for split, n in (("train", 48), ("dev", 16)):
        sentences = []
        for _ in range(n):
            words = list(rng.choice(WORDS, rng.integers(3, 9)))
            tags = ["B-NAME" if w in names and (i == 0 or words[i - 1] not in names) else
                    "I-NAME" if w in names else "O" for i, w in enumerate(words)]
            sentences.append((words, tags))
        write_conll(d / f"{split}.txt", sentences)
    return d


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_evaluate_predict(backend, tiny_model_dir, ner_dir, tmp_path):
    out = ok(run_script(["train_ner.py", f"--data={ner_dir}", f"--init={tiny_model_dir}", f"--out_dir={tmp_path}",
                         f"--backend={backend}", "--batch_size=8", "--epochs=2", "--lr=1e-3", "--log_every=1"]))
    assert "48 train / 16 dev sentences, tags O B-NAME I-NAME" in out.stdout and "best dev entity F1" in out.stdout
    config = json.loads((tmp_path / "best" / "config.json").read_text())
    assert config["id2label"] == {"0": "O", "1": "B-NAME", "2": "I-NAME"}
    assert transformers.BertForTokenClassification.from_pretrained(tmp_path / "best").config.num_labels == 3
    record = json.loads((tmp_path / "run.json").read_text())
    assert {"dev_f1", "dev_precision", "dev_recall", "dev_accuracy"} <= set(record["metrics"])
    pred = ok(run_script(["train_ner.py", f"--init={tmp_path / 'best'}", f"--backend={backend}",
                          f"--predict={' '.join(WORDS[:2] + WORDS[10:12])}"]))
    for line in pred.stdout.strip().splitlines():  # "TYPE<tab>words", whatever the tiny model learned
        kind, words = line.split("\t")
        assert kind in ("NAME",) and set(words.split()) <= set(WORDS[:2] + WORDS[10:12])


def test_bad_data_is_one_line_and_exit_2(tiny_model_dir, ner_dir, tmp_path):
    (tmp_path / "train.txt").write_text((ner_dir / "train.txt").read_text())
    (tmp_path / "dev.txt").write_text("good O\nbad B-UNSEEN\n")
    proc = run_script(["train_ner.py", f"--data={tmp_path}", f"--init={tiny_model_dir}",
                       f"--out_dir={tmp_path / 'out'}"])
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "dev.txt: sentence 1 has tag 'B-UNSEEN'" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written before the data checked out
