"""SQuAD v1.1 extractive QA: read the data, cut it into model windows, read answers back
out of the logits, and score them with the official metrics.

    load_squad       SQuAD JSON -> examples (questions with their context and answers)
    squad_windows    examples -> fixed-length token windows + answer token positions
    postprocess_qa   start/end logits of the windows -> best answer text per question
    squad_em_f1      official exact match and F1 (evaluate-v1.1.py)

The windows and the answer search follow HF's run_qa (prepare_train_features,
prepare_validation_features, postprocess_qa_predictions) exactly, so results compare with
the HF recipe; the parity suite checks this token for token. Data code: numpy only, no
torch or mlx.
"""

import collections
import json
import re
import string
import warnings
from typing import NamedTuple

import numpy as np
from tokenizers import Tokenizer

from nanobert.fileio import atomic_path
from nanobert.tokenizer import special_ids


class SquadExample(NamedTuple):
    id: str
    title: str
    context: str
    question: str
    answer_texts: tuple  # reference answers; training uses the first one (as run_qa)
    answer_starts: tuple  # character offset of each answer in context


# --- reading ---------------------------------------------------------------------------------


def load_squad(path, articles=None):
    """Read a SQuAD v1.1 JSON file -> (examples, skipped). articles: a slice of the articles
    to read (e.g. slice(0, 24): the first 24), default all.

    A file that is not SQuAD (not JSON, a missing or mistyped field, a repeated question id,
    no questions) raises ValueError naming the file and the field. A question that is readable
    but unusable is left out and listed in `skipped`, {reason: [question ids]}, for the caller
    to report; reasons: an answer whose answer_start does not point at its text, an empty
    context, question or answer, no answers (SQuAD v2 unanswerable questions).
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such SQuAD file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise ValueError(f"{path}: empty file")
    try:
        root = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {e.lineno} column {e.colno}: not valid JSON ({e.msg})") from None

    def field(obj, key, kind, where):
        if not isinstance(obj, dict) or key not in obj:
            raise ValueError(f"{path}: {where}: missing '{key}'")
        if not isinstance(obj[key], kind):
            raise ValueError(f"{path}: {where}.{key}: expected {kind.__name__}, got {type(obj[key]).__name__}")
        return obj[key]

    examples, skipped, seen = [], collections.defaultdict(list), set()
    data = field(root, "data", list, "top level")
    for i in range(len(data))[articles or slice(None)]:
        article = data[i]
        title = field(article, "title", str, f"data[{i}]")
        for j, paragraph in enumerate(field(article, "paragraphs", list, f"data[{i}]")):
            where = f"data[{i}].paragraphs[{j}]"
            context = field(paragraph, "context", str, where)
            for k, qa in enumerate(field(paragraph, "qas", list, where)):
                qid = field(qa, "id", str, f"{where}.qas[{k}]")
                where_q = f"{where}.qas[{k}] (id {qid})"
                if qid in seen:
                    raise ValueError(f"{path}: {where_q}: question id used twice")
                seen.add(qid)
                question = field(qa, "question", str, where_q)
                answers = field(qa, "answers", list, where_q)
                texts = tuple(field(a, "text", str, f"{where_q}.answers[{n}]") for n, a in enumerate(answers))
                starts = tuple(field(a, "answer_start", int, f"{where_q}.answers[{n}]") for n, a in enumerate(answers))
                problem = _problem(context, question, texts, starts)
                if problem:
                    skipped[problem].append(qid)
                else:
                    examples.append(SquadExample(qid, title, context, question, texts, starts))
    if not examples:
        left_out = f" ({sum(map(len, skipped.values()))} skipped: {', '.join(skipped)})" if skipped else ""
        raise ValueError(f"{path}: no usable questions{left_out}")
    return examples, dict(skipped)


def _problem(context, question, texts, starts):
    """Why a question cannot be used, or None."""
    if not context.strip():
        return "empty context"
    if not question.strip():
        return "empty question"
    if not texts:
        return "no answers (SQuAD v2 unanswerable questions are not supported)"
    if not all(t.strip() for t in texts):
        return "empty answer text"
    if not all(s >= 0 and context[s:s + len(t)] == t for t, s in zip(texts, starts)):
        return "answer_start does not point at the answer text"
    return None


# --- windows ---------------------------------------------------------------------------------


def squad_windows(examples, tokenizer, max_length=384, doc_stride=128, train=True, max_question_length=64):
    """Tokenize `[CLS] question [SEP] context [SEP]` into windows of at most max_length tokens.

    As HF run_qa: the question is left-stripped; a context too long for one window goes into
    several (truncation="only_second"), each repeating the question, consecutive ones sharing
    doc_stride context tokens. Training labels are the first answer's first and last token;
    a window that does not hold the whole answer points both at [CLS] (index 0).

    Questions longer than max_question_length tokens are cut to that length, with a warning
    (as Google's run_squad, max_query_length=64), and shorter if need be to leave each window
    more than doc_stride context tokens (HF run_qa has no limit and fails there: the
    tokenizer panics). No SQuAD v1.1 question comes near: the longest in dev has 38 tokens.

    Returns a dict of numpy arrays, one row per window; the windows of an example are
    consecutive rows, in order:
      input_ids, token_type_ids, attention_mask  (N, max_length) int32, padded with [PAD]
      lengths        (N,) int32  real tokens per window, to pad a batch only to its longest
      example_index  (N,) int32  the example (index into `examples`) each window comes from
      offsets        (N, max_length, 2) int32  [start, end) characters in the context of each
                     context token; -1 for question, special and padding tokens
      start_positions, end_positions  (N,) int32, only when train
    """
    # [CLS] question [SEP] context [SEP]: windows must hold more than doc_stride context tokens
    question_limit = min(max_question_length, max_length - 3 - doc_stride - 1)
    if question_limit < 1:
        raise ValueError(f"max_length {max_length} leaves no room for the question: it must be at "
                         f"least doc_stride {doc_stride} + 5")
    tok = Tokenizer.from_str(tokenizer.to_str())  # a copy, so the caller's tokenizer keeps its settings
    tok.no_truncation()
    tok.no_padding()

    # Leading whitespace: run_qa strips it so it cannot eat into the window (BERT ignores it anyway).
    questions = [ex.question.lstrip() for ex in examples]
    question_tokens = tok.encode_batch(questions, add_special_tokens=False)
    too_long = [i for i, enc in enumerate(question_tokens) if len(enc.ids) > question_limit]
    for i in too_long:  # cut the text after its last allowed token: it re-tokenizes to exactly those tokens
        questions[i] = questions[i][:question_tokens[i].offsets[question_limit - 1][1]]
    if too_long:
        warnings.warn(f"cut {len(too_long)} questions to their first {question_limit} tokens "
                      f"(ids {', '.join(examples[i].id for i in too_long[:5])}{' ...' if len(too_long) > 5 else ''})")

    # stride = tokens of context shared by consecutive windows (run_qa's doc_stride)
    tok.enable_truncation(max_length, stride=doc_stride, strategy="only_second")
    encodings = tok.encode_batch(list(zip(questions, [ex.context for ex in examples])))
    windows = [(i, w) for i, enc in enumerate(encodings) for w in (enc, *enc.overflowing)]

    n = len(windows)
    input_ids = np.full((n, max_length), special_ids(tok)["pad"], np.int32)
    token_type_ids = np.zeros((n, max_length), np.int32)
    offsets = np.full((n, max_length, 2), -1, np.int32)
    for row, (_, w) in enumerate(windows):
        length = len(w.ids)
        input_ids[row, :length] = w.ids
        token_type_ids[row, :length] = w.type_ids
        in_context = np.array([s == 1 for s in w.sequence_ids])  # sequence 1 is the context
        offsets[row, :length][in_context] = np.array(w.offsets, np.int32)[in_context]
    lengths = np.array([len(w.ids) for _, w in windows], np.int32)
    out = dict(input_ids=input_ids, token_type_ids=token_type_ids,
               attention_mask=(np.arange(max_length) < lengths[:, None]).astype(np.int32),
               lengths=lengths, example_index=np.array([i for i, _ in windows], np.int32), offsets=offsets)
    if train:
        out["start_positions"], out["end_positions"] = _answer_positions(examples, out["example_index"], offsets)
    return out


def _answer_positions(examples, example_index, offsets):
    """Token span of each example's first answer in each window; (0, 0) = [CLS] if not all inside.

    run_qa walks in from both ends of the context, token by token; since the offsets grow
    along the context, counting the tokens that start at/before the answer (or end at/after
    it) gives the same indices for all windows at once.
    """
    answer_start = np.array([ex.answer_starts[0] for ex in examples])[example_index]
    answer_end = answer_start + np.array([len(ex.answer_texts[0]) for ex in examples])[example_index]
    starts, ends = offsets[..., 0], offsets[..., 1]
    in_context = starts >= 0
    rows = np.arange(len(offsets))
    first = in_context.argmax(1)  # first and last context token of each window
    last = offsets.shape[1] - 1 - in_context[:, ::-1].argmax(1)
    inside = (starts[rows, first] <= answer_start) & (ends[rows, last] >= answer_end)
    start_token = first + (in_context & (starts <= answer_start[:, None])).sum(1) - 1
    end_token = last - (in_context & (ends >= answer_end[:, None])).sum(1) + 1
    return np.where(inside, start_token, 0).astype(np.int32), np.where(inside, end_token, 0).astype(np.int32)


# --- answers from logits ---------------------------------------------------------------------


def postprocess_qa(examples, windows, start_logits, end_logits, n_best=20, max_answer_length=30):
    """Best answer of each example over all its windows -> {id: (answer_text, score)}.

    As run_qa's postprocess_qa_predictions: in each window take the n_best highest start and
    the n_best highest end logits, drop pairs that leave the context, end before they start
    or span more than max_answer_length tokens; score = start_logit + end_logit; the best
    pair over all windows gives the text, sliced from the context by the token offsets.
    Only a window's real tokens are ranked (positions < lengths), so the answer does not
    depend on how the batches were padded. No valid pair in any window: ("", -inf).

    windows: the dict of squad_windows; start_logits, end_logits: (N, T) float numpy arrays,
    any T >= windows["lengths"].max().
    """
    n, k = len(start_logits), min(n_best, start_logits.shape[1])
    rows = np.arange(n)
    padding = np.arange(start_logits.shape[1]) >= windows["lengths"][:, None]
    start_logits = np.where(padding, -np.inf, start_logits)
    end_logits = np.where(padding, -np.inf, end_logits)
    top_starts = np.argsort(start_logits, 1)[:, ::-1][:, :k]  # (N, K), best first
    top_ends = np.argsort(end_logits, 1)[:, ::-1][:, :k]
    scores = (start_logits[rows[:, None], top_starts][:, :, None]
              + end_logits[rows[:, None], top_ends][:, None, :])  # (N, K starts, K ends)
    span = top_ends[:, None, :] - top_starts[:, :, None] + 1
    in_context = windows["offsets"][..., 0] >= 0
    valid = (in_context[rows[:, None], top_starts][:, :, None] & in_context[rows[:, None], top_ends][:, None, :]
             & (span >= 1) & (span <= max_answer_length))
    scores = np.where(valid, scores, -np.inf).reshape(n, k * k)
    best = scores.argmax(1)  # the first of equals, as a loop over starts then ends would keep
    best_score = scores[rows, best]
    best_start, best_end = top_starts[rows, best // k], top_ends[rows, best % k]

    # windows of example i are rows bounds[i]:bounds[i + 1]
    bounds = np.searchsorted(windows["example_index"], np.arange(len(examples) + 1))
    predictions = {}
    for i, ex in enumerate(examples):
        w = bounds[i] + np.argmax(best_score[bounds[i]:bounds[i + 1]])
        if best_score[w] == -np.inf:
            predictions[ex.id] = ("", float("-inf"))
        else:
            char_start = windows["offsets"][w, best_start[w], 0]
            char_end = windows["offsets"][w, best_end[w], 1]
            predictions[ex.id] = (ex.context[char_start:char_end], float(best_score[w]))
    return predictions


def write_predictions(path, predictions):
    """Write {id: answer_text} as the official predictions JSON, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(predictions, f, ensure_ascii=False, indent=1)
        f.write("\n")


# --- official metrics (evaluate-v1.1.py) -----------------------------------------------------


_PUNCTUATION = set(string.punctuation)


def normalize_answer(s):
    """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction, truth):
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1(prediction, truth):
    """Harmonic mean of precision and recall over normalized tokens (bag of words)."""
    prediction_tokens, truth_tokens = normalize_answer(prediction).split(), normalize_answer(truth).split()
    same = sum((collections.Counter(prediction_tokens) & collections.Counter(truth_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction_tokens), same / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_em_f1(predictions, examples):
    """{"exact_match", "f1"} in percent over `examples`, each the best over its reference answers.

    predictions: {id: answer_text}. A question without a prediction scores 0, as in the
    official script (which also warns).
    """
    missing = [ex.id for ex in examples if ex.id not in predictions]
    if missing:
        warnings.warn(f"{len(missing)} questions have no prediction and score 0 (ids {', '.join(missing[:5])} ...)")
    em = f = 0.0
    for ex in examples:
        if ex.id in predictions:
            em += max(exact_match(predictions[ex.id], truth) for truth in ex.answer_texts)
            f += max(f1(predictions[ex.id], truth) for truth in ex.answer_texts)
    return {"exact_match": 100.0 * em / len(examples), "f1": 100.0 * f / len(examples)}
