"""Masked-language-model pretraining data: text -> documents -> samples -> msgpack shards -> masked batches.

Backend-agnostic numpy; the training scripts turn the batches into torch or MLX arrays.

Text. `read_documents` gives a list of documents, each a list of paragraph strings, from
  - a WikiText `.tokens` or `.raw` file: ` = Title = ` starts an article (one document), headings and titles
    are kept as one-line paragraphs, the ` @-@ ` / ` @,@ ` / ` @.@ ` number splits are joined back,
    the space the tokenization put before `, . ; : ! ? ) ] %` and contractions (`n't`, `'s`, ...)
    and after `( [ $` is removed (quotes are left alone: which side a `"` belongs to is a guess).
    `<unk>` (a rare word WikiText replaced) becomes `[UNK]`, which the tokenizer keeps as the
    [UNK] id: the sentence keeps its shape, and the masking never picks it (as HF's collator).
  - any other UTF-8 text file, in BERT's own format: one paragraph (or sentence) per line,
    documents separated by blank lines;
  - a HF `datasets` name `NAME[:CONFIG[:SPLIT]]` (split "train" by default) when the argument is
    not a local path; a `text` column, one row per document (for `wikitext`, rows are lines).

Samples. Each is `[CLS] tokens [SEP]`, at most `max_len` ids, one segment (no next-sentence task,
as RoBERTa). Two builders, both lossless (the samples' tokens, in order, are the tokens of the
input) and both set per run with `--builder`:
  - "segment" (RoBERTa's DOC-SENTENCES): paragraphs are cut into sentences (after . ! ? and
    closing quotes/brackets, before an upper-case letter or an opening quote/bracket: simple, and
    wrong only at abbreviations like "Mr. Smith", which merely moves a sample boundary);
    whole sentences of one document are packed greedily into a sample until the next one would
    not fit. Only a sentence longer than `max_len - 2` tokens is cut, and its last piece starts
    the next sample. The last sample of a document is usually shorter.
  - "split" (HF run_mlm's group_texts): the token stream of all documents of a split, cut into
    windows of `max_len - 2` tokens, ignoring sentence and document boundaries; only the very
    last window is shorter.

Shards. One msgpack map per file: {"header": {...}, "offsets": bytes, "token_ids": bytes}, where
token_ids is all samples' ids concatenated as one little-endian uint16 (int32 if the vocabulary
has over 65,536 tokens) buffer and offsets the (N+1,) little-endian int64 sample boundaries.
The header records the format version, the vocabulary's sha256 (of vocab.txt, i.e. the tokens
in id order), vocab size, max_len, builder, seed, split, counts and a crc32 of the payload, so
a shard is never read with the wrong tokenizer or sequence length. `ShardStream` walks the
shards of a glob pattern forever, in a seeded order, and can save and restore its position.

Batches. `mlm_batch` pads samples to the longest one and masks afresh every time a sample is
seen ("dynamic masking", RoBERTa) with BERT's rule (`mask_tokens`).
"""

import glob
import hashlib
import json
import math
import os
import re
import time
import zlib

import msgpack
import numpy as np
from tqdm import tqdm

from nanobert.fileio import atomic_path
from nanobert.hub import resolve
from nanobert.tokenizer import load_tokenizer, save_tokenizer, special_ids, train_wordpiece
from nanobert.training import round_up, sparse_positions

UNK_TEXT = "[UNK]"  # what WikiText's <unk> becomes
SHARD_FORMAT, SHARD_VERSION = "nanobert-mlm-shard", 1
HEADER_FIELDS = ("split", "builder", "seed", "max_len", "vocab_size", "vocab_sha256")

# ---------------------------------------------------------------------------------------------
# Text -> documents

_HEADING = re.compile(r"(=(?: =)*) (.+?) (=(?: =)*)")  # "= Title =", "= = Section = =", ...
_NUMBER_SPLIT = re.compile(r" @([-,.])@ ")  # "1 @,@ 000" -> "1,000", "red @-@ tipped" -> "red-tipped"
_SPACE_BEFORE = re.compile(r" ([,.;:!?)\]%]|n't|'(?:s|re|ve|ll|d|m)(?= |$))")
_SPACE_AFTER = re.compile(r"([(\[$]) ")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+(?=[\"'(\[]?[A-Z])")


def read_documents(source):
    """A file path or `datasets` name -> documents: a list of lists of paragraph strings (see top)."""
    if os.path.isdir(source):
        raise ValueError(f"{source}: is a directory; expected a text file or a `datasets` name")
    if os.path.isfile(source):
        text = _read_utf8(source)
        wikitext = source.endswith((".tokens", ".raw"))
        documents = read_wikitext(text.splitlines()) if wikitext else read_plain_text(text)
    elif source.startswith((".", "/", "~")) or os.path.splitext(source)[1] in (".txt", ".tokens", ".raw"):
        raise FileNotFoundError(f"{source}: no such file")
    else:
        documents = _read_dataset(source)
    documents = [doc for doc in documents if doc]
    if not documents:
        raise ValueError(f"{source}: no text")
    return documents


def _read_utf8(path):
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        bad = data[e.start:e.end]
        raise ValueError(f"{path} line {line} (byte {e.start}): not UTF-8 ({e.reason}: {bad!r})") from None


def read_plain_text(text):
    """BERT's pretraining format: one paragraph per line, a blank line between documents."""
    blocks = re.split(r"\n[ \t\r\f\v]*\n", text)
    return [[line.strip() for line in block.splitlines() if line.strip()] for block in blocks]


def read_wikitext(lines):
    """Lines of a WikiText file -> one document per article (see top for the cleanup)."""
    documents = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        heading = _HEADING.fullmatch(line)
        if heading and heading[1] == heading[3]:
            if heading[1] == "=":  # an article title: a new document
                documents.append([])
            line = heading[2]
        if not documents:  # text before the first title
            documents.append([])
        documents[-1].append(detokenize_wikitext(line))
    return documents


def detokenize_wikitext(line):
    """Undo WikiText's tokenization where it is unambiguous; `<unk>` -> [UNK]."""
    line = _NUMBER_SPLIT.sub(r"\1", line.replace("<unk>", UNK_TEXT))
    return _SPACE_AFTER.sub(r"\1", _SPACE_BEFORE.sub(r"\1", line))


def _read_dataset(spec):
    try:
        import datasets  # only for this case: it is slow to import and optional
    except ImportError:
        raise FileNotFoundError(f"{spec}: no such file, and the `datasets` package is not installed to "
                                "load it as a data set name") from None
    name, config, split = (spec.split(":") + [None, None])[:3]
    try:
        rows = datasets.load_dataset(name, config, split=split or "train")
    except Exception as e:  # offline, unknown name, bad config: one line for the user
        first = str(e).splitlines()[0] if str(e) else ""
        raise FileNotFoundError(f"{spec}: no such file, and `datasets` could not load it as "
                                f"NAME[:CONFIG[:SPLIT]] ({type(e).__name__}: {first})") from None
    if "text" not in rows.column_names:
        raise ValueError(f"{spec}: the data set has no 'text' column (it has {rows.column_names})")
    if "wikitext" in name:  # rows are the lines of the WikiText files
        return read_wikitext(rows["text"])
    return [[line.strip() for line in row.splitlines() if line.strip()] for row in rows["text"]]


def split_sentences(paragraph):
    """A paragraph -> its sentences, by the rule at the top."""
    cuts = [0] + [m.end() for m in _SENTENCE_END.finditer(paragraph)] + [len(paragraph)]
    return [s for s in (paragraph[a:b].strip() for a, b in zip(cuts, cuts[1:])) if s]


# ---------------------------------------------------------------------------------------------
# Documents -> samples

def encode_sentences(tokenizer, documents, chunk=512):
    """documents -> per document, a list of its sentences' token ids ((L,) int32, no [CLS]/[SEP])."""
    encoded = []
    with tqdm(total=len(documents), desc="tokenize", unit="doc", disable=None) as progress:
        for start in range(0, len(documents), chunk):  # encode_batch runs on all cores
            sentences = [[s for p in doc for s in split_sentences(p)] for doc in documents[start:start + chunk]]
            flat = tokenizer.encode_batch([s for doc in sentences for s in doc], add_special_tokens=False)
            ids = iter(np.array(e.ids, np.int32) for e in flat)
            encoded += [[next(ids) for _ in doc] for doc in sentences]
            progress.update(len(sentences))
    return encoded


def segment_samples(doc_sentences, max_len, cls_id, sep_id):
    """Whole sentences packed into samples of at most max_len ids, per document (see top) -> list of (L,) int32."""
    body = max_len - 2
    samples = []
    for sentences in doc_sentences:
        pending, n = [], 0  # sentences of the sample being filled, and their token count
        for ids in sentences:
            if pending and n + len(ids) > body:
                samples.append(_wrap(pending, cls_id, sep_id))
                pending, n = [], 0
            while len(ids) > body:  # a sentence that fits no sample: cut, only now
                samples.append(_wrap([ids[:body]], cls_id, sep_id))
                ids = ids[body:]
            if len(ids):
                pending.append(ids)
                n += len(ids)
        if pending:
            samples.append(_wrap(pending, cls_id, sep_id))
    return samples


def split_samples(doc_sentences, max_len, cls_id, sep_id):
    """The token stream of all documents cut into windows of max_len - 2 ids (see top) -> list of (L,) int32."""
    pieces = [ids for sentences in doc_sentences for ids in sentences]
    stream = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    body = max_len - 2
    return [_wrap([stream[i:i + body]], cls_id, sep_id) for i in range(0, len(stream), body)]


def _wrap(pieces, cls_id, sep_id):
    return np.concatenate([[cls_id], *pieces, [sep_id]]).astype(np.int32)


BUILDERS = {"segment": segment_samples, "split": split_samples}


# ---------------------------------------------------------------------------------------------
# Samples <-> msgpack shards

def vocab_sha256(tokenizer):
    """sha256 of the vocabulary in id order, one token per line: equals `sha256sum vocab.txt`."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256("".join(t + "\n" for t, _ in vocab).encode("utf-8")).hexdigest()


def write_shard(path, samples, header):
    """Write samples (list of (L,) int arrays) and header (HEADER_FIELDS) to one msgpack file, atomically."""
    missing = [k for k in HEADER_FIELDS if k not in header]
    if missing:
        raise ValueError(f"{path}: shard header lacks {missing}")
    lengths = np.array([len(s) for s in samples], np.int64)
    ids = np.concatenate(samples).astype(np.int64) if samples else np.zeros(0, np.int64)
    if lengths.size and lengths.max() > header["max_len"]:
        raise ValueError(f"{path}: a sample has {lengths.max()} tokens, more than max_len={header['max_len']}")
    if ids.size and (ids.min() < 0 or ids.max() >= header["vocab_size"]):
        raise ValueError(f"{path}: token ids must lie in [0, {header['vocab_size']}), got {ids.min()}..{ids.max()}")
    dtype = "<u2" if header["vocab_size"] <= 1 << 16 else "<i4"
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype("<i8").tobytes()
    token_ids = ids.astype(dtype).tobytes()
    header = {"format": SHARD_FORMAT, "version": SHARD_VERSION, **header, "num_samples": len(samples),
              "num_tokens": int(lengths.sum()), "dtype": dtype, "crc32": zlib.crc32(token_ids, zlib.crc32(offsets))}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(msgpack.packb({"header": header, "offsets": offsets, "token_ids": token_ids}))


def read_shard(path, expect_vocab_hash=None, expect_max_len=None):
    """-> (header dict, samples: list of (L,) int32 arrays). Refuses a shard of another vocab or max_len."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        shard = msgpack.unpackb(data)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: truncated or corrupt shard, msgpack cannot read it "
                         f"({e or type(e).__name__})") from None
    header = shard.get("header") if isinstance(shard, dict) else None
    if not isinstance(header, dict) or header.get("format") != SHARD_FORMAT:
        raise ValueError(f"{path}: not a nanobert MLM shard")
    if header.get("version") != SHARD_VERSION:
        raise ValueError(f"{path}: shard format version {header.get('version')}, this code reads {SHARD_VERSION}")
    if expect_vocab_hash is not None and header["vocab_sha256"] != expect_vocab_hash:
        raise ValueError(f"{path}: built with vocab sha256 {header['vocab_sha256'][:16]}..., but the tokenizer's "
                         f"is {expect_vocab_hash[:16]}... (another vocabulary; prepare the data again)")
    if expect_max_len is not None and header["max_len"] != expect_max_len:
        raise ValueError(f"{path}: built with max_len={header['max_len']}, but max_len={expect_max_len} was asked "
                         "(prepare the data again)")
    offsets_bytes, ids_bytes = shard.get("offsets", b""), shard.get("token_ids", b"")
    if zlib.crc32(ids_bytes, zlib.crc32(offsets_bytes)) != header.get("crc32"):
        raise ValueError(f"{path}: corrupt shard (crc32 of the token ids does not match its header)")
    offsets = np.frombuffer(offsets_bytes, "<i8")
    ids = np.frombuffer(ids_bytes, header["dtype"]).astype(np.int32)
    if len(offsets) != header["num_samples"] + 1 or offsets[-1] != len(ids) or np.any(np.diff(offsets) < 0):
        raise ValueError(f"{path}: corrupt shard (offsets do not match {header['num_samples']} samples "
                         f"of {len(ids)} tokens)")
    return header, np.split(ids, offsets[1:-1])


def read_split(pattern, expect_vocab_hash=None, expect_max_len=None):
    """All samples of the shards matching a glob pattern, in file-name order (for evaluation)."""
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise FileNotFoundError(f"{pattern}: no shard matches")
    return [s for p in paths for s in read_shard(p, expect_vocab_hash, expect_max_len)[1]]


class ShardStream:
    """An endless, seeded, resumable stream of samples ((L,) int32) from the shards matching a glob.

    Epoch e visits the shards in a random order drawn from (seed, e), and the samples of each
    shard in a random order drawn from (seed, e, shard); one shard is in memory at a time.
    `state_dict()` is {"seed", "num_shards", "epoch", "shard", "position"}, plain JSON; a new
    stream given it by `load_state_dict` continues with exactly the sample that comes next.
    All shards must share one vocabulary (the first shard's, unless expect_vocab_hash is given).
    """

    def __init__(self, pattern, seed=0, shuffle=True, expect_vocab_hash=None, expect_max_len=None):
        self.paths = sorted(glob.glob(pattern))
        if not self.paths:
            raise FileNotFoundError(f"{pattern}: no shard matches")
        self.pattern, self.seed, self.shuffle = pattern, seed, shuffle
        self.expect_vocab_hash, self.expect_max_len = expect_vocab_hash, expect_max_len
        self.epoch = self.shard = self.position = 0
        self._loaded = None  # ((epoch, shard), samples, order)

    def state_dict(self):
        return {"seed": self.seed, "num_shards": len(self.paths), "epoch": self.epoch, "shard": self.shard,
                "position": self.position}

    def load_state_dict(self, state):
        if (state["seed"], state["num_shards"]) != (self.seed, len(self.paths)):
            raise ValueError(f"{self.pattern}: the saved stream state is for seed {state['seed']} and "
                             f"{state['num_shards']} shards, this stream has seed {self.seed} and {len(self.paths)}")
        self.epoch, self.shard, self.position = state["epoch"], state["shard"], state["position"]

    def __iter__(self):
        return self

    def __next__(self):
        for _ in range(len(self.paths) + 1):
            samples, order = self._current_shard()
            if self.position < len(order):
                self.position += 1
                return samples[order[self.position - 1]]
            self.position, self.shard = 0, self.shard + 1
            if self.shard == len(self.paths):
                self.epoch, self.shard = self.epoch + 1, 0
        raise ValueError(f"{self.pattern}: all shards are empty")

    def _current_shard(self):
        """(samples, order) of the shard at (epoch, shard); read from disk only when that changes."""
        key = (self.epoch, self.shard)
        if self._loaded is None or self._loaded[0] != key:
            shard_order = self._order([self.seed, self.epoch], len(self.paths))
            header, samples = read_shard(self.paths[shard_order[self.shard]], self.expect_vocab_hash,
                                         self.expect_max_len)
            self.expect_vocab_hash = header["vocab_sha256"]
            self._loaded = (key, samples, self._order([self.seed, *key], len(samples)))
        return self._loaded[1:]

    def _order(self, seeds, n):
        return np.random.default_rng(seeds).permutation(n) if self.shuffle else np.arange(n)


# ---------------------------------------------------------------------------------------------
# Samples -> masked batches

def num_mask_slots(batch_size, seq_len, mlm_prob=0.15):
    """N, the length of `masked_positions` for a (B, T) batch: the expected count plus 6 standard deviations.

    It depends on the shape only, so a compiled training step sees one shape per (B, T).
    """
    n = batch_size * seq_len
    return max(1, min(n, math.ceil(n * mlm_prob + 6 * math.sqrt(n * mlm_prob * (1 - mlm_prob)))))


def continuation_ids(tokenizer):
    """(V,) bool: which vocabulary ids are a word's later WordPieces ('##ing'), for whole-word masking."""
    return np.array([tokenizer.id_to_token(i).startswith("##") for i in range(tokenizer.get_vocab_size())])


def mask_tokens(input_ids, rng, special_ids, vocab_size, mask_id, mlm_prob=0.15, continuation=None):
    """BERT's masking of a padded batch, drawn afresh from `rng` (a numpy Generator) at every call.

    input_ids: (B, T) ints. Every token whose id is not in `special_ids` ([PAD], [CLS], [SEP],
    [UNK], [MASK]: as HF's collator, which skips all special ids) is chosen with probability
    mlm_prob, and at least one per batch so the loss is defined. A chosen token becomes [MASK]
    80% of the time, a random token 10% and stays itself 10% (Devlin et al. 2019). The random
    token is uniform over the vocabulary minus `special_ids` (HF draws from the whole vocabulary;
    leaving the specials out costs one comparison per special id).
    continuation: `continuation_ids(tokenizer)` for whole-word masking (the later BERT
    release's recipe): words, not tokens, are chosen with probability mlm_prob, and all of a
    chosen word's WordPieces are masked together, each with its own 80/10/10 draw.
    Returns
      masked_input_ids (B, T) int32,
      labels (B, T) int32: the original id where chosen, -100 elsewhere,
      masked_positions (N,) int32 with N = num_mask_slots(B, T, mlm_prob): the chosen flat indices
        into B*T in increasing order, then padding that repeats the first position whose label is
        -100 (0, the first [CLS], in our batches), so the loss ignores it. If more than N tokens
        are chosen (a 6-sigma event) the extra ones are left unmasked, so labels stay consistent.
    """
    input_ids = np.asarray(input_ids)
    special_ids = np.unique(np.fromiter(special_ids, np.int64))
    eligible = ~np.isin(input_ids, special_ids).ravel()
    slots = num_mask_slots(*input_ids.shape, mlm_prob)
    if continuation is None:
        chosen = np.flatnonzero(eligible & (rng.random(eligible.size) < mlm_prob))
        if chosen.size == 0 and eligible.any():
            chosen = rng.choice(np.flatnonzero(eligible), 1)
        if chosen.size > slots:
            chosen = np.sort(rng.choice(chosen, slots, replace=False))
    else:
        chosen = _whole_words(input_ids.ravel(), eligible, continuation, rng, mlm_prob, slots)
    masked = input_ids.astype(np.int32).ravel()  # a copy
    labels = np.full(masked.size, -100, np.int32)
    labels[chosen] = masked[chosen]
    action = rng.random(chosen.size)
    masked[chosen[action < 0.8]] = mask_id
    randomized = chosen[(action >= 0.8) & (action < 0.9)]
    masked[randomized] = _random_ordinary_ids(rng, randomized.size, vocab_size, special_ids)
    return masked.reshape(input_ids.shape), labels.reshape(input_ids.shape), sparse_positions(labels, slots)


def _whole_words(flat_ids, eligible, continuation, rng, mlm_prob, slots):
    """Flat indices of the tokens of whole words chosen with probability mlm_prob; whole words
    dropped at random while they would overflow `slots`; at least one word that fits, so the
    loss is defined. A word starts at an eligible token that is not a '##' piece following
    another eligible token."""
    follows = np.concatenate([[False], eligible[:-1]])
    starts = eligible & ~(continuation[flat_ids] & follows)
    word = np.cumsum(starts) - 1  # each eligible token's word (its start's rank)
    n_words = int(starts.sum())
    if n_words == 0:
        return np.zeros(0, np.int64)
    picked = rng.random(n_words) < mlm_prob
    sizes = np.bincount(word[eligible], minlength=n_words)
    if sizes[picked].sum() > slots:  # keep a random subset of the picked words that fits
        order = rng.permutation(np.flatnonzero(picked))
        picked[:] = False
        picked[order[np.cumsum(sizes[order]) <= slots]] = True
    fits = np.flatnonzero(sizes <= slots)
    if not picked.any() and fits.size:
        picked[rng.choice(fits)] = True
    return np.flatnonzero(eligible & picked[np.maximum(word, 0)])


def _random_ordinary_ids(rng, n, vocab_size, sorted_special_ids):
    """n ids uniform over [0, vocab_size) minus the specials: draw from a range that much shorter,
    then step over each special id in increasing order."""
    ids = rng.integers(0, vocab_size - len(sorted_special_ids), n)
    for special in sorted_special_ids:
        ids += ids >= special
    return ids


def mlm_batch(samples, rng, specials, vocab_size, mlm_prob=0.15, pad_to_multiple_of=1, continuation=None):
    """Pad samples to the longest and mask them (`mask_tokens`; continuation: whole words).

    samples: list of (L,) int arrays, each [CLS] ... [SEP]; specials: `special_ids(tokenizer)`.
    pad_to_multiple_of > 1 rounds T up, so a compiled step sees fewer shapes.
    -> {"input_ids", "attention_mask", "token_type_ids", "labels"}: (B, T) int32, "masked_positions": (N,) int32.
    """
    seq_len = round_up(max(len(s) for s in samples), pad_to_multiple_of)
    input_ids = np.full((len(samples), seq_len), specials["pad"], np.int32)
    attention_mask = np.zeros((len(samples), seq_len), np.int32)
    for row, sample in enumerate(samples):
        input_ids[row, :len(sample)] = sample
        attention_mask[row, :len(sample)] = 1
    masked, labels, positions = mask_tokens(input_ids, rng, specials.values(), vocab_size, specials["mask"], mlm_prob,
                                            continuation)
    return {"input_ids": masked, "attention_mask": attention_mask, "token_type_ids": np.zeros_like(input_ids),
            "labels": labels, "masked_positions": positions}


# ---------------------------------------------------------------------------------------------
# Looking at predictions

GREEN, RED_STRUCK, RESET = "\x1b[32m", "\x1b[31;9m", "\x1b[0m"


def render_masked_predictions(tokenizer, input_ids, labels, predicted_ids, color=False):
    """One sample's masked-token predictions as readable text, then the accuracy on it.

    input_ids, labels, predicted_ids: (T,) ints; labels is -100 where nothing was masked, and
    predicted_ids (e.g. the argmax of the MLM logits) is read only where labels are set.
    Unmasked tokens print as they are, word pieces ("##ing") glued to the piece before, and
    [CLS]/[SEP]/[PAD] left out. A masked token prints as
        [truth]            predicted right  (color: green)
        ~~guess~~[truth]   predicted wrong  (color: the guess red and struck through, no ~~)
    e.g. "ben confesses [to] the ~~house~~[fire] .\\nmasked accuracy 1/2 (50.0%)".
    What the model saw at a masked position ([MASK], a random token or the token) is not shown.
    """
    hidden = {v for k, v in special_ids(tokenizer).items() if k in ("cls", "sep", "pad")}
    words, right, total = [], 0, 0
    for token_id, label, guess in zip(input_ids, labels, predicted_ids):
        if label == -100:
            if token_id in hidden:
                continue
            piece = tokenizer.id_to_token(int(token_id))
            shown = piece.removeprefix("##")
        else:
            piece = tokenizer.id_to_token(int(label))
            truth = f"[{piece.removeprefix('##')}]"
            total += 1
            if guess == label:
                right += 1
                shown = f"{GREEN}{truth}{RESET}" if color else truth
            else:
                wrong = tokenizer.id_to_token(int(guess)).removeprefix("##")
                shown = (f"{RED_STRUCK}{wrong}{RESET}" if color else f"~~{wrong}~~") + truth
        if piece.startswith("##") and words:
            words[-1] += shown
        else:
            words.append(shown)
    score = f"masked accuracy {right}/{total} ({100 * right / total:.1f}%)" if total else "no masked tokens"
    return " ".join(words) + "\n" + score


# ---------------------------------------------------------------------------------------------
# The whole preparation (prepare_mlm.py; train_mlm.py on first run)

def split_documents(documents, val_fraction, test_fraction, seed, source="input"):
    """A seeded split by document -> {"train": [...], "val": [...], "test": [...]}.

    A non-zero fraction holds out round(fraction * n) documents, at least one.
    """
    n = len(documents)
    n_val, n_test = (max(1, round(f * n)) if f > 0 else 0 for f in (val_fraction, test_fraction))
    if n - n_val - n_test < 1:
        raise ValueError(f"{source}: {n} document(s) are too few to hold out val_fraction={val_fraction} and "
                         f"test_fraction={test_fraction} by document (in plain text, a blank line separates documents)")
    order = np.random.default_rng(seed).permutation(n)
    return {"train": [documents[i] for i in order[n_val + n_test:]], "val": [documents[i] for i in order[:n_val]],
            "test": [documents[i] for i in order[n_val:n_val + n_test]]}


def prepare(input, out_dir, vocab=None, vocab_size=8192, max_len=128, builder="segment", shard_size=2048,
            val_fraction=0.1, test_fraction=0.0, test_input=None, seed=0, force=False):
    """Text -> tokenizer + train/val/test shards in out_dir; returns the summary (also out_dir/summary.json).

    input, test_input: a file or `datasets` name (`read_documents`). Documents are split with
    `split_documents`; the test split is all of test_input when given. vocab: a vocab.txt,
    tokenizer directory or packaged model name (`hub.resolve`) to use; None trains a lowercase
    WordPiece vocabulary of vocab_size on the train split. Train samples are shuffled (seeded)
    before they are cut into shards.
    Writes tokenizer.json + vocab.txt + tokenizer_config.json, {split}-00000.msgpack, ... of
    shard_size samples each, and last summary.json, whose presence means the directory is
    complete. If it exists with the same settings, nothing is redone (unless force): a training
    script can call this at every start. A trained vocabulary may differ by a few tokens between
    runs (the `tokenizers` trainer breaks ties in hash-map order, huggingface/tokenizers#1794);
    each directory is consistent in itself, its shards carrying its vocabulary's hash.
    """
    settings = {"input": input, "test_input": test_input, "vocab": vocab, "vocab_size": None if vocab else vocab_size,
                "max_len": max_len, "builder": builder, "shard_size": shard_size, "val_fraction": val_fraction,
                "test_fraction": None if test_input else test_fraction, "seed": seed, "shard_version": SHARD_VERSION}
    summary_path = os.path.join(out_dir, "summary.json")
    if not force and os.path.exists(summary_path):
        with open(summary_path, encoding="utf-8") as f:
            summary = json.load(f)
        if summary.get("settings") == settings:
            return summary
    if builder not in BUILDERS:
        raise ValueError(f"builder={builder!r}: expected one of {sorted(BUILDERS)}")
    if max_len < 3 or shard_size < 1:
        raise ValueError(f"max_len={max_len}, shard_size={shard_size}: need max_len >= 3 and shard_size >= 1")
    start = time.perf_counter()
    documents = split_documents(read_documents(input), val_fraction, 0 if test_input else test_fraction, seed, input)
    if test_input:
        documents["test"] = read_documents(test_input)
    if vocab:
        tokenizer = load_tokenizer(resolve(vocab))
    else:  # "[UNK]" is one special token when encoding, but the trainer would count the word "unk" in it
        tokenizer = train_wordpiece((p.replace(UNK_TEXT, " ") for doc in documents["train"] for p in doc), vocab_size)
    os.makedirs(out_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(out_dir, "*-[0-9][0-9][0-9][0-9][0-9].msgpack")) + [summary_path]:
        if os.path.exists(stale):  # a shard left over from an earlier run would join the glob
            os.remove(stale)
    save_tokenizer(tokenizer, out_dir)
    ids = special_ids(tokenizer)
    header = {"builder": builder, "seed": seed, "max_len": max_len, "vocab_size": tokenizer.get_vocab_size(),
              "vocab_sha256": vocab_sha256(tokenizer)}
    shuffle = np.random.default_rng([seed, 1])
    splits = {}
    for split, docs in documents.items():
        samples = BUILDERS[builder](encode_sentences(tokenizer, docs), max_len, ids["cls"], ids["sep"])
        if split == "train":
            samples = [samples[i] for i in shuffle.permutation(len(samples))]
        files = [f"{split}-{k:05d}.msgpack" for k in range(-(-len(samples) // shard_size))]
        for k, name in enumerate(files):
            write_shard(os.path.join(out_dir, name), samples[k * shard_size:(k + 1) * shard_size],
                        {**header, "split": split})
        splits[split] = {"documents": len(docs), "samples": len(samples), "tokens": sum(len(s) for s in samples),
                         "unk_tokens": int(sum((s == ids["unk"]).sum() for s in samples)), "shards": files}
    summary = {"settings": settings, **{k: header[k] for k in ("vocab_size", "vocab_sha256")}, "splits": splits,
               "seconds": round(time.perf_counter() - start, 2)}
    with atomic_path(summary_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(summary, indent=2) + "\n")
    return summary
