"""nanobert.squad against HF run_qa, token for token, on the shipped SQuAD excerpts.

The reference is run_qa's prepare_train_features / prepare_validation_features on
transformers' fast AutoTokenizer (written as in shared/yardstick/hf_squad.py), and the
plain loop of its post-processing. Windows, labels, example mapping, offsets and answers
must be identical.
"""

import os

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from nanobert import hub  # noqa: E402
from nanobert.squad import load_squad, postprocess_qa, squad_windows  # noqa: E402
from nanobert.tokenizer import load_tokenizer  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "..", "data", "squad")
FULL_DEV = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "squad", "v1.1", "dev-v1.1.json")
MAX_LENGTH, STRIDE = 384, 128


def hf_windows(tok, examples, max_length=MAX_LENGTH, stride=STRIDE):
    """run_qa's feature preparation: train labels and eval offsets (None outside the context)."""
    enc = tok([ex.question.lstrip() for ex in examples], [ex.context for ex in examples],
              truncation="only_second", max_length=max_length, stride=stride,
              return_overflowing_tokens=True, return_offsets_mapping=True, padding="max_length")
    sample_map, starts, ends, offsets = enc["overflow_to_sample_mapping"], [], [], []
    for i, off in enumerate(enc["offset_mapping"]):
        seq = enc.sequence_ids(i)
        ex = examples[sample_map[i]]
        s_char = ex.answer_starts[0]
        e_char = s_char + len(ex.answer_texts[0])
        cs = seq.index(1)
        ce = len(seq) - 1 - seq[::-1].index(1)
        offsets.append([o if seq[k] == 1 else None for k, o in enumerate(off)])
        if not (off[cs][0] <= s_char and off[ce][1] >= e_char):
            starts.append(0)
            ends.append(0)
            continue
        ts = cs
        while ts <= ce and off[ts][0] <= s_char:
            ts += 1
        te = ce
        while te >= cs and off[te][1] >= e_char:
            te -= 1
        starts.append(ts - 1)
        ends.append(te + 1)
    return dict(input_ids=enc["input_ids"], token_type_ids=enc["token_type_ids"],
                attention_mask=enc["attention_mask"], example_index=sample_map,
                start_positions=starts, end_positions=ends, offsets=offsets)


def hf_postprocess(examples, example_index, offsets, lengths, start_logits, end_logits, n_best=20, max_answer_length=30):
    """hf_squad.py's loop, over each window's real tokens."""
    windows_of = {}
    for row, i in enumerate(example_index):
        windows_of.setdefault(i, []).append(row)
    predictions = {}
    for i, ex in enumerate(examples):
        best, best_score = "", -1e9
        for row in windows_of[i]:
            sl, el, off = start_logits[row][:lengths[row]], end_logits[row][:lengths[row]], offsets[row]
            for s in np.argsort(sl)[-n_best:][::-1]:
                for e in np.argsort(el)[-n_best:][::-1]:
                    if off[s] is None or off[e] is None or e < s or e - s + 1 > max_answer_length:
                        continue
                    if sl[s] + el[e] > best_score:
                        best_score, best = sl[s] + el[e], ex.context[off[s][0]:off[e][1]]
        predictions[ex.id] = best
    return predictions


@pytest.fixture(scope="module")
def tokenizers():
    path = hub.resolve("all-MiniLM-L6-v2")
    return load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path, use_fast=True)


@pytest.mark.parametrize("path", [pytest.param(os.path.join(DATA, "train.json"), id="train"),
                                  pytest.param(os.path.join(DATA, "eval.json"), id="eval"),
                                  pytest.param(FULL_DEV, marks=pytest.mark.slow, id="full-dev")])
def test_windows_match_run_qa(tokenizers, path):
    if not os.path.exists(path):
        pytest.skip(f"{path} not found")
    ours_tok, hf_tok = tokenizers
    examples, skipped = load_squad(path)
    assert not skipped
    ours, ref = squad_windows(examples, ours_tok), hf_windows(hf_tok, examples)
    for key in ("input_ids", "token_type_ids", "attention_mask", "example_index", "start_positions", "end_positions"):
        np.testing.assert_array_equal(ours[key], np.array(ref[key]), err_msg=key)
    ref_offsets = np.array([[o if o is not None else (-1, -1) for o in row] for row in ref["offsets"]])
    np.testing.assert_array_equal(ours["offsets"], ref_offsets)
    np.testing.assert_array_equal(ours["lengths"], np.array(ref["attention_mask"]).sum(1))


def test_small_windows_match_run_qa(tokenizers):
    # many windows per example: labels at every kind of window edge
    ours_tok, hf_tok = tokenizers
    examples, _ = load_squad(os.path.join(DATA, "eval.json"))
    ours, ref = squad_windows(examples, ours_tok, max_length=96, doc_stride=32), hf_windows(hf_tok, examples, 96, 32)
    assert len(ours["input_ids"]) > 3 * len(examples)
    for key in ("input_ids", "example_index", "start_positions", "end_positions"):
        np.testing.assert_array_equal(ours[key], np.array(ref[key]), err_msg=key)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_postprocess_matches_reference_loop(tokenizers, seed):
    examples, _ = load_squad(os.path.join(DATA, "eval.json"))
    w = squad_windows(examples, tokenizers[0], max_length=128, doc_stride=48, train=False)
    rng = np.random.default_rng(seed)
    start_logits, end_logits = rng.normal(size=(2,) + w["input_ids"].shape).astype(np.float32)
    ref_offsets = [[tuple(o) if o[0] >= 0 else None for o in row] for row in w["offsets"].tolist()]
    ours = postprocess_qa(examples, w, start_logits, end_logits)
    ref = hf_postprocess(examples, w["example_index"], ref_offsets, w["lengths"], start_logits, end_logits)
    assert {k: text for k, (text, _) in ours.items()} == ref
