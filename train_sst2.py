"""Fine-tune BERT for sentence / sentence-pair classification (GLUE SST-2, MRPC), torch or MLX.

    python train_sst2.py                                   # shipped SST-2 excerpt, all-MiniLM-L6-v2
    python train_sst2.py --backend mlx --task mrpc --data ../shared/data/glue/MRPC --epochs 3
    torchrun --nproc_per_node 2 train_sst2.py              # DDP, torch
    mlx.launch -n 2 --backend ring -- python train_sst2.py --backend mlx
    python train_sst2.py --predict "a gorgeous, witty film" --init out/sst2/best
    python train_sst2.py --task mrpc --predict "He left." --pair "He went away." --init out/mrpc/best

Settings are the DEFAULTS below; override them with --config FILE.ini and/or --key=value.
Phases: settings -> data -> model -> optimizer -> loop (evaluate, checkpoint) -> save.
"""

import math
import os
import sys
import time

import numpy as np
from tqdm import tqdm

from nanobert import checkpoint, glue, hub
from nanobert.tokenizer import load_tokenizer
from nanobert.training import (MetricsLog, check_schedule, configure, cosine_lr, load_backend, main_guard,
                               micro_batches, peak_rss_mb, step_seed)

DEFAULTS = dict(
    backend="torch",            # torch | mlx
    task="sst2",                # sst2 | mrpc
    data="data/sst2",           # directory with train.tsv + dev.tsv, or a `datasets` name ("glue") when online
    init="all-MiniLM-L6-v2",    # encoder to start from: checkpoint dir, packaged name, or hub id
    out_dir="out/sst2",
    max_length=128,
    batch_size=32,              # examples per micro-step per process
    grad_accum=1,               # micro-steps per optimizer step
    epochs=1.0,
    max_steps=0,                # stop after this many optimizer steps (0: run all epochs)
    lr=5e-5,
    min_lr=0.0,
    warmup=0.1,                 # warmup steps: a fraction of all steps if < 1, else a count
    weight_decay=0.01,
    grad_clip=1.0,
    bucket=False,               # length-bucketed batches: less padding, less random batches
    pad_to=0,                   # 0: pad each batch to its longest example; else to this length
    eval_every=0,               # optimizer steps between dev evaluations (0: each epoch's end)
    log_every=20,
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
    master = rank == 0

    # --- data ---------------------------------------------------------------------------
    resume_path = checkpoint.resolve_resume(cfg.resume, cfg.out_dir)
    tokenizer = load_tokenizer(resume_path or hub.resolve(cfg.init))
    train, dev = glue.load_task(cfg.task, cfg.data, "train"), glue.load_task(cfg.task, cfg.data, "dev")
    train_enc, dev_enc = glue.encode_glue(tokenizer, train, cfg.max_length), glue.encode_glue(tokenizer, dev, cfg.max_length)
    train_labels, dev_labels = np.array([y for *_, y in train]), np.array([y for *_, y in dev])
    global_batch = cfg.batch_size * cfg.grad_accum * world
    steps_per_epoch = math.ceil(len(train) / global_batch)
    max_iters = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
    warmup_iters = round(cfg.warmup * max_iters) if cfg.warmup < 1 else int(cfg.warmup)
    check_schedule(cfg.lr, cfg.min_lr, warmup_iters, max_iters)

    def epoch_batches(epoch, start):
        # The order is a function of (seed, epoch) only: a resumed run sees the same batches.
        return glue.glue_batches(train_enc, train_labels, global_batch, rng=np.random.default_rng([cfg.seed, epoch]),
                                 pad_to=cfg.pad_to or None, bucket=cfg.bucket, start=start)

    # --- model + optimizer ----------------------------------------------------------------
    model = models.BertForSequenceClassification.from_pretrained(resume_path or hub.resolve(cfg.init), num_labels=2)
    E.prepare(model)
    opt = E.AdamW(model, weight_decay=cfg.weight_decay)
    step, epoch, batch_in_epoch, best = 0, 0, 0, None
    if resume_path:
        ckpt = checkpoint.load(resume_path)
        opt.load_numpy(ckpt.optimizer)
        step, best = ckpt.state["step"], ckpt.state["best"]
        epoch, batch_in_epoch = ckpt.state["data"]["epoch"], ckpt.state["data"]["batch"]
    log = MetricsLog(cfg.out_dir, resume_step=step if resume_path else None, enabled=master)
    if master:
        n_params = sum(v.size for v in model.state_numpy().values())
        print(f"{cfg.task}: {len(train)} train / {len(dev)} dev examples, {n_params / 1e6:.1f}M parameters, "
              f"{max_iters} steps of {global_batch} examples ({world} process(es)), backend {cfg.backend}"
              + (f", resuming from {resume_path}" if resume_path else ""))

    def evaluate():
        preds = []
        for batch in glue.glue_batches(dev_enc, dev_labels, 64, pad_to=cfg.pad_to or None):
            preds.append(E.predict(model, {k: v for k, v in batch.items() if k != "labels"})["logits"].argmax(-1))
        preds = np.concatenate(preds)
        return {"accuracy": glue.accuracy(preds, dev_labels), "f1": glue.binary_f1(preds, dev_labels)}

    # --- training loop --------------------------------------------------------------------
    batches = None
    tokens, t_log = 0, time.time()
    bar = tqdm(total=max_iters, initial=step, disable=not master or None, desc="train")
    while step < max_iters:
        if batch_in_epoch == steps_per_epoch:
            epoch, batch_in_epoch, batches = epoch + 1, 0, None
        if batches is None:
            batches = epoch_batches(epoch, batch_in_epoch)
        batch = next(batches)
        lr = cosine_lr(step, cfg.lr, warmup_iters, max_iters, cfg.min_lr)
        parts = micro_batches(batch, rank, world, cfg.grad_accum, trim=not cfg.pad_to)
        loss, grad_norm = E.train_step(model, opt, parts, lr, cfg.grad_clip, step_seed(cfg.seed, step, rank))
        step, batch_in_epoch = step + 1, batch_in_epoch + 1
        tokens += int(batch["attention_mask"].sum())
        bar.update()
        if step % cfg.log_every == 0 or step == max_iters:
            dt, t_log = time.time() - t_log, time.time()
            log.log(step, loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens / dt, epoch=epoch)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / dt:.0f}")
            tokens = 0
        end_of_epoch = batch_in_epoch == steps_per_epoch
        if end_of_epoch or step == max_iters or (cfg.eval_every and step % cfg.eval_every == 0):
            if master:
                metrics = evaluate()
                log.log(step, **{f"dev_{k}": v for k, v in metrics.items()})
                tqdm.write(f"step {step}: dev accuracy {metrics['accuracy']:.2f}  F1 {metrics['f1']:.2f}")
                score = metrics[glue.BEST_METRIC[cfg.task]]
                state = {"data": {"epoch": epoch, "batch": batch_in_epoch}, "metrics": metrics,
                         "settings": vars(cfg), "architectures": ["BertForSequenceClassification"]}
                if best is None or score > best:
                    best = score
                    checkpoint.save(cfg.out_dir, step, model.config, model.state_numpy(), None,
                                    {**state, "best": best}, name="best", tokenizer=hub.resolve(cfg.init))
                checkpoint.save(cfg.out_dir, step, model.config, model.state_numpy(), opt.state_numpy(),
                                {**state, "best": best}, cfg.max_checkpoints, tokenizer=hub.resolve(cfg.init))
            t_log = time.time()  # evaluation is not training time
    bar.close()
    if master:
        log.plot(os.path.join(cfg.out_dir, "metrics.png"),
                 [("train loss", ["loss"]), ("dev", ["dev_accuracy", "dev_f1"]), ("learning rate", ["lr"])])
        print(f"best dev {glue.BEST_METRIC[cfg.task]} {best:.2f}; model in {os.path.join(cfg.out_dir, 'best')}; "
              f"peak RSS {peak_rss_mb():.0f} MiB")


def predict(cfg, models, E):
    """Print the label and probability of one sentence (or a pair) with the model in --init."""
    path = hub.resolve(cfg.init)
    model = models.BertForSequenceClassification.from_pretrained(path)
    example = [(cfg.predict, cfg.pair or None, 0)]
    enc = glue.encode_glue(load_tokenizer(path), example, cfg.max_length)
    batch = next(glue.glue_batches(enc, [0], 1))
    logits = E.predict(model, {k: v for k, v in batch.items() if k != "labels"})["logits"][0]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    label = int(probs.argmax())
    print(f"{glue.LABEL_NAMES[cfg.task][label]}\t{probs[label]:.4f}")


if __name__ == "__main__":
    main_guard(main)
