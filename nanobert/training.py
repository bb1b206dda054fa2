"""Backend-agnostic training machinery shared by train_mlm.py, train_sst2.py, train_squad.py:
the settings parser, the learning-rate schedule, batch sharding for accumulation and DDP,
metric logging and plotting, and the one-line error exit. Numpy and the standard library
only; the framework-specific step lives in engine_torch.py / engine_mlx.py.
"""

import configparser
import ctypes
import ctypes.util
import importlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np

from nanobert.fileio import atomic_path


class SettingsError(ValueError):
    """A bad setting on the command line or in a config file; the message names it."""


# --- settings: nanoGPT's configurator, without exec ----------------------------------------

def configure(defaults, argv, doc=""):
    """Settings = `defaults` (a dict), overridden by `--config FILE.ini`, then `--key=value`.

    Types come from the defaults (int, float, bool, str; None defaults take strings), so a
    typo or a bad value is an error naming the setting, never a silent new variable. A bare
    `--flag` sets a bool to True. `-h`/`--help` prints the settings and exits.
    """
    settings = dict(defaults)
    args = list(argv)
    if "-h" in args or "--help" in args:
        print(doc.strip() + "\n\nsettings (default):")
        for k, v in defaults.items():
            print(f"  --{k}={v}")
        sys.exit(0)
    pairs = []
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            raise SettingsError(f"unexpected argument {arg!r}; settings look like --key=value")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:  # "--key value", or a bare "--flag" meaning true
            value = args.pop(0) if args and not args[0].startswith("--") else "true"
        pairs.append((key, value, "command line"))
    for key, value, where in pairs:
        if key == "config":
            for k, v in read_ini(value):
                settings[k] = _convert(defaults, k, v, value)
    for key, value, where in pairs:
        if key != "config":
            settings[key] = _convert(defaults, key, value, where)
    return SimpleNamespace(**settings)


def read_ini(path):
    """[(key, value)] from every section of an .ini file (sections are for readers only)."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except FileNotFoundError:
        raise SettingsError(f"{path}: no such config file") from None
    except configparser.Error as e:
        raise SettingsError(f"{path}: not a valid .ini file ({str(e).splitlines()[0]})") from None
    return [(k, v) for s in parser.sections() for k, v in parser.items(s)]


def _convert(defaults, key, value, where):
    if key not in defaults:
        raise SettingsError(f"{where}: unknown setting '{key}' (known: {', '.join(defaults)})")
    default = defaults[key]
    try:
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return value.lower() in ("true", "1", "yes")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        raise SettingsError(f"{where}: setting '{key}' must be a {type(default).__name__}, got {value!r}") from None
    return value


DECAYS = ("cosine", "linear")


def check_schedule(lr, min_lr, warmup_iters, max_iters, decay="cosine"):
    if decay not in DECAYS:
        raise SettingsError(f"setting 'decay' must be one of {', '.join(DECAYS)}, got {decay!r}")
    if not lr > 0:
        raise SettingsError(f"setting 'lr' must be > 0, got {lr}")
    if not 0 <= min_lr <= lr:
        raise SettingsError(f"setting 'min_lr' must be in [0, lr], got {min_lr}")
    if max_iters < 1:
        raise SettingsError(f"the run has no optimizer steps (max_iters = {max_iters})")
    if not 0 <= warmup_iters <= max_iters:
        raise SettingsError(f"warmup ({warmup_iters} steps) must be between 0 and the total steps ({max_iters})")


# --- learning-rate schedule ---------------------------------------------------------------

def cosine_lr(it, lr, warmup_iters, lr_decay_iters, min_lr=0.0):
    """nanoGPT's get_lr: linear warmup, then cosine decay to `min_lr` at `lr_decay_iters`.

    `it` is the 0-based optimizer step. Warmup goes 0 -> lr as HF's
    get_cosine_with_min_lr_schedule_with_warmup does (checked in parity/), so the first
    step of a warmup is taken at lr 0.
    """
    if it < warmup_iters:
        return lr * it / warmup_iters
    if it >= lr_decay_iters:
        return min_lr
    progress = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def linear_lr(it, lr, warmup_iters, lr_decay_iters, min_lr=0.0):
    """The same warmup, then a straight line down to `min_lr` at `lr_decay_iters`: HF Trainer's
    default (get_linear_schedule_with_warmup, checked in parity/), for runs that copy its recipe.
    Cosine keeps the lr near its peak for longer and spends less time near the end's lows."""
    if it < warmup_iters:
        return lr * it / warmup_iters
    if it >= lr_decay_iters:
        return min_lr
    return min_lr + (lr - min_lr) * (lr_decay_iters - it) / (lr_decay_iters - warmup_iters)


# --- batches for accumulation and DDP ------------------------------------------------------

def n_items(batch):
    """How many terms the batch's mean loss averages: target tokens for MLM and token
    classification (labels (B, T), -100 = none), examples for classification and QA."""
    labels = batch.get("labels", batch.get("start_positions"))
    return int((labels != -100).sum()) if labels.ndim == 2 else len(labels)


BUCKET_BATCHES = 50  # length bucketing sorts within chunks of this many batches (as HF's group_by_length)


def batch_indices(lengths, batch_size, rng=None, bucket=False):
    """The example indices of each batch of one epoch: every example once, in order (rng None)
    or shuffled by rng (np.random.Generator).

    bucket=True sorts the shuffled examples by length within chunks of BUCKET_BATCHES
    batches, then shuffles the order of the batches. Batches of alike lengths need far less
    padding, so steps are cheaper; the price is batches that are less random (each is one
    length band of its chunk), which is why the sort stays within chunks.
    """
    n = len(lengths)
    order = np.arange(n) if rng is None else rng.permutation(n)
    if bucket:
        chunk = BUCKET_BATCHES * batch_size
        # stable sort: examples of equal length keep their shuffled order
        order = np.concatenate([c[np.argsort(lengths[c], kind="stable")] for c in
                                (order[i:i + chunk] for i in range(0, n, chunk))])
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if bucket and rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def round_up(n, multiple):
    """n rounded up to a multiple of `multiple` (padded lengths: few shapes for a compiled step)."""
    return -(-n // multiple) * multiple


def micro_batches(batch, rank, world, grad_accum, trim=True, multiple=1):
    """This rank's `grad_accum` micro-batches of a global batch (rows split evenly; the last
    global batch of an epoch may be smaller, and then some micro-batches may be empty and
    are dropped). With `trim`, each is cut to its own longest row rounded up to a multiple
    of `multiple` (at most the batch's width), so no step computes on columns that are
    padding in every row, and a compiled step sees few distinct shapes."""
    B, width = batch["input_ids"].shape
    parts = np.array_split(np.arange(B), world * grad_accum)[rank * grad_accum:(rank + 1) * grad_accum]
    out = []
    for rows in parts:
        if len(rows):
            T = min(width, round_up(int(batch["attention_mask"][rows].sum(1).max()), multiple)) if trim else width
            part = {k: v[rows, :T] for k, v in batch.items() if v.ndim == 2}
            part.update({k: v[rows] for k, v in batch.items() if v.ndim == 1 and k != "masked_positions"})
            if "masked_positions" in batch:  # MLM's sparse head: positions into this part's B*T, as many
                slots = math.ceil(batch["masked_positions"].size * part["labels"].size / batch["labels"].size)
                part["masked_positions"] = sparse_positions(part["labels"], slots)  # slots per token as the batch
            out.append(part)
    return out


def sparse_positions(labels, slots):
    """(slots,) int32: the flat indices of the labelled (!= -100) positions of `labels`, in
    order, then padding with the first unlabelled position (ignored by the loss). A fixed
    number of slots keeps shapes stable for compiled steps; more labels than slots widen it."""
    flat = labels.reshape(-1)
    chosen = np.flatnonzero(flat != -100).astype(np.int32)
    ignored = np.flatnonzero(flat == -100)
    positions = np.full(max(len(chosen), slots), ignored[0] if len(ignored) else 0, np.int32)
    positions[:len(chosen)] = chosen
    return positions


def step_seed(seed, step, rank):
    """The framework RNG seed (dropout) of one step of one process: a function of (seed, step,
    rank) only, so a resumed run repeats a step exactly and processes drop different units."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def peak_rss_mb():
    """Peak resident memory of this process so far, in MiB. On Linux VmHWM of /proc/self/status:
    ru_maxrss survives exec, so a process started by a big one would report its parent's peak.
    Elsewhere ru_maxrss (KiB, but bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        import resource
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def keep_freed_memory():
    """Make glibc's malloc keep freed memory for reuse instead of giving it back to the OS.

    On a CPU both frameworks allocate tensors with malloc. glibc serves a big block with a
    fresh mmap and unmaps it on free, and trims the heap's free top back to the OS, so the
    same buffers next step are page-faulted in and zeroed anew by the kernel (~0.25 ms per
    MB). Measured per step on the reference machine: torch MLM 135k page faults -> 0, 2.59 ->
    2.15 s; MLX classification, trimming only beyond 1 GiB spare: 218k -> 1k, 2.32 -> 1.92 s.
    The price is memory: the heap keeps every block it grew to, holes included (torch, 30
    SQuAD steps of varying shapes: peak RSS 3.77 -> 4.34 GB). Both engines call this at
    import; glibc only (elsewhere a no-op). NANOBERT_KEEP_FREED_MEMORY=0 leaves glibc's
    defaults (lower peak RSS, slower steps)."""
    if sys.platform != "linux" or os.environ.get("NANOBERT_KEEP_FREED_MEMORY") == "0":
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if hasattr(libc, "mallopt"):
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        libc.mallopt(M_MMAP_MAX, 0)  # big blocks from the heap, not fresh mmaps ...
        libc.mallopt(M_TRIM_THRESHOLD, -1)  # ... and kept there when freed (-1: never trim)


# --- run records (results/, rendered into README.md and docs/ by nanobert.report) ----------

def cpu_vendor_and_model():
    """('GenuineIntel' | 'AuthenticAMD' | ..., 'model name (family F model M)') of this
    machine's CPU, from /proc/cpuinfo on Linux (family and model tell CPUs apart where a
    virtual machine's name does not); elsewhere ('', platform.processor())."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())  # the first CPU's (all are alike)
    except OSError:
        return "", platform.processor()
    name = fields.get("model name", platform.processor())
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return fields.get("vendor_id", ""), name


def run_info():
    """What a run or benchmark ran on and with: command, git commit (+ whether the code it runs
    had uncommitted changes), CPU, cores, package versions. Part of every record."""
    from importlib import metadata
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    git = lambda *args: subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30).stdout
    try:
        commit = git("rev-parse", "--short=12", "HEAD").strip() or None
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "nanobert", "*.py", "configs",
                         "requirements.txt", ":(exclude)nanobert/report.py", ":(exclude)tests", ":(exclude)parity"))
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, False
    versions = {}
    for package in ("torch", "mlx", "transformers", "numpy", "tokenizers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {"command": " ".join(["python"] + sys.argv), "commit": commit, "dirty": dirty,
            "date": time.strftime("%Y-%m-%d"), "cpu": cpu_vendor_and_model()[1], "cores": os.cpu_count(),
            "python": platform.python_version(), "versions": versions}


def save_run_record(cfg, run, **metrics):
    """out_dir/run.json: the run's record (run_info, settings, training seconds, tokens, steps,
    peak RSS, the last evaluation's metrics + `metrics`). Copied into results/, it is what the
    README's tables are rendered from."""
    record = {**run["info"], "settings": vars(cfg), "train_s": round(run["train_s"], 3), "tokens": run["tokens"],
              "steps": run["steps"], "peak_rss_mib": round(peak_rss_mb()), "metrics": {**run["metrics"], **metrics}}
    with atomic_path(os.path.join(cfg.out_dir, "run.json")) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)


# --- distributed environment (launcher side) -----------------------------------------------

def launched_world_size():
    """Processes started by torchrun (WORLD_SIZE) or mlx.launch (its hostfile), else 1."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if "MLX_HOSTFILE" in os.environ:
        with open(os.environ["MLX_HOSTFILE"]) as f:
            return len(json.load(f))
    return 1


def load_backend(name):
    """(model module, engine module) of backend "torch" or "mlx"."""
    if name not in ("torch", "mlx"):
        raise SettingsError(f"setting 'backend' must be 'torch' or 'mlx', got {name!r}")
    return importlib.import_module(f"nanobert.model_{name}"), importlib.import_module(f"nanobert.engine_{name}")


# --- logging --------------------------------------------------------------------------------

class MetricsLog:
    """Metrics as JSON lines in out_dir/metrics.jsonl (one object per event, with `step`), and a
    PNG of the curves at the end. On resume, lines past the resumed step are dropped, so
    the log tells the story of the weights that exist, and `time` (wall seconds since the run
    began) goes on from the last kept line instead of restarting at 0. report_to="tensorboard"
    also writes the scalars to out_dir/tensorboard (needs `pip install tensorboard`)."""

    def __init__(self, out_dir, resume_step=None, enabled=True, report_to="none"):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.enabled = enabled
        self.t0 = time.time()
        self.tensorboard = None
        if report_to not in ("none", "tensorboard"):
            raise ValueError(f"report_to: expected none or tensorboard, got {report_to!r}")
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        keep = [r for r in self.read() if resume_step is not None and r["step"] <= resume_step]
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
        if keep:  # the time between that line and the interruption is not known, so not counted
            self.t0 -= keep[-1]["time"]
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("report_to=tensorboard needs the tensorboard package: pip install tensorboard") from None
            # purge_step: on resume TensorBoard drops the events past the resumed step, as above
            self.tensorboard = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=resume_step)

    def read(self):
        if not os.path.exists(self.path):
            return []
        with open(self.path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def log(self, step, **metrics):
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "time": round(time.time() - self.t0, 2), **metrics}) + "\n")
            if self.tensorboard is not None:
                for name, value in metrics.items():
                    self.tensorboard.add_scalar(name, value, step)
                self.tensorboard.flush()

    def plot(self, path, panels):
        """panels: [(title, [metric names])]; one subplot each, metric vs step."""
        if not self.enabled:
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        rows = self.read()
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
        for ax, (title, names) in zip(axes[0], panels):
            for name in names:
                pts = [(r["step"], r[name]) for r in rows if r.get(name) is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None, label=name)
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)


# --- the training loop of all three scripts -------------------------------------------------

class EpochLoader:
    """Global batches, epoch after epoch, from `make_batches(epoch, start)` (a generator of the
    epoch's batches from batch `start` on, in an order fixed by (seed, epoch)). Its state
    {epoch, batch} is all a checkpoint needs to resume mid-epoch on the very next batch."""

    def __init__(self, make_batches, steps_per_epoch):
        self.make_batches, self.steps_per_epoch = make_batches, steps_per_epoch
        self.epoch, self.batch, self.it = 0, 0, None

    def next(self):
        if self.batch == self.steps_per_epoch:
            self.epoch, self.batch, self.it = self.epoch + 1, 0, None
        if self.it is None:
            self.it = self.make_batches(self.epoch, self.batch)
        self.batch += 1
        return next(self.it)

    def end_of_epoch(self):
        return self.batch == self.steps_per_epoch

    def state_dict(self):
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state):
        self.epoch, self.batch, self.it = state["epoch"], state["batch"], None


def fit(cfg, E, model, opt, loader, max_iters, warmup_iters, evaluate, best_metric, rank=0, world=1,
        resume=None, tokenizer=None, model_state=None, extra_state=None, panels=None, trim=True, adapter=False):
    """Train `model` for `max_iters` optimizer steps; evaluate, log and checkpoint on the way.

    cfg: the script's settings (lr, min_lr, decay, grad_clip, grad_accum, seed, log_every,
    eval_every, save_every, max_checkpoints, out_dir, report_to). loader: .next() -> a global batch (numpy), .epoch,
    and .state_dict()/.load_state_dict() for resuming; .end_of_epoch() if epochs matter.
    evaluate(step) -> {metric: value}, run on rank 0 only (the others wait at the next
    gradient sum). best_metric: the metric whose maximum is kept as out_dir/best.
    resume: a loaded checkpoint (checkpoint.load) to continue from. model_state: what to
    save of the model (default: everything; LoRA saves only what trains, with adapter=True:
    as adapter.safetensors, see checkpoint.save). panels: [(title,
    [metric names])] to plot (default: train loss, all evaluation metrics, lr).
    trim: cut micro-batches to their longest row, rounded up to a multiple of E.PAD_MULTIPLE
    (off to measure fixed padding).
    Returns {"best": best value of best_metric, "train_s": seconds spent in training steps,
    "tokens": non-padding tokens trained on, "steps": optimizer steps taken, "metrics": the
    last evaluation's, "info": run_info() at the start} (this process's run only: a resumed
    run counts from its resume).
    """
    from tqdm import tqdm
    from nanobert import checkpoint
    master = rank == 0
    model_state = model_state or model.state_numpy
    step, best = 0, None
    if resume is not None:
        opt.load_numpy(resume.optimizer)
        loader.load_state_dict(resume.state["data"])
        step = resume.state["step"]
        # the best so far, if its checkpoint is here (resuming from elsewhere starts a new `best`)
        best = resume.state["best"] if os.path.isdir(os.path.join(cfg.out_dir, "best")) else None
    log = MetricsLog(cfg.out_dir, resume_step=step if resume is not None else None, enabled=master,
                     report_to=cfg.report_to)
    # this process's run, for the caller (and its record: what it ran is known at its start)
    run = {"best": best, "train_s": 0.0, "tokens": 0, "steps": 0, "metrics": {}, "info": run_info()}
    # sums since the last log line; it logs the mean loss over those steps, as HF Trainer does
    # (one batch's loss is too noisy to compare runs by)
    window_tokens, window_s, window_loss, window_steps = 0, 0.0, 0.0, 0
    get_lr = linear_lr if cfg.decay == "linear" else cosine_lr
    bar = tqdm(total=max_iters, initial=step, disable=not master or None, desc="train", dynamic_ncols=True)
    while step < max_iters:
        t0 = time.time()
        batch = loader.next()
        lr = get_lr(step, cfg.lr, warmup_iters, max_iters, cfg.min_lr)
        parts = micro_batches(batch, rank, world, cfg.grad_accum, trim, E.PAD_MULTIPLE)
        loss, grad_norm = E.train_step(model, opt, parts, lr, cfg.grad_clip, step_seed(cfg.seed, step, rank))
        step += 1
        window_tokens += int(batch["attention_mask"].sum())
        window_s += time.time() - t0  # training time only: evaluation and saving are not counted
        window_loss, window_steps = window_loss + loss, window_steps + 1
        bar.update()
        if step % cfg.log_every == 0 or step == max_iters:
            mean_loss = window_loss / window_steps
            log.log(step, loss=mean_loss, lr=lr, grad_norm=grad_norm, tokens_per_s=window_tokens / window_s,
                    epoch=loader.epoch)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.1e}", tok_s=f"{window_tokens / window_s:.0f}")
            run["train_s"], run["tokens"] = run["train_s"] + window_s, run["tokens"] + window_tokens
            window_tokens, window_s, window_loss, window_steps = 0, 0.0, 0.0, 0
        run["steps"] += 1
        end_of_epoch = getattr(loader, "end_of_epoch", lambda: False)()
        evaluating = end_of_epoch or step == max_iters or (cfg.eval_every and step % cfg.eval_every == 0)
        saving = cfg.save_every and step % cfg.save_every == 0  # a resume point without evaluation
        if master and (evaluating or saving):
            state = {"data": loader.state_dict(), "settings": vars(cfg), "architectures": [type(model).__name__],
                     **(extra_state or {})}
            weights = model_state()
            if evaluating:
                metrics = state["metrics"] = run["metrics"] = evaluate(step)
                log.log(step, **metrics)
                tqdm.write(f"step {step}: " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
                if best is None or metrics[best_metric] > best:
                    best = run["best"] = metrics[best_metric]
                    checkpoint.save(cfg.out_dir, step, model.config, weights, None, {**state, "best": best},
                                    name="best", tokenizer=tokenizer, adapter=adapter)
            checkpoint.save(cfg.out_dir, step, model.config, weights, opt.state_numpy(), {**state, "best": best},
                            cfg.max_checkpoints, tokenizer=tokenizer, adapter=adapter)
    bar.close()
    E.finish_distributed()
    if master:
        if panels is None:
            evaluated = sorted({k for r in log.read() for k in r} - {"step", "time", "loss", "lr", "grad_norm",
                                                                     "tokens_per_s", "epoch"})
            panels = [("train loss", ["loss"]), ("evaluation", evaluated), ("learning rate", ["lr"])]
        log.plot(os.path.join(cfg.out_dir, "metrics.png"), panels)
    return run


def main_guard(main):
    """Run `main()`; a user error (bad setting, file, value) is one line on stderr + exit 2."""
    try:
        main()
    except (ValueError, FileNotFoundError, KeyError) as e:
        msg = str(e).strip("'\"") if isinstance(e, KeyError) else str(e)
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
