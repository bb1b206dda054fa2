"""Tiny things for tests: a random BERT with its own small vocabulary, synthetic GLUE-style
sentences whose label a model can learn, and running the top-level scripts."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("good great fine nice bad awful poor sad the a movie film plot actor was is very not quite "
         "really story scene music long short").split()


def tiny_config(**kw):
    from nanobert.config import BertConfig
    return BertConfig(**{**dict(vocab_size=5 + len(WORDS) + 3, hidden_size=16, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=32, max_position_embeddings=64), **kw})


def save_tiny_model(d, **config):
    """A random BertForSequenceClassification + vocab.txt in `d`: what --init expects."""
    import torch
    from nanobert import model_torch as T
    torch.manual_seed(0)
    T.BertForSequenceClassification(tiny_config(**config)).init_weights().save_pretrained(d)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(WORDS) + [".", ",", "!"]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return str(d)


def synthetic_sentences(rng, n):
    good, bad = WORDS[:4], WORDS[4:8]
    rows = []
    for _ in range(n):
        label = int(rng.integers(0, 2))
        words = list(rng.choice(WORDS[8:], rng.integers(2, 9)))
        words.insert(int(rng.integers(0, len(words) + 1)), rng.choice(good if label else bad))
        rows.append((" ".join(words) + " .", label))
    return rows


def run_script(args, launcher=None, timeout=300, env=None):
    """Run a top-level script in a fresh process (with `launcher`, e.g. [torchrun, ...], instead
    of plain python), on one thread (see conftest.one_torch_thread). Returns the
    CompletedProcess; the timeout turns a hang into a failure."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", **(env or {})}
    return subprocess.run((launcher or [sys.executable]) + args, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)
