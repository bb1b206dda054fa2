"""Yardstick: train_ner.py's recipe with HF `BertForTokenClassification` + `Trainer` (as run_ner).

    python yardstick/hf_ner.py --seed 0 --out_dir out/ner_hf_s0      # data/ner, all-MiniLM-L6-v2

Same files, same tags, same alignment (each word's tag on its first WordPiece, the rest -100:
HF's fast tokenizer with is_split_into_words, as run_ner), same batch size, learning rate,
warmup, weight decay, clipping and epochs; HF's own AdamW, linear decay, data order, head
initialisation and dropout. Scored with nanobert.ner.entity_scores (conlleval's counting, as
seqeval's). Writes out_dir/run.json like the training scripts, so `python -m nanobert.report
add out_dir ner` files it (as impl "hf").
"""

import os
import sys
import time

import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_ner  # noqa: E402
from nanobert import hub, ner  # noqa: E402
from nanobert.training import configure, peak_rss_mb, run_info, save_run_record  # noqa: E402


def encode(tokenizer, sentences, label2id, max_length):
    """run_ner's tokenize_and_align_labels (label_all_tokens=False) -> (rows for the Trainer,
    each sentence's first-WordPiece position per word, -1 for a word cut off)."""
    rows, starts = [], []
    for words, tags in sentences:
        enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
        labels, previous, first = [], None, np.full(len(words), -1)
        for position, word in enumerate(enc.word_ids()):
            labels.append(-100 if word is None or word == previous else label2id[tags[word]])
            if word is not None and word != previous:
                first[word] = position
            previous = word
        rows.append({**enc, "labels": labels})
        starts.append(first)
    return rows, starts


def main():
    cfg = configure(train_ner.DEFAULTS, sys.argv[1:], __doc__)
    info = run_info()
    transformers.set_seed(cfg.seed)
    train = ner.read_conll(os.path.join(cfg.data, "train.txt"))
    dev = ner.read_conll(os.path.join(cfg.data, "dev.txt"))
    tags = ner.tag_names(train)
    label2id = {t: i for i, t in enumerate(tags)}
    path = hub.resolve(cfg.init)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.BertForTokenClassification.from_pretrained(
        path, num_labels=len(tags), id2label=dict(enumerate(tags)), label2id=label2id)
    # warmup_steps < 1 is a fraction of all steps in transformers 5 (warmup_ratio is gone)
    args = transformers.TrainingArguments(
        output_dir=cfg.out_dir, per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=64,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup, num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1, max_grad_norm=cfg.grad_clip, lr_scheduler_type="linear", seed=cfg.seed,
        logging_steps=cfg.log_every, save_strategy="no", eval_strategy="no", report_to=[],
        use_cpu=not torch.cuda.is_available())
    train_rows, _ = encode(tokenizer, train, label2id, cfg.max_length)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train_rows,
                                   data_collator=transformers.DataCollatorForTokenClassification(tokenizer))
    t0 = time.time()
    result = trainer.train()
    train_s = time.time() - t0
    dev_rows, dev_starts = encode(tokenizer, dev, label2id, cfg.max_length)
    logits = trainer.predict(dev_rows).predictions  # (N, T_max, tags), padded with -100
    predicted = [ner.word_tags(row, starts, tags) for row, starts in zip(logits, dev_starts)]
    metrics = {f"dev_{k}": v for k, v in ner.entity_scores([t for _, t in dev], predicted).items()}
    print(f"HF: dev entity F1 {metrics['dev_f1']:.2f} (precision {metrics['dev_precision']:.2f}, recall "
          f"{metrics['dev_recall']:.2f}); training {train_s:.0f} s, peak RSS {peak_rss_mb():.0f} MiB")
    tokens = round(cfg.epochs * sum(len(r["input_ids"]) for r in train_rows))
    run = {"info": info, "train_s": train_s, "tokens": tokens, "steps": result.global_step, "metrics": metrics}
    cfg.backend = "hf"  # the record's impl (nanobert.report add reads settings.backend)
    save_run_record(cfg, run)


if __name__ == "__main__":
    main()
