"""Token classification (NER) data: CoNLL files, word tags aligned to WordPieces, entity F1.

A CoNLL file has one token per line with its tag in the last whitespace-separated column
(CoNLL-2003: token POS chunk NER; a two-column file: token TAG), a blank line between
sentences; -DOCSTART- lines are skipped. Tags are BIO: B-TYPE begins an entity, I-TYPE
continues it, O is outside (an I-TYPE that follows no TYPE also begins one, as conlleval
and seqeval read it). Backend-agnostic numpy, as the other data modules.
"""

import numpy as np
from tokenizers import Tokenizer


def read_conll(path):
    """[(words, tags)] of the file's sentences; a bad line is a one-line error naming it."""
    sentences, words, tags = [], [], []
    try:
        with open(path, encoding="utf-8") as f:
            lines = list(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    for number, line in enumerate(lines + ["\n"], 1):
        columns = line.split()
        if not columns or columns[0] == "-DOCSTART-":
            if words:
                sentences.append((words, tags))
                words, tags = [], []
            continue
        if len(columns) < 2:
            raise ValueError(f"{path} line {number}: expected a token and a tag, got {len(columns)} column")
        tag = columns[-1]
        if tag != "O" and not (tag[:2] in ("B-", "I-") and len(tag) > 2):
            raise ValueError(f"{path} line {number}: tag {tag!r} is not O, B-TYPE or I-TYPE")
        words.append(columns[0])
        tags.append(tag)
    if not sentences:
        raise ValueError(f"{path}: no sentences")
    return sentences


def tag_names(sentences):
    """The label list: O first, then every B-/I- tag of each entity type, sorted by type."""
    kinds = sorted({tag[2:] for _, tags in sentences for tag in tags if tag != "O"})
    return ["O"] + [f"{prefix}-{kind}" for kind in kinds for prefix in "BI"]


def encode_ner(tokenizer, sentences, label2id, max_length=128, where="data"):
    """WordPiece inputs of pre-split words, and the words' tags on their first WordPieces (the
    rest, [CLS], [SEP]: -100, as HF run_ner). Words cut off by max_length get no label.
    Returns {"input_ids", "token_type_ids", "labels": [(L_i,) int32],
    "word_starts": [(W_i,) int64]: the position of each word's first WordPiece, -1 if cut off}."""
    tok = Tokenizer.from_str(tokenizer.to_str())  # a copy: the caller's settings stay as they are
    tok.enable_truncation(max_length)
    tok.no_padding()
    encodings = tok.encode_batch([words for words, _ in sentences], is_pretokenized=True)
    out = {"input_ids": [], "token_type_ids": [], "labels": [], "word_starts": []}
    for n, (encoding, (words, tags)) in enumerate(zip(encodings, sentences)):
        starts = np.full(len(words), -1)
        labels = np.full(len(encoding.ids), -100, np.int32)
        for position, word in enumerate(encoding.word_ids):
            if word is not None and starts[word] < 0:
                starts[word] = position
                if tags is not None:
                    if tags[word] not in label2id:
                        raise ValueError(f"{where}: sentence {n + 1} has tag {tags[word]!r}, which training "
                                         f"did not have ({', '.join(label2id)})")
                    labels[position] = label2id[tags[word]]
        out["input_ids"].append(np.array(encoding.ids, np.int32))
        out["token_type_ids"].append(np.array(encoding.type_ids, np.int32))
        out["labels"].append(labels)
        out["word_starts"].append(starts)
    return out


def word_tags(logits, word_starts, id2label):
    """One sentence's predicted tag per word: the argmax at each word's first WordPiece
    (logits (T, num_labels)); a word cut off by max_length is O."""
    best = np.asarray(logits).argmax(-1)
    return [id2label[int(best[p])] if p >= 0 else "O" for p in word_starts]


def entities(tags):
    """{(type, first word, last word)} of a BIO tag sequence, by conlleval's rules (seqeval's
    default mode): an entity ends before O, before B-, and where the type changes; it begins
    at B-TYPE or at an I-TYPE that does not continue one."""
    spans, start, kind = set(), None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, this = tag.partition("-")
        if start is not None and (prefix != "I" or this != kind):
            spans.add((kind, start, i - 1))
            start = None
        if prefix in ("B", "I") and start is None:
            start, kind = i, this
    return spans


def entity_scores(true_tags, pred_tags):
    """Micro-averaged entity precision, recall and F1 over sentences (in %, as seqeval's
    classification report x 100; 0 where undefined), and word accuracy.
    true_tags, pred_tags: [[tag per word] per sentence]."""
    correct = n_true = n_pred = words = right = 0
    for truth, pred in zip(true_tags, pred_tags, strict=True):
        t, p = entities(truth), entities(pred)
        correct, n_true, n_pred = correct + len(t & p), n_true + len(t), n_pred + len(p)
        words, right = words + len(truth), right + sum(a == b for a, b in zip(truth, pred, strict=True))
    precision = 100 * correct / n_pred if n_pred else 0.0
    recall = 100 * correct / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "accuracy": 100 * right / max(words, 1)}
