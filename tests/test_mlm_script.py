"""train_mlm.py end to end on a tiny synthetic corpus: data preparation on first run, training
on both backends, the shared-format checkpoint HF opens, --show, exact resume, and DDP
(torchrun / mlx.launch, 2 processes x batch b == 1 process x batch 2b)."""

import os
import shutil
import sys

import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file

from test_training import BACKENDS, assert_weights_equal, launcher, ok
from tiny import WORDS, run_script


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Plain text, BERT's format: a sentence per line, documents separated by blank lines."""
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(24):
        lines = [" ".join(rng.choice(WORDS, rng.integers(4, 10))).capitalize() + "." for _ in range(rng.integers(3, 7))]
        docs.append("\n".join(lines))
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(docs) + "\n")
    return str(path)


def mlm_args(corpus, data_dir, out, *extra):
    return ["train_mlm.py", f"--input={corpus}", f"--data_dir={data_dir}", f"--out_dir={out}", "--vocab_size=120",
            "--max_len=32", "--val_fraction=0.2", "--num_hidden_layers=1", "--hidden_size=16",
            "--num_attention_heads=2", "--intermediate_size=32", "--batch_size=8", "--max_steps=6", "--eval_every=3",
            "--log_every=1", "--warmup=1", *extra]


@pytest.mark.parametrize("backend", BACKENDS)
def test_prepare_train_save_show(backend, corpus, tmp_path):
    out = ok(run_script(mlm_args(corpus, tmp_path / "data", tmp_path / "out", f"--backend={backend}")))
    assert "unigram baseline accuracy" in out.stdout and "step 6: val_loss" in out.stdout
    assert "masked accuracy" in out.stdout  # the prediction display at each evaluation
    for name in ("summary.json", "vocab.txt", "train-00000.msgpack", "val-00000.msgpack"):
        assert (tmp_path / "data" / name).exists(), name
    best = tmp_path / "out" / "best"
    assert (tmp_path / "out" / "metrics.png").stat().st_size > 1000
    hf = transformers.BertForMaskedLM.from_pretrained(best)  # the shared format, with its tokenizer
    ours = load_file(best / "model.safetensors")
    np.testing.assert_array_equal(hf.bert.embeddings.word_embeddings.weight.detach().numpy(),
                                  ours["bert.embeddings.word_embeddings.weight"])
    assert transformers.AutoTokenizer.from_pretrained(best)("good movie")["input_ids"][0] == 2  # [CLS]
    shown = ok(run_script(["train_mlm.py", f"--show={best}", f"--data_dir={tmp_path / 'data'}",
                           f"--backend={backend}"]))
    assert "masked accuracy" in shown.stdout


def test_whole_word_masking_trains(corpus, tmp_path):
    out = ok(run_script(mlm_args(corpus, tmp_path / "data", tmp_path / "out", "--whole_word_mask=true",
                                 "--max_steps=3")))
    assert "step 3: val_loss" in out.stdout
    bad = run_script(["train_mlm.py", "--whole_word_mask=maybe"])
    assert bad.returncode == 2 and "whole_word_mask" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_resume_equals_straight_run(corpus, tmp_path):
    """The shard stream position and the (seed, batch number) masking resume exactly."""
    common = ["--save_every=2", "--max_checkpoints=5", "--eval_every=100"]
    ok(run_script(mlm_args(corpus, tmp_path / "data", tmp_path / "straight", *common)))
    os.makedirs(tmp_path / "resumed")
    shutil.copytree(tmp_path / "straight" / "ckpt-000004", tmp_path / "resumed" / "ckpt-000004")
    ok(run_script(mlm_args(corpus, tmp_path / "data", tmp_path / "resumed", *common, "--resume")))
    straight = load_file(tmp_path / "straight" / "ckpt-000006" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "ckpt-000006" / "model.safetensors")
    assert_weights_equal(straight, resumed, 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddp_two_processes_equal_one_process_double_batch(backend, corpus, tmp_path):
    """MLM batches hold different numbers of masked tokens per process: gradients are weighted
    by the global token count, so the two runs still match (dropout off, by design)."""
    nodrop = ["--hidden_dropout_prob=0", "--attention_probs_dropout_prob=0", f"--backend={backend}"]
    ok(run_script(mlm_args(corpus, tmp_path / "data", tmp_path / "prep", "--max_steps=1", *nodrop)))  # data once
    single = mlm_args(corpus, tmp_path / "data", tmp_path / "one", *nodrop)
    single[single.index("--batch_size=8")] = "--batch_size=16"
    ok(run_script(single))
    if backend == "torch":
        launch = [launcher("torchrun"), "--nproc_per_node=2"]
    else:
        launch = [launcher("mlx.launch"), "-n", "2", "--backend", "ring", "--", sys.executable]
    two = ok(run_script(mlm_args(corpus, tmp_path / "data", tmp_path / "two", *nodrop), launcher=launch, timeout=240))
    assert "(2 process(es))" in two.stdout
    assert_weights_equal(load_file(tmp_path / "one" / "ckpt-000006" / "model.safetensors"),
                         load_file(tmp_path / "two" / "ckpt-000006" / "model.safetensors"), 1e-5)


def test_compile_is_for_the_torch_backend(corpus, tmp_path):
    out = run_script(mlm_args(corpus, tmp_path / "data", tmp_path / "out", "--backend=mlx", "--compile"), timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: compile:") and "--backend torch" in last, out.stderr
    assert not (tmp_path / "data").exists()  # refused before any work


@pytest.mark.parametrize("content, message", [
    ("", "no text"),
    (b"\xff\xfe not utf-8", "not UTF-8"),
])
def test_bad_input_text_is_one_clear_line(content, message, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = run_script(mlm_args(str(bad), tmp_path / "data", tmp_path / "out"), timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(bad) in last and message in last, out.stderr
