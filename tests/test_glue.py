"""GLUE pipeline: TSV readers on tricky rows, encoding equal to HF's tokenizer, batches, metrics.

MRPC text may not be copied into the repo (non-commercial license): its tests use made-up pairs.
"""

import csv
import io
import json
import math
import os
import sys
import types

import numpy as np
import pytest

from nanobert import hub
from nanobert.glue import (accuracy, binary_f1, encode_glue, glue_batches, label_ids, load_table, load_task, macro_f1,
                           pearson, read_glue_tsv, read_table, spearman)
from nanobert.tokenizer import load_tokenizer

SHIPPED_SST2 = os.path.join(os.path.dirname(__file__), "..", "data", "sst2")
MRPC_HEADER = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return str(path)


# ---------------------------------------------------------------- TSV readers

def test_sst2_crlf_trailing_spaces_quotes_and_blank_lines(tmp_path):
    path = write(tmp_path, "train.tsv",
                 "sentence\tlabel\r\n"
                 "a charming journey . \t1\r\n"
                 '" the witness \t0\r\n'     # unmatched quote: text, not CSV quoting
                 "\r\n"                      # blank line in the middle: skipped
                 "it 's not \"good\" . \t0 \r\n"
                 "\n")                       # editor's trailing empty line
    assert read_glue_tsv(path, "sst2") == [("a charming journey .", None, 1),
                                           ('" the witness', None, 0),
                                           ('it \'s not "good" .', None, 0)]


def test_mrpc_bom_and_unmatched_quotes_do_not_merge_rows(tmp_path):
    rows = ['1\t11\t12\t" He said it was over .\tHe said it was over .',
            "0\t21\t22\tThe cat sat .\tA dog ran .",
            '1\t31\t32\tPrices rose " sharply .\tPrices went up a lot .']
    text = "\ufeff" + MRPC_HEADER + "\n" + "\n".join(rows) + "\n"
    # the trap: a default CSV reader pairs the quotes across lines and merges the rows
    assert len(list(csv.reader(io.StringIO(text), delimiter="\t"))) < 1 + len(rows)
    path = write(tmp_path, "dev.tsv", text)
    assert read_glue_tsv(path, "mrpc") == [('" He said it was over .', "He said it was over .", 1),
                                           ("The cat sat .", "A dog ran .", 0),
                                           ('Prices rose " sharply .', "Prices went up a lot .", 1)]
    # the byte-order mark is optional
    no_bom = write(tmp_path, "nobom.tsv", text[1:])
    assert read_glue_tsv(no_bom, "mrpc") == read_glue_tsv(path, "mrpc")


@pytest.mark.parametrize("task, text, message", [
    # line 4, not 3: the blank line 3 is skipped but still counted
    ("sst2", "sentence\tlabel\ngood .\t1\n\nno tab here\n", "line 4: expected 2 tab-separated columns, got 1"),
    ("sst2", "sentence\tlabel\ngood .\t1\textra\n", "line 2: expected 2 tab-separated columns, got 3"),
    ("sst2", "sentence\tlabel\ngood .\t1\nbad .\tnegative\n", "line 3: label (label) must be 0 or 1, got 'negative'"),
    ("sst2", "sentence\tlabel\ngood .\t2\n", "line 2: label (label) must be 0 or 1, got '2'"),
    ("sst2", "text\tlabel\ngood .\t1\n", "line 1: expected the sst2 header 'sentence\\tlabel', got 'text\\tlabel'"),
    ("sst2", "good .\t1\n", "line 1: expected the sst2 header"),
    ("sst2", "sentence\tlabel\n\n", "no examples after the header"),
    ("mrpc", MRPC_HEADER + "\n1\t1\t2\tA .\n", "line 2: expected 5 tab-separated columns, got 4"),
    ("mrpc", "sentence\tlabel\ngood .\t1\n", "expected the mrpc header 'Quality\\t#1 ID"),
])
def test_malformed_files_name_the_file_and_line(tmp_path, task, text, message):
    path = write(tmp_path, "train.tsv", text)
    with pytest.raises(ValueError) as err:
        read_glue_tsv(path, task)
    assert str(err.value).startswith(path) and message in str(err.value)


def test_missing_file_and_unknown_task(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        read_glue_tsv(str(tmp_path / "nope.tsv"), "sst2")
    with pytest.raises(ValueError, match="unknown GLUE task 'cola'"):
        read_glue_tsv(write(tmp_path, "t.tsv", "sentence\tlabel\n"), "cola")


# ---------------------------------------------------------------- load_task

def test_load_task_from_directory_and_shipped_excerpt(tmp_path):
    write(tmp_path, "train.tsv", "sentence\tlabel\nfine .\t1\n")
    write(tmp_path, "dev.tsv", "sentence\tlabel\nawful .\t0\n")
    assert load_task("sst2", str(tmp_path), "dev") == [("awful .", None, 0)]
    # the excerpt data/sst2/README.md describes: first 2,000 train rows, the whole dev set
    train, dev = load_task("sst2", SHIPPED_SST2, "train"), load_task("sst2", SHIPPED_SST2, "dev")
    assert (len(train), sum(y for *_, y in train)) == (2000, 1101)
    assert (len(dev), sum(y for *_, y in dev)) == (872, 444)
    assert train[0] == ("hide new secretions from the parental units", None, 0)
    with pytest.raises(ValueError, match="split must be 'train' or 'dev'"):
        load_task("sst2", str(tmp_path), "test")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_task("sst2", str(tmp_path / "missing"), "train")


def test_load_task_from_the_hub(monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        if name == "offline":
            raise ConnectionError("Couldn't reach the Hub\nsecond line")
        return {"sentence1": ["A cat . ", "B"], "sentence2": ["C", " D dog ."], "label": [1, 0], "idx": [0, 1]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_task("mrpc", "glue", "dev") == [("A cat .", "C", 1), ("B", "D dog .", 0)]
    assert calls == [("glue", "mrpc", "validation")]
    with pytest.raises(FileNotFoundError) as err:
        load_task("mrpc", "offline", "train")
    message = str(err.value)
    assert "offline: not a local directory" in message and "ConnectionError: Couldn't reach" in message
    assert "second line" not in message


# ---------------------------------------------------------------- encoding equals HF

@pytest.fixture(scope="module")
def tokenizers_pair():
    transformers = pytest.importorskip("transformers")
    path = hub.resolve("all-MiniLM-L6-v2")
    return load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path)


LONG = "the quick brown fox jumps over the lazy dog while the cat sleeps on a very warm mat"
SHORT = "a short reply ."
CASES = [(SHORT, None), (LONG, None), ("Héllo, WORLD!! unbelievably", None), (SHORT, "yes ."),
         (LONG, SHORT), (SHORT, LONG), (LONG, LONG), (LONG + " again and again", LONG), ("", "only b")]


@pytest.mark.parametrize("max_length", [128, 16, 11])
def test_encoding_and_token_types_equal_hf(tokenizers_pair, max_length):
    ours, hf = tokenizers_pair
    encoded = encode_glue(ours, [(a, b, 0) for a, b in CASES], max_length=max_length)
    for (a, b), ids, types_ in zip(CASES, encoded["input_ids"], encoded["token_type_ids"]):
        want = hf(a, b, truncation=True, max_length=max_length)
        assert ids.dtype == np.int32 and types_.dtype == np.int32
        assert ids.tolist() == want["input_ids"], (a, b)
        assert types_.tolist() == want["token_type_ids"], (a, b)
    assert ours.truncation is None and ours.padding is None  # the caller's tokenizer is untouched


def test_truncation_cuts_the_longer_side_first(tokenizers_pair):
    ours, _ = tokenizers_pair
    cls, sep = ours.token_to_id("[CLS]"), ours.token_to_id("[SEP]")
    short = ours.encode(SHORT, add_special_tokens=False).ids
    long_ = ours.encode(LONG, add_special_tokens=False).ids
    encoded = encode_glue(ours, [(LONG, SHORT, 0), (SHORT, LONG, 0)], max_length=16)
    keep = 16 - 3 - len(short)  # room left for the long side after [CLS] [SEP] [SEP] and the short side
    assert encoded["input_ids"][0].tolist() == [cls] + long_[:keep] + [sep] + short + [sep]
    assert encoded["input_ids"][1].tolist() == [cls] + short + [sep] + long_[:keep] + [sep]
    assert encoded["token_type_ids"][1].tolist() == [0] * (len(short) + 2) + [1] * (keep + 1)


# ---------------------------------------------------------------- batches

def synthetic(n, seed=0, max_len=40):
    """n encoded examples of random lengths 3..max_len; token ids encode (example, position)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, max_len + 1, n)
    ids = [np.arange(1, L + 1, dtype=np.int32) + 1000 * i for i, L in enumerate(lengths)]
    types_ = [(np.arange(L) >= L // 2).astype(np.int32) for L in lengths]
    return {"input_ids": ids, "token_type_ids": types_}, rng.integers(0, 2, n)


@pytest.mark.parametrize("bucket", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
def test_each_example_once_and_padded_right(shuffle, bucket):
    encoded, labels = synthetic(1000)
    rng = np.random.default_rng(1) if shuffle else None
    batches = list(glue_batches(encoded, labels, 32, rng=rng, pad_id=7, bucket=bucket))
    assert len(batches) == math.ceil(1000 / 32) and [len(b["labels"]) for b in batches].count(1000 % 32) == 1
    seen = []
    for b in batches:
        assert all(v.dtype == np.int32 for v in b.values())
        lengths = b["attention_mask"].sum(1)
        assert b["input_ids"].shape == b["token_type_ids"].shape == (len(lengths), lengths.max())
        for row, L in enumerate(lengths):
            i = int(b["input_ids"][row, 0]) // 1000  # which example this row holds
            seen.append(i)
            assert (b["input_ids"][row, :L] == encoded["input_ids"][i]).all()
            assert (b["input_ids"][row, L:] == 7).all() and (b["attention_mask"][row, :L] == 1).all()
            assert (b["token_type_ids"][row, :L] == encoded["token_type_ids"][i]).all()
            assert (b["token_type_ids"][row, L:] == 0).all() and b["labels"][row] == labels[i]
    assert sorted(seen) == list(range(1000))
    assert (seen != sorted(seen)) == (shuffle or bucket)


def test_fixed_padding_and_bucketing_padding_cost():
    encoded, labels = synthetic(1000)
    real = sum(len(x) for x in encoded["input_ids"])

    def padded(**kw):
        return sum(b["input_ids"].size for b in glue_batches(encoded, labels, 32, **kw))

    assert padded(pad_to=64) == 1000 * 64
    dynamic = padded(rng=np.random.default_rng(0))
    bucketed = padded(rng=np.random.default_rng(0), bucket=True)
    assert real < bucketed < dynamic < 1000 * 64
    with pytest.raises(ValueError, match="pad_to=16 is shorter than the longest example"):
        next(glue_batches(encoded, labels, 32, pad_to=16))


def test_pad_to_multiple_of_rounds_the_width_up():
    encoded, labels = synthetic(200)
    for plain, rounded in zip(glue_batches(encoded, labels, 32), glue_batches(encoded, labels, 32, pad_to_multiple_of=8)):
        T = plain["input_ids"].shape[1]
        assert rounded["input_ids"].shape[1] == -(-T // 8) * 8
        assert (rounded["input_ids"][:, :T] == plain["input_ids"]).all() and not rounded["attention_mask"][:, T:].any()


@pytest.mark.parametrize("bucket", [False, True])
def test_resume_mid_epoch_gives_the_remaining_batches(bucket):
    encoded, labels = synthetic(500)
    seed, epoch = 1234, 3
    full = list(glue_batches(encoded, labels, 16, rng=np.random.default_rng([seed, epoch]), bucket=bucket))
    resumed = list(glue_batches(encoded, labels, 16, rng=np.random.default_rng([seed, epoch]), bucket=bucket,
                                start=13))
    assert len(resumed) == len(full) - 13
    for a, b in zip(full[13:], resumed):
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    # another epoch is another order
    other = glue_batches(encoded, labels, 16, rng=np.random.default_rng([seed, epoch + 1]), bucket=bucket)
    assert example_order(other) != example_order(full)


def example_order(batches):
    return [int(i) // 1000 for b in batches for i in b["input_ids"][:, 0]]


# ---------------------------------------------------------------- metrics

def test_metrics_hand_computed():
    preds, labels = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    assert accuracy(preds, labels) == pytest.approx(60.0)
    # TP = 2, FP = 1, FN = 1: precision = recall = 2/3, F1 = 2/3
    assert binary_f1(preds, labels) == pytest.approx(200 / 3)
    # TP = 1, FP = 3, FN = 0: precision 1/4, recall 1, F1 = 2 * (1/4) / (5/4) = 2/5
    assert binary_f1([1, 1, 1, 1], [1, 0, 0, 0]) == pytest.approx(40.0)
    assert binary_f1([0, 0], [0, 0]) == 0.0 and accuracy([0, 0], [0, 0]) == 100.0
    assert binary_f1(np.array([0, 1]), np.array([1, 0])) == 0.0
    with pytest.raises(ValueError, match="one shape"):
        accuracy([1, 0], [1])


def test_macro_f1_pearson_spearman_hand_computed():
    # class 0: TP 1, predicted 2, true 2 -> F1 1/2; class 1: TP 1, predicted 1, true 2 -> 2/3;
    # class 2: TP 0, predicted 1, true 0 -> 0
    assert macro_f1([0, 0, 1, 2], [0, 1, 1, 0], 3) == pytest.approx(100 * (1 / 2 + 2 / 3 + 0) / 3)
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(100.0) and pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-100.0)
    # centred: x -1.5 -.5 .5 1.5, y -1.5 .5 -.5 1.5: dot 4, both squared norms 5, r = 4/5
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(80.0)
    # monotone but not linear: Spearman 1, Pearson below; ties take their mean rank (2.5, 2.5)
    assert spearman([1, 2, 3, 4], [1, 10, 100, 1000]) == pytest.approx(100.0)
    assert pearson([1, 2, 3, 4], [1, 10, 100, 1000]) < 90
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(100 * 0.9486832980505138)


# ---------------------------------------------------------------- your own files

ROWS = [("a fine film", "good"), ('"so-so", says he', "meh"), ("awful", "bad"), ("great, great", "good")]


def write_table(path, rows, columns=("review", "stars")):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(dict(zip(columns, r))) + "\n" for r in rows))
    elif path.suffix == ".tsv":  # tabs only; a quote is text
        path.write_text("".join("\t".join(r) + "\n" for r in [columns, *rows]))
    else:
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows([columns, *rows])
    return path


@pytest.mark.parametrize("ext", [".csv", ".tsv", ".jsonl"])
def test_read_table_named_columns_in_every_format(tmp_path, ext):
    path = write_table(tmp_path / f"train{ext}", ROWS)
    examples = read_table(path, "review", None, "stars")
    assert examples == [(a, None, b) for a, b in ROWS]
    assert load_table(str(tmp_path), "train", "review", None, "stars") == examples
    labels, names = label_ids(examples)
    assert names == ["bad", "good", "meh"] and labels.tolist() == [1, 2, 0, 1]


def test_label_ids_numbers_by_value_regression_and_unknown_labels():
    examples = [("a", None, "10"), ("b", None, "2"), ("c", None, "-1.5")]
    assert label_ids(examples) == (pytest.approx(np.array([2, 1, 0])), ["-1.5", "2", "10"])
    floats, names = label_ids(examples, regression=True)
    assert names is None and floats.dtype == np.float32 and floats.tolist() == [10.0, 2.0, -1.5]
    with pytest.raises(ValueError, match="dev: label 'x' is not one of the training labels \\(-1.5, 2, 10\\)"):
        label_ids([("d", None, "x")], names=["-1.5", "2", "10"], where="dev")
    with pytest.raises(ValueError, match="train: label 'high' is not a number"):
        label_ids([("d", None, "high")], regression=True, where="train")


@pytest.mark.parametrize("ext, content, message", [
    (".csv", "review,stars\nok,good\nbad\n", "line 3: expected 2 columns (review, stars), got 1"),
    (".csv", "text,stars\nok,good\n", "line 2: no field 'review' (fields: text, stars)"),
    (".csv", "review,stars\n  ,good\n", "line 2: field 'review' is empty"),
    (".jsonl", '{"review": "ok", "stars": "good"}\n{oops\n', "line 2: not JSON"),
    (".jsonl", '["ok", "good"]\n', "line 1: expected a JSON object, got list"),
    (".tsv", "", "empty (expected a header line naming the columns)"),
    (".txt", "review\n", "expected a .csv, .tsv, .jsonl file"),
])
def test_bad_table_rows_name_file_line_and_field(tmp_path, ext, content, message):
    path = tmp_path / f"train{ext}"
    path.write_text(content)
    with pytest.raises(ValueError) as e:
        read_table(path, "review", None, "stars")
    assert str(e.value).startswith(f"{path}{' ' if message.startswith('line') else ': '}{message}")
    assert "\n" not in str(e.value)


def test_float_labels_batch_as_floats():
    enc = {"input_ids": [np.array([2, 5, 3])] * 2, "token_type_ids": [np.zeros(3, np.int32)] * 2}
    batch = next(glue_batches(enc, np.array([0.5, 2.0], np.float32), 2))
    assert batch["labels"].dtype == np.float32 and batch["labels"].tolist() == [0.5, 2.0]
