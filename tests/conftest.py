"""Session fixtures: a tiny model directory (what --init expects) and a tiny GLUE-style data set."""

import numpy as np
import pytest

from tiny import save_tiny_model, synthetic_sentences


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"))  # dropout 0.1, as BERT


@pytest.fixture(scope="session")
def tiny_model_nodrop_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_model_nodrop"), hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="session")
def tiny_glue_dir(tmp_path_factory):
    """SST-2-format train.tsv (40 rows) and dev.tsv (16 rows); label 1 iff a positive word occurs."""
    d = tmp_path_factory.mktemp("tiny_glue")
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("dev", 16)):
        rows = synthetic_sentences(rng, n)
        (d / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(f"{s} \t{y}\n" for s, y in rows))
    return str(d)
