"""SQuAD pipeline: loading and its errors, windows and answer positions, post-processing,
official EM/F1. Hand-made cases whose right answers follow from the rules, not from the code.
"""

import json
import os
import warnings

import numpy as np
import pytest

from nanobert import hub
from nanobert.squad import (SquadExample, exact_match, f1, load_squad, normalize_answer, postprocess_qa,
                            squad_em_f1, squad_windows, write_predictions)
from nanobert.tokenizer import SPECIAL_TOKENS, bert_wordpiece, load_tokenizer

DATA = os.path.join(os.path.dirname(__file__), "..", "data", "squad")


@pytest.fixture(scope="module")
def word_tok():
    """One token per word: context 't0 t1 ... t19' is tokens t0..t19 at known positions."""
    vocab = list(SPECIAL_TOKENS) + ["?", "q"] + [f"t{i}" for i in range(100)]
    return bert_wordpiece({t: i for i, t in enumerate(vocab)})


@pytest.fixture(scope="module")
def minilm_tok():
    return load_tokenizer(hub.resolve("all-MiniLM-L6-v2"))


def words(n):
    return " ".join(f"t{i}" for i in range(n))


def example(context, answer, start=None, qid="x", question="q?"):
    start = context.index(answer) if start is None else start
    return SquadExample(qid, "title", context, question, (answer,), (start,))


def word_start(i):
    """Character offset of word t{i} in words(n)."""
    return len(words(i)) + (1 if i else 0)


# --- windows ---------------------------------------------------------------------------------
# max_length 16, question "q?" (2 tokens): 16 - 2 - 3 = 11 context tokens per window; consecutive
# windows share doc_stride 4, so they start 7 tokens apart: t0-t10, t7-t17, t14-t19.
# Context token t{c} of the window starting at t{s} sits at index 4 + c - s ([CLS] q ? [SEP]).

WINDOW_STARTS = (0, 7, 14)


def positions(word_tok, first_word, last_word):
    context = words(20)
    answer = " ".join(f"t{i}" for i in range(first_word, last_word + 1))
    w = squad_windows([example(context, answer, word_start(first_word))], word_tok, max_length=16, doc_stride=4)
    return list(zip(w["start_positions"].tolist(), w["end_positions"].tolist()))


def expected_positions(first_word, last_word):
    out = []
    for s in WINDOW_STARTS:
        inside = s <= first_word and last_word <= min(s + 10, 19)
        out.append((4 + first_word - s, 4 + last_word - s) if inside else (0, 0))
    return out


def test_windows_layout(word_tok):
    w = squad_windows([example(words(20), "t3")], word_tok, max_length=16, doc_stride=4)
    ids = word_tok.get_vocab()
    cls, sep, pad = ids["[CLS]"], ids["[SEP]"], ids["[PAD]"]
    for row, s in enumerate(WINDOW_STARTS):
        context = [ids[f"t{i}"] for i in range(s, min(s + 11, 20))]
        tokens = [cls, ids["q"], ids["?"], sep] + context + [sep]
        n = len(tokens)
        assert w["input_ids"][row].tolist() == tokens + [pad] * (16 - n)
        assert w["token_type_ids"][row].tolist() == [0] * 4 + [1] * (n - 4) + [0] * (16 - n)
        assert w["attention_mask"][row].tolist() == [1] * n + [0] * (16 - n)
        assert w["lengths"][row] == n
        # offsets: the characters of each context word, -1 for [CLS], question, [SEP], padding
        expected = [[-1, -1]] * 4 + [[word_start(i), word_start(i) + len(f"t{i}")] for i in range(s, min(s + 11, 20))]
        assert w["offsets"][row].tolist() == expected + [[-1, -1]] * (16 - len(expected))
    assert w["example_index"].tolist() == [0, 0, 0]
    assert all(a.dtype == np.int32 for a in w.values())


@pytest.mark.parametrize("first_word,last_word", [
    (0, 0),    # answer is the first context token
    (19, 19),  # ... the last one
    (10, 10),  # last token of window 0, inside window 1
    (7, 7),    # first token of window 1, inside window 0
    (14, 17),  # fills the end of window 1 exactly, starts window 2
    (9, 11),   # cut by window 0's end: [CLS] there, whole in window 1
    (12, 15),  # whole in window 1, cut by window 2's start
])
def test_answer_positions_at_window_edges(word_tok, first_word, last_word):
    assert positions(word_tok, first_word, last_word) == expected_positions(first_word, last_word)


def test_answer_split_across_windows_points_at_cls(word_tok):
    # t5..t15 is in no single window: every window must point at [CLS]
    assert positions(word_tok, 5, 15) == [(0, 0)] * 3


def test_windows_of_examples_are_contiguous(word_tok):
    examples = [example(words(20), "t3", qid="a"), example(words(5), "t4", qid="b"), example(words(12), "t11", qid="c")]
    w = squad_windows(examples, word_tok, max_length=16, doc_stride=4)
    # 20 words -> 3 windows; 5 words -> 1; 12 words -> t0-t10, t7-t11 = 2
    assert w["example_index"].tolist() == [0, 0, 0, 1, 2, 2]
    assert w["start_positions"].tolist() == [7, 0, 0, 8, 0, 8]


def test_eval_windows_have_no_labels_and_same_tokens(word_tok):
    ex = [example(words(20), "t3")]
    train = squad_windows(ex, word_tok, max_length=16, doc_stride=4)
    evaluation = squad_windows(ex, word_tok, max_length=16, doc_stride=4, train=False)
    assert "start_positions" not in evaluation and "end_positions" not in evaluation
    for key in evaluation:
        np.testing.assert_array_equal(train[key], evaluation[key])


@pytest.mark.parametrize("context,answer", [
    ("Café  au   lait\twith Zoë's crème   brûlée, naïvely.", "crème   brûlée"),
    ("Ångström measured it first.", "Ångström"),         # answer at context start, accented
    ("The capital of Iceland is Reykjavík", "Reykjavík"),  # answer at context end
    ("   Leading spaces   then São Paulo \n\n and more", "São Paulo"),
    ("Straße und Maßstab in Köln", "Maßstab"),
])
def test_unicode_answers_map_back_to_their_text(minilm_tok, context, answer):
    w = squad_windows([example(context, answer, question="   what?")], minilm_tok)
    s, e = w["start_positions"][0], w["end_positions"][0]
    assert 0 < s <= e
    span = w["offsets"][0, s, 0], w["offsets"][0, e, 1]
    assert context[span[0]:span[1]] == answer


def test_answer_inside_a_word_takes_the_whole_tokens(minilm_tok):
    # run_qa labels the tokens that contain the answer's first and last character
    context = "Prices rose in the 1990s and fell."
    w = squad_windows([example(context, "1990")], minilm_tok)
    s, e = w["start_positions"][0], w["end_positions"][0]
    start, end = w["offsets"][0, s, 0], w["offsets"][0, e, 1]
    assert start == context.index("1990") and end >= context.index("1990") + 4
    assert context[start:end].startswith("1990")


@pytest.mark.parametrize("max_question_length,kept", [
    (5, 5),    # the limit asked for
    (64, 8),   # 16 - 3 special tokens - 4 stride - 1: the window must hold more context than the stride
])
def test_long_question_is_cut_with_a_warning(word_tok, max_question_length, kept):
    ex = SquadExample("long", "t", words(30), " ".join(["q"] * 12) + "?", ("t2",), (word_start(2),))
    with pytest.warns(UserWarning, match=f"cut 1 questions to their first {kept} tokens"):
        w = squad_windows([ex], word_tok, max_length=16, doc_stride=4, max_question_length=max_question_length)
    ids = word_tok.get_vocab()
    assert w["input_ids"][0, :kept + 2].tolist() == [ids["[CLS]"]] + [ids["q"]] * kept + [ids["[SEP]"]]
    assert w["start_positions"][0] == kept + 2 + 2  # [CLS] question [SEP] t0 t1 t2


def test_impossible_window_settings_are_refused(word_tok):
    with pytest.raises(ValueError, match="leaves no room for the question"):
        squad_windows([example(words(5), "t1")], word_tok, max_length=16, doc_stride=12)


def test_callers_tokenizer_is_untouched(word_tok):
    squad_windows([example(words(20), "t1")], word_tok, max_length=16, doc_stride=4)
    assert word_tok.truncation is None and word_tok.padding is None


# --- post-processing -------------------------------------------------------------------------


def test_postprocess_never_leaves_the_context(minilm_tok):
    rng = np.random.default_rng(0)
    examples, _ = load_squad(os.path.join(DATA, "eval.json"))
    examples = examples[:40]
    w = squad_windows(examples, minilm_tok, train=False)
    start, end = rng.normal(size=(2,) + w["input_ids"].shape)
    # make [CLS], question and padding the most tempting positions
    not_context = w["offsets"][..., 0] < 0
    start[not_context] += 100
    end[not_context] += 100
    predictions = postprocess_qa(examples, w, start, end, n_best=200)
    for ex in examples:
        text, score = predictions[ex.id]
        assert text and text in ex.context and np.isfinite(score)


def test_postprocess_picks_the_best_window_and_obeys_the_limits(word_tok):
    ex = [example(words(20), "t3", qid="a")]
    w = squad_windows(ex, word_tok, max_length=16, doc_stride=4, train=False)
    start, end = np.zeros((3, 16)), np.zeros((3, 16))
    start[0, 4 + 3], end[0, 4 + 5] = 5, 5          # window 0: t3..t5, score 10
    start[1, 4 + 9 - 7], end[1, 4 + 12 - 7] = 6, 6  # window 1: t9..t12, score 12: the best
    start[2, 4 + 18 - 14], end[2, 4 + 15 - 14] = 9, 9  # window 2: end before start: invalid
    start[1, 15], end[1, 15] = 50, 50               # the final [SEP]: not context
    assert postprocess_qa(ex, w, start, end)["a"] == ("t9 t10 t11 t12", 12.0)
    # 4 tokens is over max_answer_length 3: window 0's t3..t5 wins
    assert postprocess_qa(ex, w, start, end, max_answer_length=3)["a"] == ("t3 t4 t5", 10.0)


def test_postprocess_ignores_padding_logits(word_tok):
    ex = [example(words(5), "t1", qid="a")]
    w = squad_windows(ex, word_tok, max_length=16, doc_stride=4, train=False)  # 10 real tokens, 6 padding
    start, end = np.zeros((1, 16)), np.zeros((1, 16))
    start[0, 4 + 1], end[0, 4 + 2] = 1, 1
    padded = start.copy(), end.copy()
    padded[0][0, 10:] = padded[1][0, 10:] = 1e9
    assert postprocess_qa(ex, w, start, end) == postprocess_qa(ex, w, *padded) == {"a": ("t1 t2", 2.0)}
    # the trainer may hand over logits only as wide as the batch's longest window
    assert postprocess_qa(ex, w, start[:, :10], end[:, :10]) == {"a": ("t1 t2", 2.0)}


def test_postprocess_without_a_valid_span_answers_empty(word_tok):
    ex = [example(words(5), "t1", qid="a")]
    w = squad_windows(ex, word_tok, max_length=16, doc_stride=4, train=False)
    start, end = np.zeros((1, 16)), np.zeros((1, 16))
    start[0, 1] = 5  # the question's first token is the only start candidate with n_best=1
    assert postprocess_qa(ex, w, start, end, n_best=1) == {"a": ("", float("-inf"))}


# --- metrics (values by hand from evaluate-v1.1.py's formulas) -------------------------------


def test_normalize_answer():
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("U.S. Army, an army") == "us army army"
    assert normalize_answer("Saint-Denis") == "saintdenis"  # punctuation is removed, not spaced
    assert normalize_answer("Theatre and anthem") == "theatre and anthem"  # only whole-word articles


def test_exact_match_and_f1():
    assert exact_match("the Broncos.", "Broncos") == 1.0
    assert exact_match("Saint Denis", "Saint-Denis") == 0.0
    assert f1("Denver Broncos", "the Broncos") == pytest.approx(2 / 3)  # P 1/2, R 1
    assert f1("red blue green", "blue green yellow orange") == pytest.approx(4 / 7)  # P 2/3, R 1/2
    assert f1("new new york", "new york") == pytest.approx(0.8)  # counts clip: P 2/3, R 1
    assert f1("", "anything") == 0.0
    assert f1("the", "a") == 0.0 and exact_match("the", "a") == 1.0  # both normalize to ""


def test_squad_em_f1_takes_the_best_reference():
    examples = [SquadExample("a", "t", "c", "q", ("Denver Broncos", "Broncos"), (0, 7)),
                SquadExample("b", "t", "c", "q", ("Carolina Panthers",), (0,)),
                SquadExample("c", "t", "c", "q", ("Santa Clara",), (0,))]
    with pytest.warns(UserWarning, match="1 questions have no prediction"):
        scores = squad_em_f1({"a": "the Broncos", "b": "Panthers"}, examples)
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)


def test_write_predictions(tmp_path):
    path = tmp_path / "predictions.json"
    write_predictions(path, {"a": "Zoë", "b": ""})
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": "Zoë", "b": ""}
    assert os.listdir(tmp_path) == ["predictions.json"]


# --- loading ---------------------------------------------------------------------------------


def squad_file(tmp_path, qas, context="Denver won the game."):
    path = tmp_path / "squad.json"
    path.write_text(json.dumps({"data": [{"title": "T", "paragraphs": [{"context": context, "qas": qas}]}]}))
    return path


def qa(qid, answer="Denver", start=0, question="Who won?"):
    return {"id": qid, "question": question, "answers": [{"text": answer, "answer_start": start}]}


def test_shipped_excerpts_load_cleanly():
    train, skipped_train = load_squad(os.path.join(DATA, "train.json"))
    evaluation, skipped_eval = load_squad(os.path.join(DATA, "eval.json"))
    assert skipped_train == {} and skipped_eval == {}
    assert len(train) == 357 and len(evaluation) == 189  # the counts of the cut in data/squad/README.md
    assert not {ex.title for ex in train} & {ex.title for ex in evaluation}  # held-out articles


def test_bad_answers_are_skipped_not_fatal(tmp_path):
    path = squad_file(tmp_path, [qa("good"), qa("shifted", start=3), qa("negative", start=-20),
                                 qa("blank", question="  "),
                                 {"id": "v2", "question": "Who lost?", "answers": []}])
    examples, skipped = load_squad(path)
    assert [ex.id for ex in examples] == ["good"]
    assert examples[0].answer_texts == ("Denver",) and examples[0].answer_starts == (0,)
    assert skipped == {"answer_start does not point at the answer text": ["shifted", "negative"],
                       "empty question": ["blank"],
                       "no answers (SQuAD v2 unanswerable questions are not supported)": ["v2"]}


@pytest.mark.parametrize("content,message", [
    ("", "empty file"),
    ('{"data": [', "line 1 column 11: not valid JSON"),
    ('{"version": "1.1"}', "top level: missing 'data'"),
    ('{"data": []}', "no usable questions"),
    ('{"data": [{"title": "T", "paragraphs": [{"qas": []}]}]}', r"data\[0\].paragraphs\[0\]: missing 'context'"),
    ('{"data": [{"title": "T", "paragraphs": [{"context": "c", "qas": [{"id": "q7", "answers": []}]}]}]}',
     r"qas\[0\] \(id q7\): missing 'question'"),
    ('{"data": [{"title": "T", "paragraphs": [{"context": "c", "qas": [{"id": "q7", "question": "?", '
     '"answers": [{"text": "c", "answer_start": "0"}]}]}]}]}',
     r"answers\[0\].answer_start: expected int, got str"),
])
def test_malformed_files_name_file_and_field(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as e:
        load_squad(path)
    assert str(path) in str(e.value)


def test_other_unreadable_files(tmp_path):
    with pytest.raises(ValueError, match=r"qas\[1\] \(id a\): question id used twice"):
        load_squad(squad_file(tmp_path, [qa("a"), qa("a")]))
    with pytest.raises(ValueError, match="no usable questions .1 skipped: answer_start does not point"):
        load_squad(squad_file(tmp_path, [qa("a", start=5)]))
    with pytest.raises(FileNotFoundError, match="no such SQuAD file"):
        load_squad(tmp_path / "missing.json")
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes('{"data": "Café"}'.encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.json: not UTF-8 text .byte 13."):
        load_squad(latin1)


def test_no_warnings_on_clean_data(minilm_tok):
    examples, _ = load_squad(os.path.join(DATA, "train.json"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w = squad_windows(examples, minilm_tok)
    assert w["example_index"][0] == 0 and np.all(np.diff(w["example_index"]) >= 0)
    assert np.all(np.diff(w["example_index"]) <= 1)  # contiguous, every example has a window
