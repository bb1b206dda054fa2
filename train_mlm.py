"""Pretrain BERT from scratch with masked language modelling (MLM), torch or MLX.

    python train_mlm.py                                    # shipped WikiText-2 excerpt: own vocab, small BERT, minutes
    python train_mlm.py --backend mlx
    torchrun --nproc_per_node 2 train_mlm.py               # DDP (MLX: mlx.launch -n 2 --backend ring -- python train_mlm.py --backend mlx)
    python train_mlm.py --config configs/mlm_wikitext2.ini # the README's quality run
    python train_mlm.py --show out/mlm/best                # a checkpoint's predictions on a held-out passage

On first run the text in --input is prepared into --data_dir (own WordPiece vocabulary,
msgpack shards; see prepare_mlm.py), then reused. Every time a sample is seen it is masked
afresh (15%: 80% [MASK], 10% random, 10% kept), and only the masked positions are decoded
(the sparse MLM head). The final checkpoint is in the shared weight format, with its
tokenizer: train_sst2.py / train_squad.py --init it, HF BertForMaskedLM.from_pretrained opens it.

Settings are the DEFAULTS below; override them with --config FILE.ini and/or --key=value.
Phases: settings -> data -> model -> optimizer -> loop (evaluate, show, checkpoint) -> save.
"""

import glob
import os
import sys

import numpy as np
from tqdm import tqdm

from nanobert import checkpoint, mlm_data
from nanobert.config import BertConfig
from nanobert.tokenizer import load_tokenizer, special_ids
from nanobert.training import check_schedule, configure, fit, load_backend, main_guard, peak_rss_mb, save_run_record

DEFAULTS = dict(
    backend="torch",                  # torch | mlx
    # data (prepared into data_dir on first run; see prepare_mlm.py)
    input="data/wikitext/wiki.valid.excerpt.tokens",
    test_input="",                    # a held-out text for the test split (else test_fraction of input)
    data_dir="out/mlm_data",
    vocab="",                         # a vocab.txt / tokenizer dir to use instead of training one
    vocab_size=4096,
    max_len=128,
    builder="segment",                # segment (sentence-aware packing) | split (fixed windows)
    val_fraction=0.1,
    test_fraction=0.0,
    mlm_prob=0.15,
    whole_word_mask=False,            # mask all WordPieces of a chosen word together (BERT's later recipe)
    # model (BERT hyper-parameters, HF names)
    num_hidden_layers=2,
    hidden_size=128,
    num_attention_heads=2,
    intermediate_size=512,
    max_position_embeddings=512,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    init="",                          # continue from a pretrained BertForMaskedLM checkpoint instead
    # training
    out_dir="out/mlm",
    batch_size=32,                    # samples per micro-step per process
    grad_accum=1,
    max_steps=400,
    lr=1e-3,
    min_lr=1e-4,
    decay="cosine",                   # after warmup: "cosine" (nanoGPT) or "linear" (HF Trainer's default)
    warmup=0.05,                      # warmup steps: a fraction of all steps if < 1, else a count
    weight_decay=0.01,
    grad_clip=1.0,
    eval_every=100,
    eval_samples=0,                   # validation samples per evaluation (0: all)
    log_every=10,
    report_to="none",                # or "tensorboard" (pip install tensorboard): scalars in out_dir/tensorboard
    save_every=0,                    # optimizer steps between extra checkpoints (resume points; 0: none)
    max_checkpoints=2,
    resume="",                        # bare --resume: latest checkpoint in out_dir; or a checkpoint path
    seed=0,
    compile=False,                    # torch backend: torch.compile the model (MLX always compiles its step)
    show="",                          # print a checkpoint's masked predictions on a held-out passage, then exit
)


class MLMBatches:
    """Global batches from a ShardStream, masked with an rng drawn from (seed, batch number):
    the masks are new every time a sample comes round, and a resumed run draws the same ones."""

    def __init__(self, stream, global_batch, specials, vocab_size, mlm_prob, seed, pad_multiple, continuation):
        self.stream, self.global_batch, self.specials = stream, global_batch, specials
        self.vocab_size, self.mlm_prob, self.seed, self.count = vocab_size, mlm_prob, seed, 0
        self.pad_multiple = pad_multiple  # the engine's E.PAD_MULTIPLE: few shapes for a compiled step
        self.continuation = continuation  # whole-word masking: mlm_data.continuation_ids, else None

    @property
    def epoch(self):
        return self.stream.epoch

    def next(self):
        samples = [next(self.stream) for _ in range(self.global_batch)]
        rng = np.random.default_rng([self.seed, self.count])
        self.count += 1
        return mlm_data.mlm_batch(samples, rng, self.specials, self.vocab_size, self.mlm_prob, self.pad_multiple,
                                  self.continuation)

    def state_dict(self):
        return {"stream": self.stream.state_dict(), "count": self.count}

    def load_state_dict(self, state):
        self.stream.load_state_dict(state["stream"])
        self.count = state["count"]


def main():
    cfg = configure(DEFAULTS, sys.argv[1:], __doc__)
    if cfg.compile and cfg.backend != "torch":
        raise ValueError("compile: torch.compile is for --backend torch; the MLX twin always mx.compiles its step")
    models, E = load_backend(cfg.backend)
    if cfg.show:
        return show_checkpoint(cfg, models, E)
    rank, world = E.init_distributed()
    master = rank == 0

    # --- data -----------------------------------------------------------------------------
    data_settings = dict(input=cfg.input, out_dir=cfg.data_dir, vocab=cfg.vocab or None, vocab_size=cfg.vocab_size,
                         max_len=cfg.max_len, builder=cfg.builder, val_fraction=cfg.val_fraction,
                         test_fraction=cfg.test_fraction, test_input=cfg.test_input or None, seed=cfg.seed)
    if master:  # prepare the shards once (a no-op when data_dir holds them for these settings) ...
        mlm_data.prepare(**data_settings)
    E.all_sum(0)  # ... while the other processes wait here
    summary = mlm_data.prepare(**data_settings)
    tokenizer = load_tokenizer(cfg.data_dir)
    specials, vocab_size = special_ids(tokenizer), tokenizer.get_vocab_size()
    vocab_hash = summary["vocab_sha256"]
    continuation = mlm_data.continuation_ids(tokenizer) if cfg.whole_word_mask else None
    stream = mlm_data.ShardStream(os.path.join(cfg.data_dir, "train-*.msgpack"), seed=cfg.seed,
                                  expect_vocab_hash=vocab_hash, expect_max_len=cfg.max_len)
    global_batch = cfg.batch_size * cfg.grad_accum * world
    loader = MLMBatches(stream, global_batch, specials, vocab_size, cfg.mlm_prob, cfg.seed, E.PAD_MULTIPLE,
                        continuation)
    val_batches = heldout_batches(cfg, "val", specials, vocab_size, vocab_hash, continuation)
    baseline = unigram_accuracy(stream, val_batches, vocab_size)
    max_iters = cfg.max_steps
    warmup_iters = round(cfg.warmup * max_iters) if cfg.warmup < 1 else int(cfg.warmup)
    check_schedule(cfg.lr, cfg.min_lr, warmup_iters, max_iters, cfg.decay)

    # --- model + optimizer -----------------------------------------------------------------
    resume_path = checkpoint.resolve_resume(cfg.resume, cfg.out_dir)
    E.seed(cfg.seed)
    if resume_path or cfg.init:
        model = models.BertForMaskedLM.from_pretrained(resume_path or cfg.init)
    else:
        config = BertConfig(vocab_size=vocab_size, pad_token_id=specials["pad"],
                            **{k: getattr(cfg, k) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                                            "intermediate_size", "max_position_embeddings",
                                                            "hidden_dropout_prob", "attention_probs_dropout_prob")})
        model = models.BertForMaskedLM(config).init_weights()
    if model.config.vocab_size != vocab_size:
        raise ValueError(f"{resume_path or cfg.init}: the model's vocabulary has {model.config.vocab_size} tokens, "
                         f"the data in {cfg.data_dir} {vocab_size}")
    E.prepare(model)
    if cfg.compile:
        E.compile(model)
    opt = E.AdamW(model, weight_decay=cfg.weight_decay)
    if master:
        n_params = sum(v.size for v in model.state_numpy().values())
        train = summary["splits"]["train"]
        print(f"MLM: {train['samples']} train samples ({train['tokens']:,} tokens), "
              f"{summary['splits']['val']['samples']} validation samples, "
              f"vocabulary {vocab_size}; {n_params / 1e6:.2f}M parameters; {max_iters} steps of {global_batch} samples "
              f"({world} process(es)), backend {cfg.backend}; unigram baseline accuracy {baseline:.2f}%"
              + (f"; resuming from {resume_path}" if resume_path else ""))

    def evaluate(step):
        tqdm.write(show_predictions(tokenizer, E, model, val_batches[0], color=sys.stdout.isatty()))
        return {**mlm_metrics(E, model, val_batches, "val"), "unigram_accuracy": baseline}

    # --- training loop (nanobert/training.py: fit) --------------------------------------------
    run = fit(cfg, E, model, opt, loader, max_iters, warmup_iters, evaluate, "val_accuracy", rank, world,
              resume=checkpoint.load(resume_path) if resume_path else None, tokenizer=cfg.data_dir,
              panels=[("loss", ["loss", "val_loss"]), ("masked-token accuracy (%)", ["val_accuracy", "unigram_accuracy"]),
                      ("learning rate", ["lr"])])
    if master:
        test = heldout_batches(cfg, "test", specials, vocab_size, vocab_hash, continuation)
        final = mlm_metrics(E, model, test, "test") if test else {}
        print(f"best validation accuracy {run['best']:.2f}% (unigram baseline {baseline:.2f}%), model in "
              f"{os.path.join(cfg.out_dir, 'best')}"
              + "".join(f"; final {k} {v:.4g}" for k, v in final.items())
              + f"; training {run['train_s']:.0f} s, {run['tokens'] / max(run['train_s'], 1e-9):.0f} tokens/s; "
              f"peak RSS {peak_rss_mb():.0f} MiB; curves in {os.path.join(cfg.out_dir, 'metrics.png')}")
        save_run_record(cfg, run, best_val_accuracy=run["best"], **final)


def heldout_batches(cfg, split, specials, vocab_size, vocab_hash, continuation=None):
    """The `split` shards as batches of 64, masked once with a fixed seed (comparable evaluations),
    as training masks them (continuation: whole words)."""
    pattern = os.path.join(cfg.data_dir, f"{split}-*.msgpack")
    samples = mlm_data.read_split(pattern, vocab_hash, cfg.max_len) if glob.glob(pattern) else []
    samples = samples[:cfg.eval_samples] if cfg.eval_samples else samples
    rng = np.random.default_rng([cfg.seed, 12345])
    return [mlm_data.mlm_batch(samples[i:i + 64], rng, specials, vocab_size, cfg.mlm_prob, continuation=continuation)
            for i in range(0, len(samples), 64)]


def mlm_metrics(E, model, batches, prefix):
    """Loss, perplexity and accuracy on the masked tokens of `batches`."""
    loss_sum = correct = total = 0
    for batch in batches:
        out = E.predict(model, batch)
        labels = batch["labels"].reshape(-1)[batch["masked_positions"]]
        n = int((labels != -100).sum())
        loss_sum, total = loss_sum + float(out["loss"]) * n, total + n
        correct += int(((out["logits"].argmax(-1) == labels) & (labels != -100)).sum())
    loss = loss_sum / total
    return {f"{prefix}_loss": loss, f"{prefix}_perplexity": float(np.exp(loss)), f"{prefix}_accuracy": 100.0 * correct / total}


def unigram_accuracy(stream, val_batches, vocab_size):
    """Accuracy of always guessing the train split's most frequent token: what MLM must beat."""
    counts = np.zeros(vocab_size, np.int64)
    for path in stream.paths:
        for sample in mlm_data.read_shard(path)[1]:
            np.add.at(counts, sample[1:-1], 1)  # without [CLS]/[SEP], which are never masked
    guess = counts.argmax()
    labels = np.concatenate([b["labels"][b["labels"] != -100] for b in val_batches])
    return 100.0 * float((labels == guess).mean())


def show_predictions(tokenizer, E, model, batch, color, row=0):
    """One sample of a masked batch with the model's guesses inline (mlm_data.render_masked_predictions)."""
    out = E.predict(model, batch)
    T = batch["input_ids"].shape[1]
    predicted = np.full(batch["input_ids"].size, -1)
    predicted[batch["masked_positions"]] = out["logits"].argmax(-1)
    sl = slice(row * T, (row + 1) * T)
    return mlm_data.render_masked_predictions(tokenizer, batch["input_ids"].reshape(-1)[sl],
                                              batch["labels"].reshape(-1)[sl], predicted[sl], color)


def show_checkpoint(cfg, models, E):
    """--show CKPT: mask a held-out passage (the test split, else validation) and print the guesses."""
    model = models.BertForMaskedLM.from_pretrained(cfg.show)
    tokenizer = load_tokenizer(cfg.show)
    split = "test" if any(f.startswith("test-") for f in os.listdir(cfg.data_dir)) else "val"
    samples = mlm_data.read_split(os.path.join(cfg.data_dir, f"{split}-*.msgpack"))
    batch = mlm_data.mlm_batch(samples[:1], np.random.default_rng(cfg.seed), special_ids(tokenizer),
                               tokenizer.get_vocab_size(), cfg.mlm_prob,
                               continuation=mlm_data.continuation_ids(tokenizer) if cfg.whole_word_mask else None)
    print(show_predictions(tokenizer, E, model, batch, color=sys.stdout.isatty()))


if __name__ == "__main__":
    main_guard(main)
