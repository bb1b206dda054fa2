"""BERT WordPiece tokenizers from HF `tokenizers`: load, build from vocab.txt, train, save.

The fast Rust tokenizer gives us batch encoding and character offsets (needed by SQuAD);
we only assemble BERT's pipeline: BertNormalizer (clean text, lowercase, strip accents)
-> BertPreTokenizer (whitespace + punctuation) -> WordPiece ("##" continuation)
-> "[CLS] A [SEP] B [SEP]" with token_type_ids 0/1.
"""

import json
import os

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def bert_wordpiece(vocab, lowercase=True):
    """A BERT tokenizer from a vocab (dict token -> id, or a vocab.txt path)."""
    if isinstance(vocab, (str, os.PathLike)):
        vocab = read_vocab(vocab)
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"vocabulary lacks the special tokens {missing}")
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.add_special_tokens(list(SPECIAL_TOKENS))  # "[MASK]" in text is one token, as in HF's tokenizer
    _bert_pipeline(tok, lowercase)
    return tok


def _bert_pipeline(tok, lowercase):
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    if tok.get_vocab_size() > 0:
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)])


def read_vocab(path):
    """vocab.txt -> {token: id}, one token per line, id = line number."""
    try:
        with open(path, encoding="utf-8") as f:
            tokens = f.read().splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such vocabulary file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 ({e})") from None
    if not tokens:
        raise ValueError(f"{path}: empty vocabulary")
    return {t: i for i, t in enumerate(tokens)}


def load_tokenizer(path):
    """A directory with tokenizer.json or vocab.txt (HF layout), or a vocab.txt file.

    Truncation and padding stored in tokenizer.json are switched off: callers set them
    per use (SQuAD windows, dynamic padding), so nothing happens behind their back.
    """
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "tokenizer.json")):
            tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        elif os.path.exists(os.path.join(path, "vocab.txt")):
            lowercase = True
            cfg = os.path.join(path, "tokenizer_config.json")
            if os.path.exists(cfg):
                with open(cfg, encoding="utf-8") as f:
                    lowercase = json.load(f).get("do_lower_case", True)
            tok = bert_wordpiece(os.path.join(path, "vocab.txt"), lowercase)
        else:
            raise FileNotFoundError(f"{path}: no tokenizer.json or vocab.txt in this directory")
    elif os.path.isfile(path):
        tok = bert_wordpiece(path)
    else:
        raise FileNotFoundError(f"{path}: no such tokenizer file or directory")
    tok.no_truncation()
    tok.no_padding()
    return tok


def train_wordpiece(texts, vocab_size, lowercase=True, min_frequency=2):
    """Train a BERT WordPiece vocabulary on an iterator of strings.

    Not reproducible run to run: `tokenizers` numbers the ## pieces in hash-map order and breaks
    ties between equally frequent merges by those numbers (huggingface/tokenizers#1794), so two
    trainings on the same text give slightly different vocabularies. Hence the vocabulary is saved
    with the shards and its hash checked: prepare once, compare runs on the same data_dir.
    """
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    _bert_pipeline(tok, lowercase)
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=list(SPECIAL_TOKENS), continuing_subword_prefix="##",
                                        show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    _bert_pipeline(tok, lowercase)  # now that [CLS]/[SEP] have ids, add the post-processor
    return tok


def save_tokenizer(tok, directory, lowercase=True):
    """Write tokenizer.json + vocab.txt + tokenizer_config.json: loadable by us and by HF AutoTokenizer."""
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    with open(os.path.join(directory, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("".join(t + "\n" for t, _ in vocab))
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": lowercase, "model_max_length": 512,
                   "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                   "mask_token": "[MASK]"}, f, indent=2)


def special_ids(tok):
    """{'pad': id, 'unk': id, 'cls': id, 'sep': id, 'mask': id} for a BERT tokenizer."""
    ids = {t.strip("[]").lower(): tok.token_to_id(t) for t in SPECIAL_TOKENS}
    missing = [k for k, v in ids.items() if v is None]
    if missing:
        raise ValueError(f"tokenizer lacks the special tokens {missing}")
    return ids
