"""Sentence(-pair) classification data: GLUE's SST-2 and MRPC, or your own files.

examples   read_glue_tsv / load_task -> [(text_a, text_b or None, label)]
           read_table / load_table: your CSV, TSV or JSONL, named columns; label_ids
encode     encode_glue -> token ids as HF `tok(a, b, truncation=True, max_length=128)`
batches    glue_batches -> shuffled, dynamically padded, resumable mid-epoch
metrics    accuracy, binary_f1, macro_f1, pearson, spearman (percent, as GLUE reports them)

Numpy only: the same batches feed the torch and the MLX model.
"""

import csv
import json
import os

import numpy as np
from tokenizers import Tokenizer

from nanobert.training import batch_indices, round_up

# task -> (TSV header, column of text_a, column of text_b or None, column of the label)
TSV_COLUMNS = {
    "sst2": (("sentence", "label"), 0, None, 1),
    "mrpc": (("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"), 3, 4, 0),
}
# task -> (text_a, text_b or None) column names in the hub's "glue" dataset
HUB_COLUMNS = {"sst2": ("sentence", None), "mrpc": ("sentence1", "sentence2")}
LABEL_NAMES = {"sst2": ("negative", "positive"), "mrpc": ("not_equivalent", "equivalent")}
BEST_METRIC = {"sst2": "accuracy", "mrpc": "f1"}  # what "best checkpoint" means per task


def read_glue_tsv(path, task):
    """[(text_a, text_b or None, label)] from a GLUE train.tsv / dev.tsv of `task` ("sst2", "mrpc").

    Fields are split on tabs only: quotes are text, not CSV quoting (some MRPC sentences
    open with an unmatched '"', which makes a CSV reader swallow the following rows).
    A UTF-8 byte-order mark (MRPC has one) and CRLF line ends are accepted. Each field is
    stripped of surrounding whitespace (nearly every SST-2 sentence ends with a space; the
    tokenizer would drop it anyway). Blank lines are skipped, so an editor's trailing empty
    line is harmless; line numbers in errors are the file's own.
    """
    header, col_a, col_b, col_label = _task_columns(task)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 ({e})") from None
    lines = text.split("\n")  # "\n" only: a stray "\r" inside a field must not start a new row
    found = tuple(field.strip() for field in lines[0].split("\t"))
    if found != header:
        expected, found = "\t".join(header), "\t".join(found)
        raise ValueError(f"{path} line 1: expected the {task} header {expected!r}, got {found!r}")
    examples = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = [field.strip() for field in line.split("\t")]
        if len(fields) != len(header):
            raise ValueError(f"{path} line {lineno}: expected {len(header)} tab-separated columns, "
                             f"got {len(fields)}")
        if fields[col_label] not in ("0", "1"):
            raise ValueError(f"{path} line {lineno}: label ({header[col_label]}) must be 0 or 1, "
                             f"got {fields[col_label]!r}")
        examples.append((fields[col_a], None if col_b is None else fields[col_b], int(fields[col_label])))
    if not examples:
        raise ValueError(f"{path}: no examples after the header")
    return examples


def load_task(task, source, split):
    """[(text_a, text_b or None, label)] of `split` ("train" or "dev") of a GLUE task.

    source: a directory holding the task's train.tsv and dev.tsv (the GLUE layout, e.g.
    glue_data/SST-2), or a `datasets` hub name such as "glue" (needs network or a filled
    datasets cache; "dev" is the hub's "validation" split).
    """
    _task_columns(task)
    if split not in ("train", "dev"):
        raise ValueError(f"split must be 'train' or 'dev', got {split!r}")
    if os.path.isdir(source):
        return read_glue_tsv(os.path.join(source, f"{split}.tsv"), task)
    if os.path.exists(source) or source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{source}: not a directory holding train.tsv and dev.tsv")
    try:
        import datasets  # optional: only the hub route needs it
    except ImportError:
        raise FileNotFoundError(f"{source}: not a local directory, and the datasets package is not "
                                "installed to load it from the hub") from None
    try:
        rows = datasets.load_dataset(source, task, split="validation" if split == "dev" else "train")
    except Exception as e:  # offline, unknown name, ...: one line for the user
        reason = str(e).splitlines()[0] if str(e) else ""
        raise FileNotFoundError(f"{source}: not a local directory, and datasets.load_dataset({source!r}, "
                                f"{task!r}) failed ({type(e).__name__}: {reason})") from None
    col_a, col_b = HUB_COLUMNS[task]
    texts_b = [b.strip() for b in rows[col_b]] if col_b else [None] * len(rows)
    return [(a.strip(), b, int(y)) for a, b, y in zip(rows[col_a], texts_b, rows["label"])]


TABLE_FORMATS = (".csv", ".tsv", ".jsonl")


def read_table(path, text, pair=None, label="label"):
    """[(text_a, text_b or None, label as a string)] from your own file: CSV (with CSV quoting),
    TSV (tabs only, quotes are text) or JSONL (one object per line), by its extension, with the
    text in column `text`, an optional second text in `pair` and the label in `label`. A
    missing column, an empty text or label is a one-line error naming file, line and field."""
    ext = os.path.splitext(path)[1]
    if ext not in TABLE_FORMATS:
        raise ValueError(f"{path}: expected a {', '.join(TABLE_FORMATS)} file")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(_rows(f, ext, path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 ({e})") from None
    examples = []
    for line, row in rows:
        values = []
        for field in (text, pair, label):
            if field is None:
                values.append(None)
                continue
            if field not in row:
                raise ValueError(f"{path} line {line}: no field {field!r} (fields: {', '.join(map(str, row))})")
            value = "" if row[field] is None else str(row[field]).strip()
            if not value:
                raise ValueError(f"{path} line {line}: field {field!r} is empty")
            values.append(value)
        examples.append(tuple(values))
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def _rows(f, ext, path):
    """(line number, {field: value}) of each non-blank row."""
    if ext == ".jsonl":
        for line, text in enumerate(f, 1):
            if text.strip():
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {line}: not JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path} line {line}: expected a JSON object, got {type(row).__name__}")
                yield line, row
        return
    reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if ext == ".tsv" else csv.reader(f)
    header = next(reader, None)
    if not header:
        raise ValueError(f"{path}: empty (expected a header line naming the columns)")
    header = [h.strip() for h in header]
    for fields in reader:
        if not any(field.strip() for field in fields):
            continue
        if len(fields) != len(header):
            raise ValueError(f"{path} line {reader.line_num}: expected {len(header)} columns "
                             f"({', '.join(header)}), got {len(fields)}")
        yield reader.line_num, dict(zip(header, fields))


def load_table(directory, split, text, pair=None, label="label"):
    """read_table of `split` ("train" or "dev") in `directory`: split.csv, split.tsv or split.jsonl."""
    found = [os.path.join(directory, split + ext) for ext in TABLE_FORMATS
             if os.path.exists(os.path.join(directory, split + ext))]
    if len(found) != 1:
        raise FileNotFoundError(f"{directory}: expected one of {', '.join(split + e for e in TABLE_FORMATS)}, "
                                f"found {len(found)}")
    return read_table(found[0], text, pair, label)


def label_ids(examples, regression=False, names=None, where="data"):
    """The labels of read_table's examples as a (N,) array: floats for regression, else class
    ids into `names` (default: the examples' own label strings, sorted, numbers by value).
    Returns (labels, names); a label that is not a number (regression) or not in `names` is an
    error naming it."""
    raw = [y for *_, y in examples]
    if regression:
        try:
            return np.array([float(y) for y in raw], np.float32), None
        except ValueError:
            bad = next(y for y in raw if not _is_number(y))
            raise ValueError(f"{where}: label {bad!r} is not a number (regression)") from None
    if names is None:
        names = sorted(set(raw), key=lambda y: (0, float(y), y) if _is_number(y) else (1, 0.0, y))
    index = {name: i for i, name in enumerate(names)}
    unknown = [y for y in raw if y not in index]
    if unknown:
        raise ValueError(f"{where}: label {unknown[0]!r} is not one of the training labels ({', '.join(names)})")
    return np.array([index[y] for y in raw], np.int64), list(names)


def _is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def encode_glue(tokenizer, examples, max_length=128):
    """Token ids of each example, equal to HF `tok(a, b, truncation=True, max_length=max_length)`.

    A pair becomes "[CLS] a [SEP] b [SEP]" with token_type_ids 0 through the first [SEP]
    and 1 after it; a single sentence "[CLS] a [SEP]", all 0. Too long, the pair loses
    tokens from the end of its longer side first ("longest_first").
    Returns {"input_ids": [(L_i,) int32], "token_type_ids": [(L_i,) int32]}, L_i <= max_length.
    """
    # a copy, so the caller's tokenizer keeps its own truncation and padding settings
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.enable_truncation(max_length, strategy="longest_first")
    tok.no_padding()
    encodings = tok.encode_batch([a if b is None else (a, b) for a, b, _ in examples])
    return {"input_ids": [np.array(e.ids, np.int32) for e in encodings],
            "token_type_ids": [np.array(e.type_ids, np.int32) for e in encodings]}


def glue_batches(encoded, labels, batch_size, rng=None, pad_id=0, pad_to=None, bucket=False, start=0,
                 pad_to_multiple_of=1):
    """One epoch of padded batches: every example exactly once, in ceil(N / batch_size) batches.

    encoded: from encode_glue (N examples); labels: (N,) ints, or N (L_i,) arrays of token
    labels (ner.encode_ner). Yields dicts of int32 arrays input_ids, attention_mask,
    token_type_ids (B, T) and labels (B,), or (B, T) padded with -100; T is the batch's own
    longest sequence (dynamic padding; rounded up to a multiple of pad_to_multiple_of, as
    HF's collators, so a compiled step sees few shapes) or `pad_to` (fixed padding). Only
    the last batch may have B < batch_size.

    rng (np.random.Generator) shuffles; None keeps the given order (evaluation). bucket:
    length-bucketed batches (training.batch_indices). On the SST-2 train set at batch 32 an
    epoch is 8.6M token slots padded to 128, 2.7M padded per batch, 0.94M bucketed (0.90M
    are real tokens).

    Resuming mid-epoch: the order depends only on rng's state, so make rng a function of
    (seed, epoch), e.g. np.random.default_rng([seed, epoch]); save (epoch, batches done)
    and resume with the same rng and start=batches done to get exactly the batches the
    interrupted run had left.
    """
    if not len(labels):
        raise ValueError("no examples to batch")
    per_token = np.ndim(labels[0]) == 1
    labels = labels if per_token else np.asarray(labels)
    if len(encoded["input_ids"]) != len(labels):
        raise ValueError(f"{len(encoded['input_ids'])} encoded examples but {len(labels)} labels")
    lengths = np.array([len(ids) for ids in encoded["input_ids"]], dtype=np.int64)
    if pad_to is not None and lengths.max() > pad_to:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest example ({lengths.max()} tokens)")
    for idx in batch_indices(lengths, batch_size, rng, bucket)[start:]:
        shape = (len(idx), pad_to or round_up(lengths[idx].max(), pad_to_multiple_of))
        batch = {"input_ids": np.full(shape, pad_id, np.int32), "attention_mask": np.zeros(shape, np.int32),
                 "token_type_ids": np.zeros(shape, np.int32),
                 "labels": np.full(shape, -100, np.int32) if per_token else
                 labels[idx].astype(np.float32 if labels.dtype.kind == "f" else np.int32)}  # floats: regression
        for row, i in enumerate(idx):
            if per_token:
                batch["labels"][row, :lengths[i]] = labels[i]
            batch["input_ids"][row, :lengths[i]] = encoded["input_ids"][i]
            batch["token_type_ids"][row, :lengths[i]] = encoded["token_type_ids"][i]
            batch["attention_mask"][row, :lengths[i]] = 1
        yield batch


def accuracy(preds, labels):
    """Percent of predictions equal to the labels; preds, labels: (N,) ints."""
    preds, labels = _same_shape(preds, labels)
    return 100.0 * float(np.mean(preds == labels))


def binary_f1(preds, labels):
    """F1 of the positive class 1 in percent (GLUE's MRPC F1, sklearn's f1_score).

    F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (predicted positives + true positives);
    0 when there are no positives at all, predicted or true (sklearn's default).
    """
    preds, labels = _same_shape(preds, labels)
    true_pos = np.sum((preds == 1) & (labels == 1))
    positives = np.sum(preds == 1) + np.sum(labels == 1)
    return 100.0 * 2 * float(true_pos) / float(positives) if positives else 0.0


def macro_f1(preds, labels, n_classes):
    """The mean over classes 0..n_classes-1 of each class's F1 (one-vs-rest), in percent
    (sklearn's f1_score(average="macro"); a class absent from both counts as 0)."""
    preds, labels = _same_shape(preds, labels)
    f1s = []
    for c in range(n_classes):
        tp, predicted, true = np.sum((preds == c) & (labels == c)), np.sum(preds == c), np.sum(labels == c)
        f1s.append(2 * tp / (predicted + true) if predicted + true else 0.0)
    return 100.0 * float(np.mean(f1s))


def pearson(preds, labels):
    """Pearson's correlation of two (N,) float arrays, in percent (GLUE's STS-B reports it so)."""
    preds, labels = (np.asarray(x, np.float64) for x in _same_shape(preds, labels))
    a, b = preds - preds.mean(), labels - labels.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return 100.0 * float((a * b).sum() / denom) if denom else 0.0


def spearman(preds, labels):
    """Spearman's rank correlation in percent: Pearson's of the ranks, ties given their mean rank."""
    return pearson(_ranks(preds), _ranks(labels))


def _ranks(x):
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=np.float64)
    for value in np.unique(x[np.diff(np.sort(x), prepend=np.nan) == 0]):  # tied values: their mean rank
        ranks[x == value] = ranks[x == value].mean()
    return ranks


def _task_columns(task):
    if task not in TSV_COLUMNS:
        raise ValueError(f"unknown GLUE task {task!r}; expected one of {sorted(TSV_COLUMNS)}")
    return TSV_COLUMNS[task]


def _same_shape(preds, labels):
    preds, labels = np.asarray(preds), np.asarray(labels)
    if preds.shape != labels.shape or preds.ndim != 1 or not len(preds):
        raise ValueError(f"expected preds and labels of one shape (N,), N > 0; "
                         f"got {preds.shape} and {labels.shape}")
    return preds, labels
