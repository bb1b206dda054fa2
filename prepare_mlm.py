"""Prepare MLM pretraining data: text -> WordPiece vocabulary -> train/val/test msgpack shards.

    python prepare_mlm.py --input data/wikitext/wiki.valid.excerpt.tokens --out out/mlm_data --vocab_size 8192
    python prepare_mlm.py --input corpus.txt --out out/corpus --vocab all-MiniLM-L6-v2 --builder split
    python prepare_mlm.py --input wikitext:wikitext-103-raw-v1 --out out/wt103   # a `datasets` name (online)

Writes OUT/tokenizer.json + vocab.txt, OUT/{train,val,test}-00000.msgpack, ... and OUT/summary.json.
The formats and sample builders are described in nanobert/mlm_data.py.
"""

import argparse
import sys

from nanobert.mlm_data import BUILDERS, prepare


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="text file (.tokens = WikiText) or a `datasets` name")
    parser.add_argument("--out", required=True, help="output directory")
    vocab = parser.add_mutually_exclusive_group()
    vocab.add_argument("--vocab_size", type=int, default=8192, help="train an own lowercase WordPiece vocabulary")
    vocab.add_argument("--vocab", help="use this vocab.txt, tokenizer directory or packaged model name")
    parser.add_argument("--max_len", type=int, default=128, help="tokens per sample, [CLS] and [SEP] included")
    parser.add_argument("--builder", choices=sorted(BUILDERS), default="segment")
    parser.add_argument("--shard_size", type=int, default=2048, help="samples per shard")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="of the documents")
    parser.add_argument("--test_fraction", type=float, default=0.0, help="of the documents (if no --test_input)")
    parser.add_argument("--test_input", help="text file or `datasets` name for the test split")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        summary = prepare(args.input, args.out, vocab=args.vocab, vocab_size=args.vocab_size,
                          max_len=args.max_len, builder=args.builder, shard_size=args.shard_size,
                          val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                          test_input=args.test_input, seed=args.seed, force=True)
    except (OSError, ValueError) as e:
        sys.exit(f"prepare_mlm.py: error: {e}")
    print(f"vocabulary: {summary['vocab_size']} tokens, sha256 {summary['vocab_sha256'][:16]}...")
    for split, s in summary["splits"].items():
        print(f"{split:5s}: {s['documents']:6d} documents {s['samples']:8d} samples {s['tokens']:10d} tokens "
              f"({s['unk_tokens'] / max(s['tokens'], 1):.1%} [UNK]) in {len(s['shards'])} shards")
    print(f"wrote {args.out} in {summary['seconds']:.1f} s")


if __name__ == "__main__":
    main()
