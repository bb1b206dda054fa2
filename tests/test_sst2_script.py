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
