"""MLM data: reading text, vocabularies, sample builders, shards, the stream, masking, rendering."""

import hashlib
import json
import os
import sys
import types

import numpy as np
import pytest

from nanobert.mlm_data import (
    ShardStream, continuation_ids, encode_sentences, mask_tokens, mlm_batch, num_mask_slots, prepare, read_documents, read_shard,
    read_split, read_wikitext, render_masked_predictions, segment_samples, split_documents, split_samples,
    split_sentences, vocab_sha256, write_shard)
from nanobert.tokenizer import bert_wordpiece, load_tokenizer, save_tokenizer, special_ids, train_wordpiece

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXCERPT = os.path.join(REPO, "data", "wikitext", "wiki.valid.excerpt.tokens")


@pytest.fixture(scope="module")
def documents():
    """The first 3 articles of the shipped excerpt, [UNK] removed so every character is in the vocabulary."""
    return [[p.replace("[UNK]", "x") for p in doc] for doc in read_documents(EXCERPT)[:3]]


@pytest.fixture(scope="module")
def tokenizer(documents):
    return train_wordpiece((p for doc in documents for p in doc), vocab_size=600)


# ----------------------------------------------------------------------------------- reading text

def test_wikitext_cleanup_on_hand_made_lines():
    lines = [" ", " = Homarus gammarus = ", " ",
             " It grows to 60 @.@ 5 cm ( 24 in ) , is red @-@ tipped ; 1 @,@ 000 <unk> live [ here ] . ", " ",
             " = = Description = = ", " ", " He did n't say it 's the lobster 's claw : \" Blue \" ! ",
             " = = = Deep = = = ", " = Second article = ", " Costs $ 5 , 20 % more . "]
    assert read_wikitext(lines) == [
        ["Homarus gammarus", "It grows to 60.5 cm (24 in), is red-tipped; 1,000 [UNK] live [here].", "Description",
         "He didn't say it's the lobster's claw: \" Blue \"!", "Deep"],
        ["Second article", "Costs $5, 20% more."]]


def test_shipped_excerpt_is_the_25_articles_its_readme_names():
    documents = read_documents(EXCERPT)
    assert len(documents) == 25
    assert documents[0][0] == "Homarus gammarus" and documents[-1][0] == "Air Rhodesia Flight [UNK]"


def test_plain_text_blank_lines_separate_documents(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("First doc, line one.\nLine two.\n\n  \n\nSecond doc.\n", encoding="utf-8")
    assert read_documents(str(path)) == [["First doc, line one.", "Line two."], ["Second doc."]]


def test_bad_inputs_are_named(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("line one\ncaf\u00e9 ok\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt line 2 \(byte 12\): not UTF-8"):
        read_documents(str(path))
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.txt: no text"):
        read_documents(str(tmp_path / "empty.txt"))
    with pytest.raises(FileNotFoundError, match="missing.txt: no such file"):
        read_documents(str(tmp_path / "missing.txt"))


def test_datasets_names_are_loaded_lazily_and_fail_in_one_line(monkeypatch):
    class Rows:
        column_names = ["text"]

        def __getitem__(self, column):
            return [" = Title = \n", " Some text @-@ here . \n", " = Next = \n", " More . \n"]

    def load_dataset(name, config, split):
        if name == "offline":
            raise ConnectionError("Couldn't reach 'offline' on the Hub\nmore detail")
        assert (config, split) == ("wikitext-2-raw-v1", "validation")
        return Rows()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert read_documents("wikitext:wikitext-2-raw-v1:validation") == [["Title", "Some text-here."], ["Next", "More."]]
    with pytest.raises(FileNotFoundError, match=r"^offline: no such file, .*ConnectionError: Couldn't reach 'offline' "
                                                r"on the Hub\)$"):
        read_documents("offline")


def test_split_sentences():
    assert split_sentences('He joined No. 2 Squadron. It was "big." (Then) he left! Why? H. americanus is.') == [
        "He joined No. 2 Squadron.", 'It was "big."', "(Then) he left!", "Why?", "H. americanus is."]


# ----------------------------------------------------------------------------------- vocabulary

def test_trained_vocab_round_trip(tmp_path, tokenizer, documents):
    save_tokenizer(tokenizer, str(tmp_path))
    texts = [p for doc in documents for p in doc][:20]
    for loaded in (load_tokenizer(str(tmp_path)), load_tokenizer(str(tmp_path / "vocab.txt"))):
        assert [e.ids for e in loaded.encode_batch(texts)] == [e.ids for e in tokenizer.encode_batch(texts)]
    # the hash names the vocabulary file itself: `sha256sum vocab.txt`
    assert vocab_sha256(tokenizer) == hashlib.sha256((tmp_path / "vocab.txt").read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------- sample builders

@pytest.mark.parametrize("builder", [segment_samples, split_samples])
@pytest.mark.parametrize("max_len", [16, 128])
def test_builders_respect_max_len_and_lose_no_text(builder, max_len, tokenizer, documents):
    ids = special_ids(tokenizer)
    samples = builder(encode_sentences(tokenizer, documents), max_len, ids["cls"], ids["sep"])
    assert all(len(s) <= max_len and s[0] == ids["cls"] and s[-1] == ids["sep"] for s in samples)
    inner = np.concatenate([s[1:-1] for s in samples])
    assert not np.isin(inner, list(ids.values())).any()
    # the samples hold the tokens of the whole text, in order ...
    expected = [i for doc in documents for e in tokenizer.encode_batch(doc, add_special_tokens=False) for i in e.ids]
    assert inner.tolist() == expected
    # ... and so all of its characters: decoded word pieces, glued, equal the normalized input without spaces
    decoded = "".join(tokenizer.id_to_token(int(i)).removeprefix("##") for i in inner)
    normalized = "".join(tokenizer.normalizer.normalize_str(p) for doc in documents for p in doc)
    assert decoded == "".join(normalized.split())
    if builder is split_samples:  # fixed windows: only the last one may be shorter
        assert all(len(s) == max_len for s in samples[:-1])


def test_segment_builder_packs_whole_sentences_greedily(tokenizer, documents):
    ids, max_len = special_ids(tokenizer), 256
    doc_sentences = encode_sentences(tokenizer, documents)
    assert max(len(s) for doc in doc_sentences for s in doc) <= max_len - 2  # so no sentence needs a cut
    samples = iter(segment_samples(doc_sentences, max_len, ids["cls"], ids["sep"]))
    for sentences in doc_sentences:
        lengths = [len(s) for s in sentences]
        i = 0
        while i < len(sentences):  # each sample is the longest run of whole sentences that fits
            sample = next(samples)[1:-1]
            j = i + 1
            while j < len(sentences) and sum(lengths[i:j + 1]) <= max_len - 2:
                j += 1
            assert sample.tolist() == np.concatenate(sentences[i:j]).tolist()
            i = j
    assert next(samples, None) is None


def test_segment_builder_cuts_only_a_sentence_too_long():
    short, long_ = np.arange(10, 14), np.arange(100, 125)  # 4 and 25 tokens; a sample holds 8
    samples = segment_samples([[short, long_, short]], max_len=10, cls_id=2, sep_id=3)
    inner = [s[1:-1].tolist() for s in samples]
    assert inner == [short.tolist(), long_[:8].tolist(), long_[8:16].tolist(), long_[16:24].tolist(),
                     long_[24:].tolist() + short.tolist()]


# ----------------------------------------------------------------------------------- shards

def _header(**kw):
    return {"split": "train", "builder": "segment", "seed": 0, "max_len": 16, "vocab_size": 1000,
            "vocab_sha256": "a" * 64, **kw}


def _random_samples(rng, n, max_len=16, vocab_size=1000):
    return [rng.integers(0, vocab_size, rng.integers(3, max_len + 1)).astype(np.int32) for _ in range(n)]


@pytest.mark.parametrize("vocab_size,dtype", [(1000, "<u2"), (70000, "<i4")])
def test_shard_round_trip(tmp_path, vocab_size, dtype):
    samples = _random_samples(np.random.default_rng(0), 50, vocab_size=vocab_size)
    path = str(tmp_path / "train-00000.msgpack")
    write_shard(path, samples, _header(vocab_size=vocab_size))
    header, back = read_shard(path, expect_vocab_hash="a" * 64, expect_max_len=16)
    assert header["num_samples"] == 50 and header["num_tokens"] == sum(map(len, samples))
    assert header["dtype"] == dtype and header["split"] == "train" and header["version"] == 1
    assert all(a.dtype == np.int32 and a.tolist() == b.tolist() for a, b in zip(back, samples))
    assert len(back) == 50
    assert os.listdir(tmp_path) == ["train-00000.msgpack"]  # no temporary file left behind


def test_shard_refuses_other_vocab_max_len_and_corruption(tmp_path):
    path = str(tmp_path / "s.msgpack")
    write_shard(path, _random_samples(np.random.default_rng(0), 20), _header())
    with pytest.raises(ValueError, match=r"s.msgpack: built with vocab sha256 aaaaaaaaaaaaaaaa.*is bbbbbbbbbbbbbbbb"):
        read_shard(path, expect_vocab_hash="b" * 64)
    with pytest.raises(ValueError, match=r"s.msgpack: built with max_len=16, but max_len=128 was asked"):
        read_shard(path, expect_max_len=128)
    data = open(path, "rb").read()
    for name, bad in [("truncated", data[:len(data) // 2]), ("flipped", data[:-5] + bytes([data[-5] ^ 1]) + data[-4:]),
                      ("other", b"\x81\xa1a\x01"), ("garbage", b"\xc1\xc1")]:
        (tmp_path / name).write_bytes(bad)
        with pytest.raises(ValueError, match=f"{name}: (truncated or corrupt|corrupt|not a nanobert)"):
            read_shard(str(tmp_path / name))
    with pytest.raises(ValueError, match="more than max_len=16"):
        write_shard(path, [np.arange(17)], _header())


def test_stream_resumes_exactly_and_visits_every_sample_once_per_epoch(tmp_path):
    samples = [np.array([2, i, 3], np.int32) for i in range(23)]
    for k, (a, b) in enumerate([(0, 10), (10, 13), (13, 23)]):  # shards of 10, 3 and 10 samples
        write_shard(str(tmp_path / f"train-{k:05d}.msgpack"), samples[a:b], _header())
    pattern = str(tmp_path / "train-*.msgpack")
    uninterrupted = [int(s[1]) for s, _ in zip(ShardStream(pattern, seed=5), range(80))]
    for epoch in range(3):  # a seeded shuffle per epoch: each epoch is a permutation, and they differ
        assert sorted(uninterrupted[23 * epoch:23 * (epoch + 1)]) == list(range(23))
    assert uninterrupted[:23] != list(range(23)) and uninterrupted[:23] != uninterrupted[23:46]
    for cut in (7, 10, 23, 31):
        stream = ShardStream(pattern, seed=5)
        first = [int(next(stream)[1]) for _ in range(cut)]
        state = json.loads(json.dumps(stream.state_dict()))
        resumed = ShardStream(pattern, seed=5)
        resumed.load_state_dict(state)
        assert first + [int(next(resumed)[1]) for _ in range(80 - cut)] == uninterrupted
    with pytest.raises(ValueError, match="seed 5 and 3 shards, this stream has seed 6 and 3"):
        ShardStream(pattern, seed=6).load_state_dict(state)
    assert [int(s[1]) for s in read_split(pattern)] == list(range(23))


# ----------------------------------------------------------------------------------- masking

SPECIALS = {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}  # BERT-base's ids: not contiguous


def _padded_batch(rng, batch_size=128, max_len=256, vocab_size=1000):
    samples = []
    for length in rng.integers(max(3, max_len // 2), max_len + 1, batch_size):
        body = rng.integers(104, vocab_size, length - 2)
        body[rng.random(length - 2) < 0.05] = SPECIALS["unk"]
        samples.append(np.concatenate([[SPECIALS["cls"]], body, [SPECIALS["sep"]]]))
    return samples


def test_masking_statistics_and_specials_untouched():
    rng = np.random.default_rng(0)
    vocab_size = 1000
    batch = mlm_batch(_padded_batch(rng), rng, SPECIALS, vocab_size)
    original = np.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])  # undo the masking
    special = np.isin(original, list(SPECIALS.values()))
    chosen = batch["labels"] != -100
    # Tolerances are >= 4 binomial standard deviations (stated per line), so a correct rule passes for any seed.
    # ~24,000 eligible tokens: sd of the chosen fraction is sqrt(.15 * .85 / 24000) = 0.0023
    assert abs(chosen.sum() / (~special).sum() - 0.15) < 0.01
    assert not (chosen & special).any() and (batch["input_ids"][special] == original[special]).all()
    masked, kept = batch["input_ids"][chosen] == SPECIALS["mask"], batch["input_ids"][chosen] == original[chosen]
    randomized = ~masked & ~kept
    # ~3,600 chosen: sd of the 80% share is sqrt(.8 * .2 / 3600) = 0.0067, of a 10% share 0.005
    assert abs(masked.mean() - 0.8) < 0.03 and abs(kept.mean() - 0.1) < 0.02 and abs(randomized.mean() - 0.1) < 0.02
    assert not np.isin(batch["input_ids"][chosen][randomized], list(SPECIALS.values())).any()
    assert (batch["attention_mask"] == (original != SPECIALS["pad"])).all()
    assert batch["token_type_ids"].sum() == 0
    assert all(v.dtype == np.int32 for v in batch.values())


def test_random_replacements_are_uniform_over_the_ordinary_ids():
    ids = np.full((1, 100_000), 500)
    masked, _, _ = mask_tokens(ids, np.random.default_rng(0), SPECIALS.values(), 1000, 103, mlm_prob=1.0)
    random_ids = masked[(masked != 103) & (masked != 500)]  # ~10,000 draws over the 995 ordinary ids
    assert not np.isin(random_ids, list(SPECIALS.values())).any()
    counts = np.bincount(random_ids, minlength=1000)
    # each ordinary id expects ~10 draws, so one with none has probability e^-10; the top ids are reachable
    assert (counts[[1, 99, 104, 998, 999]] > 0).all()
    # 99 of the 995 lie below [UNK]=100: ~9.95% of the draws, sd 0.3%
    assert abs((random_ids < 100).mean() - 99 / 995) < 0.012


def test_masked_positions_cover_exactly_the_labelled_positions():
    rng = np.random.default_rng(1)
    for batch_size, max_len in [(1, 3), (2, 9), (16, 64)]:
        for _ in range(20):
            batch = mlm_batch(_padded_batch(rng, batch_size, max_len), rng, SPECIALS, 1000, pad_to_multiple_of=8)
            B, T = batch["input_ids"].shape
            assert T % 8 == 0
            positions, labels = batch["masked_positions"], batch["labels"].ravel()
            assert positions.shape == (num_mask_slots(B, T),) and positions.dtype == np.int32
            labelled = np.flatnonzero(labels != -100)
            original = np.where(labels != -100, labels, batch["input_ids"].ravel())
            if not np.isin(original, list(SPECIALS.values())).all():
                assert len(labelled) >= 1  # at least one per batch, so the loss is defined
            assert positions[:len(labelled)].tolist() == labelled.tolist()
            assert (labels[positions[len(labelled):]] == -100).all()  # padding points at ignored positions


def whole_word_batch(rng, B=64, T=48):
    """Ids 200-299 start words, 300-399 are '##' pieces; words of 1-3 pieces, then [SEP] + padding."""
    ids = np.full((B, T), SPECIALS["pad"])
    for row in range(B):
        body = []
        while len(body) < rng.integers(10, T - 4):
            body += [rng.integers(200, 300)] + list(rng.integers(300, 400, rng.integers(0, 3)))
        ids[row, :len(body) + 2] = [SPECIALS["cls"], *body, SPECIALS["sep"]]
    return ids


CONTINUATION = (np.arange(1000) >= 300) & (np.arange(1000) < 400)


def test_continuation_ids_are_the_wordpiece_suffixes():
    tok = bert_wordpiece({t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "walk", "##ing",
                                                       "#", "##s"])})
    assert continuation_ids(tok).tolist() == [False] * 6 + [True, False, True]
    assert continuation_ids(tok)[tok.encode("walking walks").ids].tolist() == [False, False, True, False, True, False]


def test_whole_word_masking_masks_every_piece_of_a_chosen_word():
    rng = np.random.default_rng(0)
    ids = whole_word_batch(rng)
    masked, labels, positions = mask_tokens(ids, rng, SPECIALS.values(), 1000, SPECIALS["mask"],
                                            continuation=CONTINUATION)
    chosen = (labels != -100).ravel()
    flat = ids.ravel()
    word = np.cumsum((flat >= 200) & (flat < 300))  # a '##' piece belongs to the word before it
    in_word = (flat >= 200) & (flat < 400)
    for w in np.unique(word[in_word]):  # all of a word's pieces or none
        pieces = chosen[in_word & (word == w)]
        assert pieces.all() or not pieces.any(), w
    words = np.unique(word[in_word])
    picked = np.unique(word[chosen])
    # ~1,900 words: sd of the picked fraction sqrt(.15 * .85 / 1900) = 0.008
    assert abs(len(picked) / len(words) - 0.15) < 0.035
    assert not chosen[~in_word].any() and (labels.ravel()[chosen] == flat[chosen]).all()
    # each piece has its own 80/10/10 draw: some words are partly [MASK], partly kept or random
    assert abs((masked.ravel()[chosen] == SPECIALS["mask"]).mean() - 0.8) < 0.05
    assert positions[:chosen.sum()].tolist() == np.flatnonzero(chosen).tolist()


def test_whole_word_masking_overflow_drops_whole_words_and_picks_at_least_one():
    rng = np.random.default_rng(1)
    ids = whole_word_batch(rng, B=2, T=32)
    _, labels, positions = mask_tokens(ids, rng, SPECIALS.values(), 1000, SPECIALS["mask"], mlm_prob=0.9,
                                       continuation=CONTINUATION)
    chosen = (labels != -100).ravel()
    assert 0 < chosen.sum() <= len(positions)  # cut to the slots ...
    flat, word = ids.ravel(), np.cumsum((ids.ravel() >= 200) & (ids.ravel() < 300))
    for w in np.unique(word[chosen]):  # ... by whole words
        assert chosen[((flat >= 200) & (flat < 400)) & (word == w)].all()
    # at least one word, one that fits the slots (here 1: the 3-piece word does not)
    two_words = np.array([[SPECIALS["cls"], 250, 350, 351, 260, SPECIALS["sep"]]])
    _, labels, positions = mask_tokens(two_words, rng, SPECIALS.values(), 1000, SPECIALS["mask"], mlm_prob=1e-9,
                                       continuation=CONTINUATION)
    assert len(positions) == 1 and np.flatnonzero(labels[0] != -100).tolist() == [4]


def test_mask_tokens_never_masks_a_batch_of_specials_only():
    ids = np.array([[101, 102, 0, 0]])
    masked, labels, positions = mask_tokens(ids, np.random.default_rng(0), SPECIALS.values(), 1000, 103)
    assert (masked == ids).all() and (labels == -100).all() and (labels.ravel()[positions] == -100).all()


# ----------------------------------------------------------------------------------- rendering

def test_render_masked_predictions_both_color_modes():
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "ben", "confesses", "to", "the", "fire", "house", "walk",
             "##ing", "."]
    tok = bert_wordpiece({t: i for i, t in enumerate(vocab)})
    idx = {t: i for i, t in enumerate(vocab)}
    truth = ["[CLS]", "ben", "confesses", "to", "the", "fire", "walk", "##ing", ".", "[SEP]", "[PAD]"]
    masked_at = {3: "to", 5: "house", 7: "##ing"}  # position -> the model's guess
    input_ids = [idx["[MASK]"] if i in masked_at else idx[t] for i, t in enumerate(truth)]
    labels = [idx[truth[i]] if i in masked_at else -100 for i in range(len(truth))]
    predicted = [idx[masked_at.get(i, "the")] for i in range(len(truth))]
    plain = render_masked_predictions(tok, input_ids, labels, predicted, color=False)
    assert plain == "ben confesses [to] the ~~house~~[fire] walk[ing] .\nmasked accuracy 2/3 (66.7%)"
    colored = render_masked_predictions(tok, input_ids, labels, predicted, color=True)
    assert "\x1b[32m[to]\x1b[0m" in colored and "\x1b[31;9mhouse\x1b[0m[fire]" in colored and "~~" not in colored
    assert colored.replace("\x1b[32m", "").replace("\x1b[31;9m", "").replace("\x1b[0m", "") == \
        plain.replace("~~", "")


# ----------------------------------------------------------------------------------- prepare

def test_prepare_writes_consistent_shards_and_reuses_them(tmp_path):
    text = tmp_path / "four.tokens"
    with open(EXCERPT, encoding="utf-8") as f:
        text.write_text("".join(f.readlines()[:132]), encoding="utf-8")  # articles 0-3 (line 133 starts #4)
    out = str(tmp_path / "out")
    settings = dict(vocab_size=500, max_len=64, shard_size=100, val_fraction=0.25, seed=3)
    summary = prepare(str(text), out, **settings)
    splits = summary["splits"]
    assert [splits[k]["documents"] for k in ("train", "val", "test")] == [3, 1, 0]
    tokenizer = load_tokenizer(out)
    assert summary["vocab_sha256"] == vocab_sha256(tokenizer)
    inner = []
    for split in ("train", "val"):
        num_shards = -(-splits[split]["samples"] // 100)
        assert splits[split]["shards"] == [f"{split}-{k:05d}.msgpack" for k in range(num_shards)]
        samples = read_split(os.path.join(out, f"{split}-*.msgpack"), summary["vocab_sha256"], 64)
        assert len(samples) == splits[split]["samples"] and sum(map(len, samples)) == splits[split]["tokens"]
        inner += [i for s in samples for i in s[1:-1]]
    assert len(splits["train"]["shards"]) > 1
    # together the splits hold every token of the text, [UNK]s included
    text_ids = [i for doc in read_documents(str(text)) for e in tokenizer.encode_batch(doc, add_special_tokens=False)
                for i in e.ids]
    assert sorted(inner) == sorted(text_ids)
    unk = special_ids(tokenizer)["unk"]
    assert splits["train"]["unk_tokens"] + splits["val"]["unk_tokens"] == text_ids.count(unk) > 0
    # same settings: nothing is redone; other settings: no stale shard survives
    mtime = os.path.getmtime(os.path.join(out, "train-00000.msgpack"))
    assert prepare(str(text), out, **settings) == summary
    assert os.path.getmtime(os.path.join(out, "train-00000.msgpack")) == mtime
    prepare(str(text), out, **{**settings, "shard_size": 1000})
    assert sorted(f for f in os.listdir(out) if f.endswith(".msgpack")) == ["train-00000.msgpack", "val-00000.msgpack"]


def test_split_documents_is_seeded_disjoint_and_complete():
    documents = [[f"doc {i}"] for i in range(20)]
    split = split_documents(documents, 0.1, 0.2, seed=0)
    assert [len(split[k]) for k in ("train", "val", "test")] == [14, 2, 4]
    assert sorted(d[0] for part in split.values() for d in part) == sorted(d[0] for d in documents)
    assert split == split_documents(documents, 0.1, 0.2, seed=0) != split_documents(documents, 0.1, 0.2, seed=1)
    with pytest.raises(ValueError, match="corpus.txt: 1 document.* too few"):
        split_documents(documents[:1], 0.1, 0.0, seed=0, source="corpus.txt")


def test_cli_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(REPO)
    from prepare_mlm import main
    with pytest.raises(SystemExit) as exit_:
        main(["--input", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "out")])
    assert exit_.value.code == f"prepare_mlm.py: error: {tmp_path / 'missing.txt'}: no such file"
