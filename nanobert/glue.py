"""GLUE sentence classification data (SST-2, MRPC): read, encode, batch, score.

examples   read_glue_tsv / load_task -> [(text_a, text_b or None, label)]
encode     encode_glue -> token ids as HF `tok(a, b, truncation=True, max_length=128)`
batches    glue_batches -> shuffled, dynamically padded, resumable mid-epoch
metrics    accuracy, binary_f1 (percent, as the GLUE leaderboard reports them)

Numpy only: the same batches feed the torch and the MLX model.
"""

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
                 "labels": np.full(shape, -100, np.int32) if per_token else labels[idx].astype(np.int32)}
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
