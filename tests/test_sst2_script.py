"""train_sst2.py beyond the machinery tests: dynamic padding changes no logit, --predict on a
sentence and on a pair, an MRPC-format run on synthetic pairs, bad TSV input."""

import json
import os

import numpy as np
import pytest

from test_training import BACKENDS, ok
from tiny import WORDS, run_script, synthetic_sentences
from nanobert import glue
from nanobert.tokenizer import load_tokenizer
from nanobert.training import load_backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_dynamic_padding_gives_the_same_logits_as_fixed_padding(backend, tiny_model_dir):
    """Padding is masked out of attention, so padding to the batch's longest example (dynamic)
    instead of to 48 (fixed) changes no example's logits."""
    models, E = load_backend(backend)
    model = models.BertForSequenceClassification.from_pretrained(tiny_model_dir)
    examples = [(s, None, y) for s, y in synthetic_sentences(np.random.default_rng(1), 20)]
    enc = glue.encode_glue(load_tokenizer(tiny_model_dir), examples, 48)
    labels = np.array([y for *_, y in examples])
    logits = {}
    for pad_to in (None, 48):
        out = [E.predict(model, {k: v for k, v in b.items() if k != "labels"})["logits"]
               for b in glue.glue_batches(enc, labels, 6, pad_to=pad_to)]
        logits[pad_to] = np.concatenate(out)
    assert logits[None].shape == (20, 2)
    np.testing.assert_allclose(logits[None], logits[48], atol=1e-5 if backend == "torch" else 1e-4)


@pytest.fixture(scope="module")
def mrpc_dir(tmp_path_factory):
    """MRPC-format TSVs (BOM, 5 columns, a lone quote in a sentence) of synthetic pairs:
    label 1 iff both sentences carry a word of the same sentiment."""
    d = tmp_path_factory.mktemp("mrpc")
    rng = np.random.default_rng(3)
    for split, n in (("train", 32), ("dev", 12)):
        rows = []
        for i, ((a, ya), (b, yb)) in enumerate(zip(synthetic_sentences(rng, n), synthetic_sentences(rng, n))):
            quote = '"' if i == 0 else ""  # a lone quote: not CSV quoting in MRPC
            rows.append(f"{int(ya == yb)}\t{i}\t{i + 1000}\t{quote}{a}\t{b}\n")
        (d / f"{split}.tsv").write_text("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n" + "".join(rows),
                                        encoding="utf-8")
    return str(d)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mrpc_pairs_train_and_predict(backend, tiny_model_dir, mrpc_dir, tmp_path):
    out = ok(run_script(["train_sst2.py", "--task=mrpc", f"--data={mrpc_dir}", f"--init={tiny_model_dir}",
                         f"--out_dir={tmp_path}", f"--backend={backend}", "--batch_size=8", "--epochs=2",
                         "--lr=1e-3", "--log_every=1"]))
    assert "32 train / 12 dev examples" in out.stdout and "best dev f1" in out.stdout
    # the run's record (results/ holds such files; nanobert.report renders the README from them)
    record = json.loads((tmp_path / "run.json").read_text())
    last = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["settings"]["backend"] == backend and record["steps"] == 8 and record["cores"] == os.cpu_count()
    assert record["metrics"] == {k: last[k] for k in ("dev_accuracy", "dev_f1")} and record["train_s"] > 0
    assert record["command"].startswith("python train_sst2.py --task=mrpc") and record["versions"]["numpy"]
    pred = ok(run_script(["train_sst2.py", "--task=mrpc", f"--init={tmp_path / 'best'}", f"--backend={backend}",
                          "--predict=the movie was good .", "--pair=a great film ."]))
    label, prob = pred.stdout.strip().split("\t")
    assert label in ("equivalent", "not_equivalent") and 0.5 <= float(prob) <= 1.0


def test_predict_single_sentence(tiny_model_dir):
    out = ok(run_script(["train_sst2.py", f"--init={tiny_model_dir}", "--predict=a very good film ."]))
    label, prob = out.stdout.strip().splitlines()[-1].split("\t")
    assert label in ("positive", "negative") and 0.5 <= float(prob) <= 1.0


def test_bad_tsv_is_one_line_with_line_number(tiny_model_dir, tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood film \t1\nno tab here\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\ngood film \t1\n")
    out = run_script(["train_sst2.py", f"--init={tiny_model_dir}", f"--data={tmp_path}", f"--out_dir={tmp_path / 'o'}"])
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == \
        f"error: {tmp_path / 'train.tsv'} line 3: expected 2 tab-separated columns, got 1"


def test_words_cover_the_tiny_vocabulary():
    assert len(set(WORDS)) == len(WORDS)  # the tiny vocab.txt has no duplicate tokens


def write_own_data(d, ext, rows_of):
    """train + dev in the format of `ext`: text column "review", label column "stars"."""
    import csv
    rng = np.random.default_rng(0)
    d.mkdir()
    for split, n in (("train", 36), ("dev", 12)):
        rows = [rows_of(rng) for _ in range(n)]
        if ext == ".jsonl":
            (d / f"{split}{ext}").write_text("".join(json.dumps({"review": a, "stars": b}) + "\n" for a, b in rows))
        else:
            with open(d / f"{split}{ext}", "w", newline="") as f:
                csv.writer(f).writerows([("review", "stars"), *rows])
    return d


def three_classes(rng):
    kind = int(rng.integers(0, 3))
    words = list(rng.choice(WORDS[8:], 4)) + [("good", "bad", "the")[kind]]
    return " ".join(words), ("positive", "negative", "neutral")[kind]


@pytest.mark.parametrize("backend", BACKENDS)
def test_own_csv_with_three_classes(backend, tiny_model_dir, tmp_path):
    data = write_own_data(tmp_path / "data", ".csv", three_classes)
    out = ok(run_script(["train_sst2.py", "--task=custom", f"--data={data}", "--text_column=review",
                         "--label_column=stars", f"--init={tiny_model_dir}", f"--out_dir={tmp_path / 'out'}",
                         f"--backend={backend}", "--batch_size=8", "--epochs=2", "--lr=1e-3"]))
    assert "custom: 36 train / 12 dev examples" in out.stdout and "best dev accuracy" in out.stdout
    config = json.loads((tmp_path / "out" / "best" / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    assert set(json.loads((tmp_path / "out" / "run.json").read_text())["metrics"]) == {"dev_accuracy", "dev_macro_f1"}
    pred = ok(run_script(["train_sst2.py", f"--init={tmp_path / 'out' / 'best'}", f"--backend={backend}",
                          "--predict=a good film"]))
    label, prob = pred.stdout.strip().split("\t")
    assert label in ("negative", "neutral", "positive") and 1 / 3 <= float(prob) <= 1


def test_own_jsonl_regression(tiny_model_dir, tmp_path):
    data = write_own_data(tmp_path / "data", ".jsonl", lambda rng: (lambda k: (
        " ".join(rng.choice(WORDS[8:], 3)) + " good" * k, str(k / 2)))(int(rng.integers(0, 4))))
    out = ok(run_script(["train_sst2.py", "--task=custom", f"--data={data}", "--text_column=review",
                         "--label_column=stars", "--regression=true", f"--init={tiny_model_dir}",
                         f"--out_dir={tmp_path / 'out'}", "--backend=mlx", "--batch_size=8", "--epochs=2"]))
    assert "best dev pearson" in out.stdout
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert set(record["metrics"]) == {"dev_pearson", "dev_spearman", "dev_mse"}
    assert json.loads((tmp_path / "out" / "best" / "config.json").read_text())["problem_type"] == "regression"
    pred = ok(run_script(["train_sst2.py", f"--init={tmp_path / 'out' / 'best'}", "--predict=the film good good"]))
    float(pred.stdout.strip())  # one number


def test_own_data_bad_column_is_one_line(tiny_model_dir, tmp_path):
    data = write_own_data(tmp_path / "data", ".csv", three_classes)
    proc = run_script(["train_sst2.py", "--task=custom", f"--data={data}", "--text_column=text",
                       f"--init={tiny_model_dir}", f"--out_dir={tmp_path / 'out'}"])
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert f"{data / 'train.csv'} line 2: no field 'text' (fields: review, stars)" in proc.stderr
