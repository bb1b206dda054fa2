"""Fine-tune BERT for sentence / sentence-pair classification (GLUE SST-2, MRPC, or your own
CSV / TSV / JSONL files: any number of classes, or a regression target), torch or MLX.

    python train_sst2.py                                   # shipped SST-2 excerpt, all-MiniLM-L6-v2
    python train_sst2.py --backend mlx --task mrpc --data ../shared/data/glue/MRPC --epochs 3
    torchrun --nproc_per_node 2 train_sst2.py              # DDP, torch
    mlx.launch -n 2 --backend ring -- python train_sst2.py --backend mlx
    python train_sst2.py --predict "a gorgeous, witty film" --init out/sst2/best
    python train_sst2.py --task mrpc --predict "He left." --pair "He went away." --init out/mrpc/best
    python train_sst2.py --task custom --data my_data --text_column review --label_column stars
    python train_sst2.py --task custom --data my_sts --text_column a --text_pair_column b --regression true

Settings are the DEFAULTS below; override them with --config FILE.ini and/or --key=value.
Phases: settings -> data -> model -> optimizer -> loop (evaluate, checkpoint) -> save.
"""

import math
import os
import sys

import numpy as np

from nanobert import checkpoint, glue, hub
from nanobert.tokenizer import load_tokenizer
from nanobert.training import (EpochLoader, check_schedule, configure, fit, load_backend, main_guard, peak_rss_mb,
                               save_run_record)

DEFAULTS = dict(
    backend="torch",            # torch | mlx
    task="sst2",                # sst2 | mrpc | custom (your own files, the columns named below)
    data="data/sst2",           # directory with train.tsv + dev.tsv, or a `datasets` name ("glue") when online;
                                # custom: train + dev as .csv, .tsv or .jsonl
    text_column="text",         # custom: the text's column (CSV/TSV header name, JSONL key)
    text_pair_column="",        # custom: a second text's column, for sentence pairs
    label_column="label",       # custom: the label's column: class names (any number) or numbers
    regression=False,           # custom: the label is a number to predict (MSE loss; Pearson, Spearman)
    init="all-MiniLM-L6-v2",    # encoder to start from: checkpoint dir, packaged name, or hub id
    out_dir="out/sst2",
    max_length=128,
    batch_size=32,              # examples per micro-step per process
    grad_accum=1,               # micro-steps per optimizer step
    epochs=1.0,
    max_steps=0,                # stop after this many optimizer steps (0: run all epochs)
    lr=5e-5,
    min_lr=0.0,
    decay="cosine",             # after warmup: "cosine" (nanoGPT) or "linear" (HF Trainer's default)
    warmup=0.1,                 # warmup steps: a fraction of all steps if < 1, else a count
    weight_decay=0.01,
    grad_clip=1.0,
    bucket=True,                # length-bucketed batches (as HF's group_by_length): less padding, less random
    pad_to=0,                   # 0: pad each batch to its longest example; else to this length
    eval_every=0,               # optimizer steps between dev evaluations (0: each epoch's end)
    log_every=20,
    report_to="none",           # or "tensorboard" (pip install tensorboard): scalars in out_dir/tensorboard
    save_every=0,               # optimizer steps between extra checkpoints (resume points; 0: none)
    max_checkpoints=2,
    resume="",                  # bare --resume: latest checkpoint in out_dir; or a checkpoint path
    seed=0,
    predict="",                 # classify this text with the model in --init, then exit
    pair="",                    # second sentence for --predict (MRPC)
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
    train, dev, train_labels, dev_labels, names = load_data(cfg)
    train_enc, dev_enc = glue.encode_glue(tokenizer, train, cfg.max_length), glue.encode_glue(tokenizer, dev, cfg.max_length)
    global_batch = cfg.batch_size * cfg.grad_accum * world
    steps_per_epoch = math.ceil(len(train) / global_batch)
    max_iters = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
    warmup_iters = round(cfg.warmup * max_iters) if cfg.warmup < 1 else int(cfg.warmup)
    check_schedule(cfg.lr, cfg.min_lr, warmup_iters, max_iters, cfg.decay)
    # The order of an epoch is a function of (seed, epoch) only: a resumed run sees the same batches.
    loader = EpochLoader(lambda epoch, start: glue.glue_batches(
        train_enc, train_labels, global_batch, rng=np.random.default_rng([cfg.seed, epoch]),
        pad_to=cfg.pad_to or None, bucket=cfg.bucket, start=start, pad_to_multiple_of=E.PAD_MULTIPLE), steps_per_epoch)

    # --- model + optimizer ----------------------------------------------------------------
    E.seed(cfg.seed)
    model = models.BertForSequenceClassification.from_pretrained(
        resume_path or hub.resolve(cfg.init), num_labels=len(names) if names else 1,
        id2label=dict(enumerate(names)) if names else None, problem_type="regression" if cfg.regression else None)
    E.prepare(model)
    opt = E.AdamW(model, weight_decay=cfg.weight_decay)
    if rank == 0:
        n_params = sum(v.size for v in model.state_numpy().values())
        print(f"{cfg.task}: {len(train)} train / {len(dev)} dev examples, {n_params / 1e6:.1f}M parameters, "
              f"{max_iters} steps of {global_batch} examples ({world} process(es)), backend {cfg.backend}"
              + (f", resuming from {resume_path}" if resume_path else ""))

    def evaluate(step):
        logits = np.concatenate([E.predict(model, {k: v for k, v in batch.items() if k != "labels"})["logits"]
                                 for batch in glue.glue_batches(dev_enc, dev_labels, 64, pad_to=cfg.pad_to or None)])
        return scores(logits, dev_labels, names)

    # --- training loop (nanobert/training.py: fit) ----------------------------------------
    best = glue.BEST_METRIC.get(cfg.task, "pearson" if cfg.regression else "accuracy")
    run = fit(cfg, E, model, opt, loader, max_iters, warmup_iters, evaluate, "dev_" + best,
               rank, world, resume=checkpoint.load(resume_path) if resume_path else None,
               tokenizer=hub.resolve(cfg.init), trim=not cfg.pad_to)
    if rank == 0:
        print(f"best dev {best} {run['best']:.2f} (model in {os.path.join(cfg.out_dir, 'best')}); "
              f"training {run['train_s']:.0f} s, {run['tokens'] / max(run['train_s'], 1e-9):.0f} tokens/s, "
              f"peak RSS {peak_rss_mb():.0f} MiB")
        save_run_record(cfg, run)


def load_data(cfg):
    """(train, dev examples, train labels, dev labels, class names or None for regression)."""
    if cfg.task != "custom":
        train, dev = glue.load_task(cfg.task, cfg.data, "train"), glue.load_task(cfg.task, cfg.data, "dev")
        labels = [np.array([y for *_, y in split]) for split in (train, dev)]
        return train, dev, *labels, list(glue.LABEL_NAMES[cfg.task])
    columns = (cfg.text_column, cfg.text_pair_column or None, cfg.label_column)
    train, dev = (glue.load_table(cfg.data, split, *columns) for split in ("train", "dev"))
    train_labels, names = glue.label_ids(train, cfg.regression, where=os.path.join(cfg.data, "train"))
    dev_labels, _ = glue.label_ids(dev, cfg.regression, names, where=os.path.join(cfg.data, "dev"))
    return train, dev, train_labels, dev_labels, names


def scores(logits, labels, names):
    """Dev metrics from logits (N, classes) or (N, 1) for regression (names None)."""
    if names is None:
        preds = logits[:, 0]
        return {"dev_pearson": glue.pearson(preds, labels), "dev_spearman": glue.spearman(preds, labels),
                "dev_mse": float(np.mean((preds - labels) ** 2))}
    preds = logits.argmax(-1)
    f1 = glue.binary_f1(preds, labels) if len(names) == 2 else glue.macro_f1(preds, labels, len(names))
    return {"dev_accuracy": glue.accuracy(preds, labels), "dev_f1" if len(names) == 2 else "dev_macro_f1": f1}


def predict(cfg, models, E):
    """Print the label and probability of one sentence (or a pair) with the model in --init
    (a regression model: its prediction)."""
    path = hub.resolve(cfg.init)
    model = models.BertForSequenceClassification.from_pretrained(path)
    example = [(cfg.predict, cfg.pair or None, 0)]
    enc = glue.encode_glue(load_tokenizer(path), example, cfg.max_length)
    batch = next(glue.glue_batches(enc, [0], 1))
    logits = E.predict(model, {k: v for k, v in batch.items() if k != "labels"})["logits"][0]
    if model.config.num_labels == 1:
        print(f"{logits[0]:.4f}")
        return
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    label = int(probs.argmax())
    id2label = model.config.id2label or dict(enumerate(glue.LABEL_NAMES.get(cfg.task, ())))  # saved, else GLUE's
    print(f"{id2label.get(label, f'LABEL_{label}')}\t{probs[label]:.4f}")


if __name__ == "__main__":
    main_guard(main)
