"""The README's and docs' tables, rendered from the run records in results/.

Every figure in a table of README.md or docs/*.md comes from a JSON record under results/:
`runs/*.json` (a quality run: a training script's out_dir/run.json, plus the table row it
belongs to) and `bench/*.json` (a `bench.py --json` file). A table lives between two markers,

    <!-- table: NAME -->
    ...rendered, never edited by hand...
    <!-- /table -->

and `python -m nanobert.report` rewrites every such block from the records (`--check`:
change nothing, exit 1 naming each table that differs; tests/test_report.py runs it).
`python -m nanobert.report add OUT_DIR ROW` files a finished run's record under results/runs/.

A record made by a run of this code has a `commit`. Records of runs whose logs were not kept
(their figures copied from an earlier README or from ../shared/yardstick) have a `source`
saying where they come from instead; a table uses them only where no run record exists, and
marks them with a dagger.
"""

import argparse
import glob
import json
import os
import statistics
import sys

from nanobert.fileio import atomic_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "results")
DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
IMPLS = {"hf": "HF transformers", "torch": "nanobert torch", "mlx": "nanobert MLX"}

# Quality rows: name -> (what was run, [(metric, label)], the twins' command).
ROWS = {
    "squad-demo": ("`make demo`: SQuAD excerpt shipped in data/squad (357 train / 189 eval questions), 2 epochs",
                   [("eval_exact_match", "EM"), ("eval_f1", "F1")], "python train_squad.py"),
    "squad-split": ("SQuAD v1.1: train on dev articles 0-23 (5,871 windows), evaluate on 24-47 "
                    "(4,874 questions), 1 epoch", [("eval_exact_match", "EM"), ("eval_f1", "F1")],
                    "python train_squad.py --config configs/squad_dev_split.ini --seed S"),
    "squad-split-hf-time": ("SQuAD split as above, for HF's training time (2.25 epochs of a 2.75-epoch "
                            "cosine run)", [("eval_exact_match", "EM"), ("eval_f1", "F1")],
                            "python train_squad.py --config configs/squad_dev_split.ini --epochs 2.75"),
    "squad-split-lora8": ("SQuAD split, LoRA r 8 on query + value, lr 5e-4", [("eval_exact_match", "EM"),
                                                                              ("eval_f1", "F1")],
                          "python train_squad.py --config configs/squad_dev_split.ini --lora 8 --lr 5e-4"),
    "squad-split-lora16": ("SQuAD split, LoRA r 16 on all six Linears, lr 1e-3", [("eval_exact_match", "EM"),
                                                                                  ("eval_f1", "F1")],
                           "python train_squad.py --config configs/squad_dev_split.ini --lora 16 --lora_alpha 32 "
                           "--lr 1e-3 --lora_targets query,key,value,attention.output.dense,intermediate.dense,"
                           "output.dense"),
    "sst2": ("SST-2: full train set (67,349), 1 epoch", [("dev_accuracy", "acc")],
             "python train_sst2.py --config configs/sst2.ini --seed S"),
    "mrpc": ("MRPC (GLUE split), 3 epochs", [("dev_accuracy", "acc"), ("dev_f1", "F1")],
             "python train_sst2.py --config configs/mrpc.ini --seed S"),
    "ner": ("NER: the silver set in data/ner (WikiText-2 excerpt tagged by rule; 2,005 train / 767 dev "
            "sentences), 3 epochs", [("dev_f1", "entity F1"), ("dev_precision", "P"), ("dev_recall", "R")],
            "python train_ner.py --seed S"),
    "mlm-wt2": ("MLM from scratch: L2 H128 on WikiText-2 valid (214K tokens), 2,000 steps; WikiText-2 test",
                [("test_accuracy", "acc"), ("test_loss", "loss")],
                "python train_mlm.py --config configs/mlm_wikitext2.ini --seed S --data_dir out/mlm_wt2_data_sS"),
}
# bench.py workloads -> (label, target ratio vs HF for the torch twin, for the MLX twin)
WORKLOADS = {
    "mlm": ("MLM step, vocab 30522, B32 T128", 1.8, 1.0),
    "mlm_v8k": ("MLM step, vocab 8192, B32 T128", None, None),
    "cls": ("classification step, B32 T128", 1.1, 1.0),
    "qa": ("QA step, B8 T384", 1.1, 1.0),
    "qa_infer": ("QA inference, B16 T384", 1.2, 1.0),
    "mlm_base": ("bert-base (L12 H768) MLM step, B8 T128", None, None),
}


def load(kind):
    """The records in results/<kind>/*.json, in file-name order."""
    records = []
    for path in sorted(glob.glob(os.path.join(RESULTS, kind, "*.json"))):
        with open(path, encoding="utf-8") as f:
            try:
                records.append({**json.load(f), "file": os.path.relpath(path, ROOT)})
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not JSON ({e})") from None
    return records


def current(records):
    """Run records (with a commit) where there are any, else the copied ones (with a source)."""
    run = [r for r in records if r.get("commit")]
    return run or records


def fmt(metric, value):
    """Scores in percent to 2 decimals, losses (nats) to 3."""
    return f"{value:.3f}" if metric.endswith("loss") else f"{value:.2f}"


def cell(records, metrics):
    """'acc 89.57 / F1 90.1, 3 seeds, 912 s' : seed means of each metric, training seconds."""
    if not records:
        return ""
    use = current(records)
    text = " / ".join(f"{label} {fmt(m, statistics.mean(r['metrics'][m] for r in use))}" for m, label in metrics)
    seeds = f"{len(use)} seeds" if len(use) > 1 else f"seed {use[0].get('settings', {}).get('seed', 0)}"
    train = [r["train_s"] for r in use if r.get("train_s")]
    return (f"{text} ({seeds}" + (f", {statistics.mean(train):,.0f} s" if len(train) == len(use) else "") + ")"
            + ("" if use[0].get("commit") else " †"))


def quality_table(rows):
    runs = load("runs")
    lines = ["| run | " + " | ".join(IMPLS.values()) + " | command |", "|---" * (len(IMPLS) + 2) + "|"]
    for row in rows:
        what, metrics, command = ROWS[row]
        cells = [cell([r for r in runs if r["row"] == row and r["impl"] == impl], metrics) for impl in IMPLS]
        lines.append(f"| {what} | " + " | ".join(cells) + f" | `{command} [--backend mlx]` |")
    return lines


def seeds_table(row):
    """Every record of one row: one line per implementation and seed."""
    what, metrics, _ = ROWS[row]
    lines = [f"| {what} | seed | " + " | ".join(label for _, label in metrics)
             + " | training s | peak RSS MiB | code | record |", "|---" * (len(metrics) + 6) + "|"]
    for r in sorted((r for r in load("runs") if r["row"] == row), key=lambda r: (list(IMPLS).index(r["impl"]),
                                                                                 r.get("commit") is None, r["seed"])):
        values = " | ".join(fmt(m, r['metrics'][m]) for m, _ in metrics)
        code = f"`{r['commit']}`" if r.get("commit") else f"† {r['source'].split(' (')[0]}"
        train = f"{r['train_s']:,.0f}" if r.get("train_s") else ""
        rss = f"{r['peak_rss_mib']:,.0f}" if r.get("peak_rss_mib") else ""
        lines.append(f"| {IMPLS[r['impl']]} | {r['seed']} | {values} | {train} | {rss} | {code} | `{r['file']}` |")
    return lines


def speed_table(record):
    """One bench.py record: ratios to HF in one process and alone, MFU, peak RSS alone."""
    rows = {(r["workload"], r["impl"]): r for r in record["results"]}
    alone, gpu = "alone_vs_hf" in record["results"][0], "step_gpu_mib" in record["results"][0]
    lines = ["| workload | HF tokens/s (MFU) | torch twin vs HF (MFU) | MLX twin vs HF (MFU) | target torch / MLX |"
             + (" alone vs HF alone: torch / MLX | peak RSS MiB alone: HF / torch / MLX |" if alone else "")
             + (" step GPU MiB: HF / torch / MLX |" if gpu else ""), "|---" * (5 + 2 * alone + gpu) + "|"]
    for name, (label, target_torch, target_mlx) in WORKLOADS.items():
        if (name, "hf") not in rows:
            continue
        hf, torch, mlx = rows[name, "hf"], rows.get((name, "torch")), rows.get((name, "mlx"))
        mfu = lambda r: f" ({100 * r['mfu']:.0f}%)" if r.get("mfu") else ""
        ratio = lambda r, t: "" if r is None else (
            f"{r['vs_hf']:.2f}×" + ("" if t is None else " ✓" if r["vs_hf"] >= t else " ✗") + mfu(r))
        target = f"{target_torch}× / {target_mlx}×" if target_torch else ""
        rate = f"{hf['tokens_per_s']:,.0f}" if hf.get("tokens_per_s") else ""
        line = f"| {label} | {rate}{mfu(hf)} | {ratio(torch, target_torch)} | {ratio(mlx, target_mlx)} | {target} |"
        if alone:
            line += (f" {torch['alone_vs_hf']:.2f}× / {mlx['alone_vs_hf']:.2f}× | " if torch and mlx else " | ") + \
                    " / ".join(f"{r['peak_rss_mib']:,.0f}" for r in (hf, torch, mlx) if r) + " |"
        if gpu:
            line += " " + " / ".join(f"{r['step_gpu_mib']:,.0f}" for r in (hf, torch, mlx) if r) + " |"
        lines.append(line)
    return lines


def speed_header(record):
    scale, unit = (1e3, "TFLOP/s") if record.get("gpu") else (1, "GFLOP/s")
    origin = f"commit `{record['commit']}`" if record.get("commit") else f"† {record['source']}"
    where = f"{record['gpu']}** (host: {record['cpu']}" if record.get("gpu") else f"{record['cpu']}** ("
    return [f"**{where}{record['cores']} cores): `{record['command']}`, {origin}, "
            f"`{record['file']}`. GEMM peak ({'8192³ bf16' if record.get('gpu') else '2048³ fp32'}): "
            + ", ".join(f"{k} {v / scale:.0f}" for k, v in record["gemm_peak_gflops"].items())
            + f" {unit}; the torch twin's Linears on {record['torch_linears']}"
            + (f", its inference attention {record['torch_attention']}" if record.get("torch_attention") else "")
            + (f"; MLX's BLAS {os.path.basename(record['mlx_blas'])}" if record.get("mlx_blas") else "")
            + (f" ({record['mlx_blas_kernels']})" if record.get("mlx_blas_kernels") else "")
            + (f", its kernels built with `{record['mlx_jit_flags']}`" if record.get("mlx_jit_flags") else "")
            + (f", its inference attention {record['mlx_attention']}" if record.get("mlx_attention") else "") + ".", ""]


def speed_tables(latest_only, gpu=False):
    """bench records grouped by CPU, each CPU's by date (undated, copied records first): the
    newest of each (README) or all of them (docs); with gpu=True the GPU records instead."""
    by_cpu = {}
    for record in (r for r in load("bench") if bool(r.get("gpu")) == gpu):
        by_cpu.setdefault(record["cpu"], []).append(record)
    lines = []
    for cpu, records in by_cpu.items():
        records = sorted(records, key=lambda r: r.get("date", ""))  # stable: file-name order within a day
        for record in (records[-1:] if latest_only else records):
            lines += speed_header(record) + speed_table(record) + [""]
    return lines[:-1]


TABLES = {
    "demo": lambda: quality_table(["squad-demo"]),
    "finetune": lambda: quality_table(["squad-split", "sst2", "mrpc"]),
    "studies": lambda: quality_table(["squad-split-hf-time", "squad-split-lora8", "squad-split-lora16"]),
    "mlm": lambda: quality_table(["mlm-wt2"]),
    "ner": lambda: quality_table(["ner"]),
    "speed": lambda: speed_tables(latest_only=True),
    "speed-all": lambda: speed_tables(latest_only=False),
    "speed-gpu": lambda: speed_tables(latest_only=False, gpu=True),
    **{f"seeds-{row}": (lambda row=row: seeds_table(row)) for row in ROWS},
}


def render(text, where):
    """`text` with every table block re-rendered from the records."""
    out, rest = [], text
    while "<!-- table: " in rest:
        before, _, rest = rest.partition("<!-- table: ")
        name, _, rest = rest.partition(" -->")
        if name not in TABLES:
            raise ValueError(f"{where}: unknown table {name!r}; known: {', '.join(TABLES)}")
        if "<!-- /table -->" not in rest:
            raise ValueError(f"{where}: table {name!r} has no closing <!-- /table -->")
        _, _, rest = rest.partition("<!-- /table -->")
        out += [before, f"<!-- table: {name} -->\n", "\n".join(TABLES[name]()), "\n<!-- /table -->"]
    return "".join(out) + rest


def add(out_dir, row):
    """results/runs/<row>-<impl>-s<seed>.json from out_dir/run.json (a finished run's record)."""
    if row not in ROWS:
        raise ValueError(f"unknown row {row!r}; known: {', '.join(ROWS)}")
    path = os.path.join(out_dir, "run.json")
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file (a run writes it when it finishes)") from None
    settings = record["settings"]
    record = {"row": row, "impl": settings["backend"], "seed": settings["seed"], **record}
    target = os.path.join(RESULTS, "runs", f"{row}-{record['impl']}-s{record['seed']}.json")
    with atomic_path(target) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    return target


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="*", help="nothing (render), or: add OUT_DIR ROW")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs")
    args = parser.parse_args(argv)
    try:
        if args.command[:1] == ["add"] and len(args.command) == 3:
            print(f"wrote {add(*args.command[1:])}")
            return 0
        if args.command:
            raise ValueError(f"expected no arguments or `add OUT_DIR ROW`, got {' '.join(args.command)}")
        stale = []
        for name in DOCS:
            path = os.path.join(ROOT, name)
            with open(path, encoding="utf-8") as f:
                text = f.read()
            new = render(text, name)
            if new != text:
                stale.append(name)
                if not args.check:
                    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
                        f.write(new)
    except (ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name in stale:
        print(f"{name}: tables {'differ from the records' if args.check else 're-rendered'}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
