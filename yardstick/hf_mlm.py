"""Yardstick: the train_mlm.py run, with HF `BertForMaskedLM` + `torch.optim.AdamW` doing the learning.

Same shards, same masks (train_mlm.MLMBatches, same seed), same initial weights (our init,
saved in the shared format and opened by HF), same schedule (HF's cosine-with-min-lr, which
nanobert's cosine_lr equals), same clipping, same evaluation. Only the model and optimizer
are HF's / torch's: HF decodes every position (the dense MLM head).

    python yardstick/hf_mlm.py --config configs/mlm_wikitext2.ini --out_dir out/mlm_wt2_hf

Takes train_mlm.py's settings (run train_mlm.py once first: it prepares data_dir). Writes
out_dir/run.json, the record `python -m nanobert.report add OUT_DIR mlm-wt2` files (impl "hf").
"""

import os
import sys
import tempfile
import time

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_mlm  # noqa: E402
from nanobert import mlm_data  # noqa: E402
from nanobert.config import BertConfig  # noqa: E402
from nanobert.model_torch import BertForMaskedLM  # noqa: E402
from nanobert.tokenizer import load_tokenizer, special_ids  # noqa: E402
from nanobert.training import MetricsLog, configure, run_info, save_run_record, step_seed  # noqa: E402


def main():
    cfg = configure(train_mlm.DEFAULTS, sys.argv[1:], __doc__)
    info = run_info()
    tokenizer = load_tokenizer(cfg.data_dir)
    specials, vocab_size = special_ids(tokenizer), tokenizer.get_vocab_size()
    summary = mlm_data.prepare(input=cfg.input, out_dir=cfg.data_dir, vocab=cfg.vocab or None, vocab_size=cfg.vocab_size,
                               max_len=cfg.max_len, builder=cfg.builder, val_fraction=cfg.val_fraction,
                               test_fraction=cfg.test_fraction, test_input=cfg.test_input or None, seed=cfg.seed)
    stream = mlm_data.ShardStream(os.path.join(cfg.data_dir, "train-*.msgpack"), seed=cfg.seed,
                                  expect_vocab_hash=summary["vocab_sha256"])
    continuation = mlm_data.continuation_ids(tokenizer) if cfg.whole_word_mask else None
    loader = train_mlm.MLMBatches(stream, cfg.batch_size * cfg.grad_accum, specials, vocab_size, cfg.mlm_prob, cfg.seed,
                                  1, continuation)
    val_batches = train_mlm.heldout_batches(cfg, "val", specials, vocab_size, summary["vocab_sha256"], continuation)
    test_batches = train_mlm.heldout_batches(cfg, "test", specials, vocab_size, summary["vocab_sha256"], continuation)

    # the same initial weights as train_mlm.py (seeded init of the torch twin), through the shared format
    torch.manual_seed(cfg.seed)
    config = BertConfig(vocab_size=vocab_size, pad_token_id=specials["pad"],
                        **{k: getattr(cfg, k) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                                        "intermediate_size", "max_position_embeddings",
                                                        "hidden_dropout_prob", "attention_probs_dropout_prob")})
    init_dir = tempfile.mkdtemp()
    BertForMaskedLM(config).init_weights().save_pretrained(init_dir)
    model = transformers.BertForMaskedLM.from_pretrained(init_dir, attn_implementation="sdpa")
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    warmup = round(cfg.warmup * cfg.max_steps) if cfg.warmup < 1 else int(cfg.warmup)
    sched = transformers.get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, cfg.max_steps, min_lr=cfg.min_lr)
    log = MetricsLog(cfg.out_dir)

    def evaluate(batches, prefix):
        model.eval()
        loss_sum = correct = total = 0
        with torch.no_grad():
            for b in batches:
                out = model(**{k: torch.from_numpy(b[k]).long() for k in ("input_ids", "attention_mask", "labels")})
                keep = b["labels"] != -100
                n = int(keep.sum())
                loss_sum, total = loss_sum + out.loss.item() * n, total + n
                correct += int((out.logits.argmax(-1).numpy()[keep] == b["labels"][keep]).sum())
        model.train()
        return {f"{prefix}_loss": loss_sum / total, f"{prefix}_accuracy": 100.0 * correct / total}

    train_s, tokens, best = 0.0, 0, 0.0
    model.train()
    for step in range(cfg.max_steps):
        t0 = time.time()
        batch = loader.next()
        torch.manual_seed(step_seed(cfg.seed, step, 0))
        out = model(**{k: torch.from_numpy(batch[k]).long() for k in ("input_ids", "attention_mask", "labels")})
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        train_s += time.time() - t0
        tokens += int(batch["attention_mask"].sum())
        if (step + 1) % cfg.log_every == 0:
            log.log(step + 1, loss=out.loss.item(), grad_norm=grad_norm, tokens_per_s=tokens / train_s)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps:
            metrics = evaluate(val_batches, "val")
            best = max(best, metrics["val_accuracy"])
            log.log(step + 1, **metrics)
            print(f"step {step + 1}: " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)
    final = evaluate(test_batches, "test") if test_batches else {}
    print(f"HF BertForMaskedLM: best validation accuracy {best:.2f}%"
          + "".join(f"; final {k} {v:.4g}" for k, v in final.items())
          + f"; training {train_s:.0f} s, {tokens / train_s:.0f} tokens/s")
    cfg.backend = "hf"  # the record's impl (nanobert.report add reads settings.backend)
    save_run_record(cfg, {"info": info, "train_s": train_s, "tokens": tokens, "steps": cfg.max_steps, "metrics": {}},
                    best_val_accuracy=best, **final)


if __name__ == "__main__":
    main()
