"""Check the evaluation chain: score a QA checkpoint with HF's code only.

The pre-processing, model (`transformers.BertForQuestionAnswering`), n-best post-processing
and EM/F1 of ../shared/yardstick/hf_squad.py (copied here, reformatted), on the
same split as configs/squad_dev_split.ini (eval: articles 24-47). If it prints the EM/F1
train_squad.py reported for the checkpoint, any gap to the HF yardstick is in the training.

    python yardstick/hf_squad_eval.py out/squad_dev_s1/best [../shared/data/squad/v1.1/dev-v1.1.json]
"""

import collections
import json
import re
import string
import sys
import time

import numpy as np
import torch
from transformers import AutoTokenizer, BertForQuestionAnswering

ckpt = sys.argv[1]
dev = sys.argv[2] if len(sys.argv) > 2 else "../shared/data/squad/v1.1/dev-v1.1.json"
rows = [dict(id=q["id"], context=p["context"], question=q["question"], answers=[a["text"] for a in q["answers"]])
        for art in json.load(open(dev))["data"][24:48] for p in art["paragraphs"] for q in p["qas"]]

tok = AutoTokenizer.from_pretrained(ckpt)
enc = tok([r["question"].lstrip() for r in rows], [r["context"] for r in rows], truncation="only_second",
          max_length=384, stride=128, return_overflowing_tokens=True, return_offsets_mapping=True,
          padding="max_length")
window_example = enc["overflow_to_sample_mapping"]
offsets = [[o if enc.sequence_ids(i)[k] == 1 else None for k, o in enumerate(enc["offset_mapping"][i])]
           for i in range(len(window_example))]

model = BertForQuestionAnswering.from_pretrained(ckpt).eval()
t0 = time.time()
starts, ends = [], []
with torch.inference_mode():
    for i in range(0, len(window_example), 32):
        out = model(**{k: torch.tensor(enc[k][i:i + 32]) for k in ("input_ids", "token_type_ids", "attention_mask")})
        starts.append(out.start_logits.numpy())
        ends.append(out.end_logits.numpy())
starts, ends = np.concatenate(starts), np.concatenate(ends)

windows = collections.defaultdict(list)
for i, ex in enumerate(window_example):
    windows[ex].append(i)
preds = {}
for ex, row in enumerate(rows):  # the yardstick's search: top 20 x top 20, best start + end logit
    best, best_score = "", -1e9
    for w in windows[ex]:
        sl, el, off = starts[w], ends[w], offsets[w]
        for s in np.argsort(sl)[-20:][::-1]:
            for e in np.argsort(el)[-20:][::-1]:
                if off[s] is None or off[e] is None or e < s or e - s + 1 > 30:
                    continue
                if sl[s] + el[e] > best_score:
                    best_score, best = sl[s] + el[e], row["context"][off[s][0]:off[e][1]]
    preds[row["id"]] = best


def norm(s):
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def f1(pred, gold):
    p, g = norm(pred).split(), norm(gold).split()
    same = sum((collections.Counter(p) & collections.Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


em = 100 * np.mean([max(float(norm(preds[r["id"]]) == norm(a)) for a in r["answers"]) for r in rows])
f = 100 * np.mean([max(f1(preds[r["id"]], a) for a in r["answers"]) for r in rows])
print(f"{ckpt}: EM {em:.2f}  F1 {f:.2f}  ({len(rows)} questions, {len(window_example)} windows, "
      f"{time.time() - t0:.0f} s)")
