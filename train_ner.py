"""Fine-tune BERT for token classification (named entities) on CoNLL-format files, torch or MLX.

    python train_ner.py                                    # shipped silver NER set, all-MiniLM-L6-v2
    python train_ner.py --backend mlx --data path/to/conll2003   # train.txt + dev.txt, NER tag last
    torchrun --nproc_per_node 2 train_ner.py               # DDP, torch
    mlx.launch -n 2 --backend ring -- python train_ner.py --backend mlx
    python train_ner.py --predict "He sailed to the Black Sea in May 1862 ." --init out/ner/best

Each word's tag is learned on its first WordPiece (the others get -100, as HF's run_ner), and
evaluation reads each word's tag back from there and scores whole entities (nanobert/ner.py:
precision, recall and F1 as conlleval and seqeval count them).
Settings are the DEFAULTS below; override them with --config FILE.ini and/or --key=value.
Phases: settings -> data -> model -> optimizer -> loop (evaluate, checkpoint) -> save.
"""

import math
import os
import sys

import numpy as np

from nanobert import checkpoint, glue, hub, ner
from nanobert.tokenizer import load_tokenizer
from nanobert.training import (EpochLoader, check_schedule, configure, fit, load_backend, main_guard, peak_rss_mb,
                               save_run_record)

DEFAULTS = dict(
    backend="torch",            # torch | mlx
    data="data/ner",            # directory with train.txt + dev.txt (CoNLL: word ... tag per line)
    init="all-MiniLM-L6-v2",    # encoder to start from: checkpoint dir, packaged name, or hub id
    out_dir="out/ner",
    max_length=128,
    batch_size=32,              # sentences per micro-step per process
    grad_accum=1,               # micro-steps per optimizer step
    epochs=3.0,
    max_steps=0,                # stop after this many optimizer steps (0: run all epochs)
    lr=5e-5,
    min_lr=0.0,
    decay="cosine",             # after warmup: "cosine" (nanoGPT) or "linear" (HF Trainer's default)
    warmup=0.1,                 # warmup steps: a fraction of all steps if < 1, else a count
    weight_decay=0.01,
    grad_clip=1.0,
    bucket=True,                # length-bucketed batches (as HF's group_by_length): less padding, less random
    eval_every=0,               # optimizer steps between dev evaluations (0: each epoch's end)
    log_every=20,
    report_to="none",           # or "tensorboard" (pip install tensorboard): scalars in out_dir/tensorboard
    save_every=0,               # optimizer steps between extra checkpoints (resume points; 0: none)
    max_checkpoints=2,
    resume="",                  # bare --resume: latest checkpoint in out_dir; or a checkpoint path
    seed=0,
    predict="",                 # tag this text with the model in --init and print its entities, then exit
)


def main():
    cfg = configure(DEFAULTS, sys.argv[1:], __doc__)
    models, E = load_backend(cfg.backend)
    if cfg.predict:
        return predict(cfg, models, E)
    rank, world = E.init_distributed()

    # --- data ---------------------------------------------------------------------------
    resume_path = checkpoint.resolve_resume(cfg.resume, cfg.out_dir)
    tokenizer = load_tokenizer(resume_path or hub.resolve(cfg.init))
    train = ner.read_conll(os.path.join(cfg.data, "train.txt"))
    dev = ner.read_conll(os.path.join(cfg.data, "dev.txt"))
    tags = ner.tag_names(train)
    label2id = {tag: i for i, tag in enumerate(tags)}
    train_enc = ner.encode_ner(tokenizer, train, label2id, cfg.max_length, os.path.join(cfg.data, "train.txt"))
    dev_enc = ner.encode_ner(tokenizer, dev, label2id, cfg.max_length, os.path.join(cfg.data, "dev.txt"))
    global_batch = cfg.batch_size * cfg.grad_accum * world
    steps_per_epoch = math.ceil(len(train) / global_batch)
    max_iters = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
    warmup_iters = round(cfg.warmup * max_iters) if cfg.warmup < 1 else int(cfg.warmup)
    check_schedule(cfg.lr, cfg.min_lr, warmup_iters, max_iters, cfg.decay)
    # The order of an epoch is a function of (seed, epoch) only: a resumed run sees the same batches.
    loader = EpochLoader(lambda epoch, start: glue.glue_batches(
        train_enc, train_enc["labels"], global_batch, rng=np.random.default_rng([cfg.seed, epoch]),
        bucket=cfg.bucket, start=start, pad_to_multiple_of=E.PAD_MULTIPLE), steps_per_epoch)

    # --- model + optimizer ----------------------------------------------------------------
    E.seed(cfg.seed)
    model = models.BertForTokenClassification.from_pretrained(resume_path or hub.resolve(cfg.init),
                                                              num_labels=len(tags), id2label=dict(enumerate(tags)))
    E.prepare(model)
    opt = E.AdamW(model, weight_decay=cfg.weight_decay)
    if rank == 0:
        n_params = sum(v.size for v in model.state_numpy().values())
        print(f"ner: {len(train)} train / {len(dev)} dev sentences, tags {' '.join(tags)}, {n_params / 1e6:.1f}M "
              f"parameters, {max_iters} steps of {global_batch} sentences ({world} process(es)), backend "
              f"{cfg.backend}" + (f", resuming from {resume_path}" if resume_path else ""))

    def evaluate(step):
        predicted, done = [], 0
        for batch in glue.glue_batches(dev_enc, dev_enc["labels"], 64):  # in order, unshuffled
            logits = E.predict(model, {k: v for k, v in batch.items() if k != "labels"})["logits"]
            for row in logits:
                predicted.append(ner.word_tags(row, dev_enc["word_starts"][done], tags))
                done += 1
        return {f"dev_{k}": v for k, v in ner.entity_scores([t for _, t in dev], predicted).items()}

    # --- training loop (nanobert/training.py: fit) ----------------------------------------
    run = fit(cfg, E, model, opt, loader, max_iters, warmup_iters, evaluate, "dev_f1", rank, world,
              resume=checkpoint.load(resume_path) if resume_path else None, tokenizer=hub.resolve(cfg.init))
    if rank == 0:
        print(f"best dev entity F1 {run['best']:.2f} (model in {os.path.join(cfg.out_dir, 'best')}); "
              f"training {run['train_s']:.0f} s, {run['tokens'] / max(run['train_s'], 1e-9):.0f} tokens/s, "
              f"peak RSS {peak_rss_mb():.0f} MiB")
        save_run_record(cfg, run)


def predict(cfg, models, E):
    """Print each entity the model in --init finds in the text: type, then its words."""
    path = hub.resolve(cfg.init)
    model = models.BertForTokenClassification.from_pretrained(path)
    tokenizer = load_tokenizer(path)
    words = [w for w, _ in tokenizer.pre_tokenizer.pre_tokenize_str(cfg.predict)]  # BERT's split: spaces, punctuation
    enc = ner.encode_ner(tokenizer, [(words, None)], {}, cfg.max_length)
    batch = next(glue.glue_batches(enc, enc["labels"], 1))
    logits = E.predict(model, {k: v for k, v in batch.items() if k != "labels"})["logits"][0]
    id2label = model.config.id2label or {i: f"LABEL_{i}" for i in range(model.config.num_labels)}
    tags = ner.word_tags(logits, enc["word_starts"][0], id2label)
    for kind, first, last in sorted(ner.entities(tags), key=lambda e: e[1]):
        print(f"{kind}\t{' '.join(words[first:last + 1])}")


if __name__ == "__main__":
    main_guard(main)
