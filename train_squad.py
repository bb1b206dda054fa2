"""Fine-tune BERT for extractive question answering (SQuAD v1.1), torch or MLX, and answer questions.

    python train_squad.py --backend mlx          # shipped SQuAD excerpt, all-MiniLM-L6-v2: train, evaluate, demo
    python train_squad.py --lora 8               # LoRA: train adapters (rank 8) + QA head only
    python train_squad.py --train_data ../shared/data/squad/v1.1/dev-v1.1.json --train_articles 0:24 \\
        --eval_data ../shared/data/squad/v1.1/dev-v1.1.json --eval_articles 24:48 --out_dir out/squad_dev
    torchrun --nproc_per_node 2 train_squad.py   # DDP (MLX: mlx.launch -n 2 --backend ring -- python ...)
    python train_squad.py --predict --init out/squad/best --question "Who?" --context "..."
    python train_squad.py --predict --init out/squad/best --questions_file questions.json

Settings are the DEFAULTS below; override them with --config FILE.ini and/or --key=value.
Phases: settings -> data -> model (+ LoRA) -> optimizer -> loop (evaluate, checkpoint) -> save -> demo.
"""

import json
import math
import os
import sys
import time

import numpy as np
from tqdm import tqdm

from nanobert import checkpoint, hub, squad
from nanobert.tokenizer import load_tokenizer
from nanobert.training import (EpochLoader, SettingsError, batch_indices, check_schedule, configure, fit, load_backend,
                               main_guard, peak_rss_mb, save_run_record)
from nanobert.weights import ADAPTER_NAME

DEFAULTS = dict(
    backend="torch",              # torch | mlx
    init="all-MiniLM-L6-v2",      # encoder to start from (checkpoint dir, packaged name, hub id); --predict: the QA model
    train_data="data/squad/train.json",
    eval_data="data/squad/eval.json",
    train_articles="",            # a slice of the train file's articles, e.g. 0:24 (default: all)
    eval_articles="",
    out_dir="out/squad",
    max_length=384,
    doc_stride=128,
    batch_size=16,                # windows per micro-step per process
    grad_accum=1,
    bucket=True,                  # length-bucketed batches (as HF's group_by_length): ~2x less padding
    epochs=2.0,
    max_steps=0,                  # stop after this many optimizer steps (0: run all epochs)
    lr=1e-4,
    min_lr=0.0,
    decay="cosine",               # after warmup: "cosine" (nanoGPT) or "linear" (HF Trainer's default)
    warmup=0.1,                   # warmup steps: a fraction of all steps if < 1, else a count
    weight_decay=0.01,
    grad_clip=1.0,
    eval_every=0,                 # optimizer steps between evaluations (0: each epoch's end)
    eval_batch_size=32,
    report_every=1000,            # also report EM/F1 in batches of this many questions (0: off)
    n_best=20,
    max_answer_length=30,
    log_every=10,
    report_to="none",             # or "tensorboard" (pip install tensorboard): scalars in out_dir/tensorboard
    save_every=0,                 # optimizer steps between extra checkpoints (resume points; 0: none)
    max_checkpoints=2,
    resume="",                    # bare --resume: latest checkpoint in out_dir; or a checkpoint path
    seed=0,
    lora=0,                       # LoRA rank (0: full fine-tuning)
    lora_alpha=16.0,
    lora_targets="query,value",   # Linears of each layer: query,key,value,attention.output.dense,intermediate.dense,output.dense
    eval_only=False,              # evaluate --init on eval_data, no training
    predict=False,                # answer --question/--context (or --questions_file) with --init
    question="",
    context="",
    questions_file="",            # JSON list of {"question", "context"} (or JSON lines)
)
DEMO_CONTEXT = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is "
                "named after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 "
                "to 1889 as the entrance arch to the 1889 World's Fair.")
DEMO_QUESTION = "When was the Eiffel Tower built?"


def main():
    cfg = configure(DEFAULTS, sys.argv[1:], __doc__)
    models, E = load_backend(cfg.backend)
    if cfg.predict:
        model, tokenizer = load_qa_model(models, cfg.init)
        return print_answers(cfg, E, model, tokenizer, read_questions(cfg))
    rank, world = E.init_distributed()
    master = rank == 0

    # --- data ---------------------------------------------------------------------------
    resume_path = checkpoint.resolve_resume(cfg.resume, cfg.out_dir)
    tokenizer = load_tokenizer(hub.resolve(cfg.init))
    eval_examples = read_examples(cfg.eval_data, cfg.eval_articles, "eval_articles", master)
    eval_windows = squad.squad_windows(eval_examples, tokenizer, cfg.max_length, cfg.doc_stride, train=False)

    def evaluate(step):
        """EM/F1 of the current model on eval_data (predict every window, best span per question)."""
        t0 = time.time()
        start, end = predict_windows(E, model, eval_windows, cfg.eval_batch_size)
        answers = {qid: text for qid, (text, _) in squad.postprocess_qa(
            eval_examples, eval_windows, start, end, cfg.n_best, cfg.max_answer_length).items()}
        squad.write_predictions(os.path.join(cfg.out_dir, "predictions.json"), answers)
        if cfg.report_every and len(eval_examples) > cfg.report_every:
            for i in range(0, len(eval_examples), cfg.report_every):
                part = squad.squad_em_f1(answers, eval_examples[i:i + cfg.report_every])
                tqdm.write(f"  questions {i}-{i + len(eval_examples[i:i + cfg.report_every]) - 1}: "
                           f"EM {part['exact_match']:.2f}  F1 {part['f1']:.2f}")
        tqdm.write(f"  evaluated {len(eval_examples)} questions ({len(eval_windows['input_ids'])} windows) "
                   f"in {time.time() - t0:.0f} s")
        return {f"eval_{k}": v for k, v in squad.squad_em_f1(answers, eval_examples).items()}

    if cfg.eval_only:
        model, _ = load_qa_model(models, cfg.init)
        print(json.dumps(evaluate(0)))
        return
    train_examples = read_examples(cfg.train_data, cfg.train_articles, "train_articles", master)
    train = squad.squad_windows(train_examples, tokenizer, cfg.max_length, cfg.doc_stride, train=True)
    n_windows = len(train["input_ids"])
    global_batch = cfg.batch_size * cfg.grad_accum * world
    steps_per_epoch = math.ceil(n_windows / global_batch)
    max_iters = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
    warmup_iters = round(cfg.warmup * max_iters) if cfg.warmup < 1 else int(cfg.warmup)
    check_schedule(cfg.lr, cfg.min_lr, warmup_iters, max_iters, cfg.decay)
    keys = ("input_ids", "token_type_ids", "attention_mask", "start_positions", "end_positions")

    def epoch_batches(epoch, start):
        # The order of an epoch is a function of (seed, epoch) only: a resumed run sees the same batches.
        rng = np.random.default_rng([cfg.seed, epoch])
        for idx in batch_indices(train["lengths"], global_batch, rng, cfg.bucket)[start:]:
            yield {k: train[k][idx] for k in keys}

    # --- model (+ LoRA) + optimizer -------------------------------------------------------
    resume = checkpoint.load(resume_path) if resume_path else None
    E.seed(cfg.seed)
    if cfg.lora:  # base weights from --init, then adapters (from the checkpoint when resuming)
        model = models.BertForQuestionAnswering.from_pretrained(hub.resolve(cfg.init))
        models.apply_lora(model, cfg.lora, cfg.lora_alpha, lora_targets(cfg))
        if resume:
            model.load_numpy(resume.model)
    else:
        model = models.BertForQuestionAnswering.from_pretrained(resume_path or hub.resolve(cfg.init))
    E.prepare(model)
    opt = E.AdamW(model, weight_decay=cfg.weight_decay)
    trainable = sum(v.size for v in model.state_numpy(trainable_only=True).values())
    total = sum(v.size for v in model.state_numpy().values())
    if master:
        print(f"SQuAD: {len(train_examples)} train questions -> {n_windows} windows, {len(eval_examples)} eval "
              f"questions -> {len(eval_windows['input_ids'])} windows; {max_iters} steps of {global_batch} windows "
              f"({world} process(es)), backend {cfg.backend}; trainable parameters {trainable:,} of {total:,}"
              + (f"; resuming from {resume_path}" if resume_path else ""))

    # --- training loop (nanobert/training.py: fit) ----------------------------------------
    run = fit(cfg, E, model, opt, EpochLoader(epoch_batches, steps_per_epoch), max_iters, warmup_iters, evaluate,
              "eval_f1", rank, world, resume=resume, tokenizer=hub.resolve(cfg.init),
              model_state=(lambda: model.state_numpy(trainable_only=True)) if cfg.lora else None,
              extra_state={"lora": lora_settings(cfg)} if cfg.lora else None, adapter=bool(cfg.lora))
    if not master:
        return

    # --- save + report ------------------------------------------------------------------------
    best_dir = os.path.join(cfg.out_dir, "best")
    saved = os.path.join(best_dir, ADAPTER_NAME if cfg.lora else "model.safetensors")
    print(f"best eval F1 {run['best']:.2f} (model in {best_dir}); training {run['train_s']:.0f} s for "
          f"{run['steps']} steps ({run['train_s'] / max(run['steps'], 1):.2f} s/step, "
          f"{run['tokens'] / max(run['train_s'], 1e-9):.0f} tokens/s); trainable parameters {trainable:,}; "
          f"saved {os.path.getsize(saved) / 2**20:.1f} MiB; peak RSS {peak_rss_mb():.0f} MiB")
    save_run_record(cfg, run, trainable_parameters=trainable, saved_mib=round(os.path.getsize(saved) / 2**20, 2))
    model, tokenizer = load_qa_model(models, best_dir)
    if cfg.lora:  # fold the adapters into the base weights: a plain BERT checkpoint again
        models.merge_lora(model).save_pretrained(os.path.join(cfg.out_dir, "merged"))
        print(f"merged LoRA weights into {os.path.join(cfg.out_dir, 'merged')}")
    print_answers(cfg, E, model, tokenizer, [squad.SquadExample("demo", "", DEMO_CONTEXT, DEMO_QUESTION, (), ())])


def read_examples(path, articles, setting, verbose):
    """SQuAD examples of `path` (a slice "a:b" of its articles); skipped questions are reported."""
    try:
        selected = slice(*[int(x) if x else None for x in articles.split(":")]) if articles else None
    except (TypeError, ValueError):
        raise SettingsError(f"setting '{setting}' must be a slice of articles like 0:24, got {articles!r}") from None
    examples, skipped = squad.load_squad(path, selected)
    if verbose:
        for reason, ids in skipped.items():
            print(f"{path}: skipped {len(ids)} question(s): {reason} (ids {', '.join(ids[:3])}"
                  f"{' ...' if len(ids) > 3 else ''})", file=sys.stderr)
    return examples


def predict_windows(E, model, windows, batch_size):
    """Start/end logits (N, max_length) of every window. Windows are run shortest first, so
    each batch pads only to its own longest window; columns past a window's end are -inf."""
    n, max_length = windows["input_ids"].shape
    start, end = np.full((n, max_length), -np.inf, np.float32), np.full((n, max_length), -np.inf, np.float32)
    order = np.argsort(windows["lengths"], kind="stable")
    for i in tqdm(range(0, n, batch_size), desc="eval", leave=False, disable=None):
        idx = order[i:i + batch_size]
        T = int(windows["lengths"][idx].max())
        out = E.predict(model, {k: windows[k][idx, :T] for k in ("input_ids", "token_type_ids", "attention_mask")})
        start[idx, :T], end[idx, :T] = out["start_logits"], out["end_logits"]
    return start, end


def lora_targets(cfg):
    return [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]


def lora_settings(cfg):
    return {"r": cfg.lora, "alpha": cfg.lora_alpha, "targets": lora_targets(cfg),
            "base": os.path.abspath(hub.resolve(cfg.init))}


def load_qa_model(models, path):
    """(model, tokenizer) from a QA checkpoint: a full model, or a LoRA adapter checkpoint
    (adapter.safetensors + the base model it was trained on, named in its state.json)."""
    path = hub.resolve(path)
    if os.path.exists(os.path.join(path, ADAPTER_NAME)):
        ckpt = checkpoint.load(path)
        lora = ckpt.state["lora"]
        model = models.BertForQuestionAnswering.from_pretrained(lora["base"])
        models.apply_lora(model, lora["r"], lora["alpha"], lora["targets"])
        model.load_numpy(ckpt.model)
    else:
        model = models.BertForQuestionAnswering.from_pretrained(path)
    return model, load_tokenizer(path)


def read_questions(cfg):
    """SquadExamples (no answers) from --question/--context or --questions_file."""
    if cfg.questions_file:
        with open(cfg.questions_file, encoding="utf-8") as f:
            text = f.read()
        try:
            if text.lstrip().startswith("["):
                rows = json.loads(text)
            else:  # JSON lines
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg.questions_file}: not JSON or JSON lines ({e})") from None
    else:
        rows = [{"question": cfg.question, "context": cfg.context}]
    examples = []
    for i, row in enumerate(rows):
        if not (isinstance(row, dict) and str(row.get("question", "")).strip() and str(row.get("context", "")).strip()):
            raise ValueError(f"{cfg.questions_file or 'command line'}: question {i} needs a non-empty "
                             "'question' and 'context'")
        examples.append(squad.SquadExample(str(row.get("id", i)), "", row["context"], row["question"], (), ()))
    return examples


def print_answers(cfg, E, model, tokenizer, examples):
    windows = squad.squad_windows(examples, tokenizer, cfg.max_length, cfg.doc_stride, train=False)
    start, end = predict_windows(E, model, windows, cfg.eval_batch_size)
    answers = squad.postprocess_qa(examples, windows, start, end, cfg.n_best, cfg.max_answer_length)
    for ex in examples:
        text, score = answers[ex.id]
        print(f"Q: {ex.question}\nA: {text}\t(score {score:.2f})")


if __name__ == "__main__":
    main_guard(main)
