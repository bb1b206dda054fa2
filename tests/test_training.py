"""The training machinery, end to end through train_sst2.py and at the engine level:
exact resume in a new process, kill safety of checkpoints, gradient accumulation, DDP
equivalence under torchrun/gloo and mlx.launch/ring, and one-line errors for bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from tiny import ROOT, run_script, tiny_config
from nanobert import checkpoint
from nanobert.training import MetricsLog, load_backend, micro_batches

BACKENDS = ("torch", "mlx")


def sst2_args(model, data, out, *extra):
    return ["train_sst2.py", f"--init={model}", f"--data={data}", f"--out_dir={out}", "--batch_size=8",
            "--lr=1e-3", "--warmup=2", "--log_every=1", *extra]


def weights(ckpt_dir):
    return load_file(os.path.join(ckpt_dir, "model.safetensors"))


def assert_weights_equal(a, b, tol):
    assert a.keys() == b.keys()
    for k in a:
        err = float(np.abs(a[k] - b[k]).max())
        assert err <= tol, f"{k}: max abs difference {err:.3g} > {tol}"


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# --- resume -----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_in_a_new_process_equals_straight_run(backend, tiny_model_dir, tiny_glue_dir, tmp_path):
    """8 steps straight vs 4 steps, checkpoint, new process, --resume, 4 more. Step 4 is
    mid-epoch (5 batches per epoch), dropout is on, the schedule has warmup + decay."""
    args = ["--epochs=2", "--max_steps=8", "--eval_every=4", "--max_checkpoints=5", f"--backend={backend}"]
    ok(run_script(sst2_args(tiny_model_dir, tiny_glue_dir, tmp_path / "straight", *args)))
    os.makedirs(tmp_path / "resumed")
    shutil.copytree(tmp_path / "straight" / "ckpt-000004", tmp_path / "resumed" / "ckpt-000004")
    out = ok(run_script(sst2_args(tiny_model_dir, tiny_glue_dir, tmp_path / "resumed", *args, "--resume")))
    assert "resuming from" in out.stdout
    straight, resumed = weights(tmp_path / "straight" / "ckpt-000008"), weights(tmp_path / "resumed" / "ckpt-000008")
    assert_weights_equal(straight, resumed, 0.0 if backend == "torch" else 1e-6)
    moved = weights(tmp_path / "straight" / "ckpt-000004")
    assert any(np.abs(moved[k] - straight[k]).max() > 1e-4 for k in moved)  # the last 4 steps did train


def test_a_torch_checkpoint_resumes_in_mlx(tiny_model_nodrop_dir, tiny_glue_dir, tmp_path):
    """One checkpoint format for both twins, optimizer state included: 2 torch steps, then 2 MLX
    steps from the torch checkpoint, end where 4 torch steps end (fp32 noise only; dropout off)."""
    args = ["--epochs=1", "--max_steps=4", "--save_every=2", "--eval_every=100", "--max_checkpoints=5"]
    ok(run_script(sst2_args(tiny_model_nodrop_dir, tiny_glue_dir, tmp_path / "torch", *args)))
    os.makedirs(tmp_path / "mixed")
    shutil.copytree(tmp_path / "torch" / "ckpt-000002", tmp_path / "mixed" / "ckpt-000002")
    ok(run_script(sst2_args(tiny_model_nodrop_dir, tiny_glue_dir, tmp_path / "mixed", *args, "--backend=mlx",
                            "--resume")))
    assert_weights_equal(weights(tmp_path / "torch" / "ckpt-000004"), weights(tmp_path / "mixed" / "ckpt-000004"), 1e-5)


def test_metrics_log_on_resume_drops_later_lines_and_keeps_the_clock(tmp_path):
    """A run interrupted after step 3 and resumed from its step-2 checkpoint: the log keeps
    steps 1-2 and the next line's time goes on from 200 s, not from 0; a fresh run starts over."""
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps({"step": s, "time": 100.0 * s, "loss": 1.0}) + "\n" for s in (1, 2, 3))
    log = MetricsLog(str(tmp_path), resume_step=2)
    log.log(3, loss=0.5)
    rows = log.read()
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["loss"] == 0.5
    assert 200.0 <= rows[2]["time"] < 260.0
    fresh = MetricsLog(str(tmp_path))
    fresh.log(1, loss=2.0)
    assert [(r["step"], r["time"] < 60) for r in fresh.read()] == [(1, True)]


# --- kill safety --------------------------------------------------------------------------------

KILLED_WRITER = textwrap.dedent("""
    import sys, time, numpy as np
    from nanobert import checkpoint, weights
    from nanobert.config import BertConfig
    out, cfg = sys.argv[1], BertConfig(vocab_size=10, hidden_size=8, num_attention_heads=2)
    state = {"w": np.ones((1000, 1000), np.float32)}
    checkpoint.save(out, 1, cfg, state, state, {"data": {}})
    real = weights.write_safetensors
    def slow(path, tensors, metadata=None):  # the next save stalls mid-write, and is killed there
        real(path, tensors, metadata)
        open(out + "/WRITING", "w").close()
        time.sleep(60)
    checkpoint.write_safetensors = slow
    checkpoint.save(out, 2, cfg, state, state, {"data": {}})
""")


def test_sigkill_while_writing_leaves_previous_checkpoint_intact(tmp_path, capfd):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT})
    deadline = time.time() + 60
    while not (out / "WRITING").exists():
        assert time.time() < deadline and proc.poll() is None, "writer never reached the second save"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "ckpt-000002").exists()
    assert any(name.startswith(".tmp-") for name in os.listdir(out))  # the half-written one
    assert checkpoint.latest(str(out)) == str(out / "ckpt-000001")
    np.testing.assert_array_equal(checkpoint.load(str(out / "ckpt-000001")).model["w"], 1.0)


def test_corrupt_checkpoint_is_named_and_skipped(tmp_path, capfd):
    from nanobert.config import BertConfig
    cfg, state = BertConfig(vocab_size=10, hidden_size=8, num_attention_heads=2), {"w": np.ones(100, np.float32)}
    for step in (1, 2):
        checkpoint.save(str(tmp_path), step, cfg, state, state, {"data": {}})
    blob = tmp_path / "ckpt-000002" / "model.safetensors"
    blob.write_bytes(blob.read_bytes()[:-10])  # truncated
    with pytest.raises(checkpoint.CheckpointError, match=r"ckpt-000002: corrupt checkpoint \(model.safetensors has"):
        checkpoint.load(str(tmp_path / "ckpt-000002"))
    assert checkpoint.latest(str(tmp_path)) == str(tmp_path / "ckpt-000001")
    assert "warning: skipping" in capfd.readouterr().err
    os.remove(tmp_path / "ckpt-000001" / "manifest.json")  # never completed
    assert checkpoint.latest(str(tmp_path)) is None


def test_max_checkpoints_prunes_oldest(tmp_path):
    from nanobert.config import BertConfig
    cfg, state = BertConfig(vocab_size=10, hidden_size=8, num_attention_heads=2), {"w": np.ones(4, np.float32)}
    for step in range(1, 6):
        checkpoint.save(str(tmp_path), step, cfg, state, state, {"data": {}}, max_checkpoints=2)
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000004", "ckpt-000005"]


# --- accumulation (engine level) -----------------------------------------------------------------

def mlm_batch(rng, B, T, vocab):
    ids = rng.integers(5, vocab, (B, T)).astype(np.int32)
    lengths = rng.integers(3, T + 1, B)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    labels = np.where((rng.random((B, T)) < 0.25) & (mask == 1), ids, -100).astype(np.int32)
    labels[:, 1] = ids[:, 1]  # every row has a target
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulation_equals_big_batch(backend):
    """k micro-batches of b == one batch of k*b, for MLM, where micro-batches hold different
    numbers of target tokens (each is weighted by its share of the targets)."""
    models, E = load_backend(backend)
    config = tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    init = models.BertForMaskedLM(config).init_weights().state_numpy()
    final = []
    for accum in (1, 4):
        rng = np.random.default_rng(0)
        model = models.BertForMaskedLM(config)
        model.load_numpy(init)
        opt = E.AdamW(model)
        for step in range(3):
            E.train_step(model, opt, micro_batches(mlm_batch(rng, 8, 12, config.vocab_size), 0, 1, accum), 1e-3, 1.0, step)
        final.append(model.state_numpy())
    assert_weights_equal(final[0], final[1], 1e-5)


def test_mlx_step_frees_the_gradients_it_has_used():
    """The MLX step keeps no Python reference to gradients past their use (MLX frees an array,
    or computes into its memory, only once nothing refers to it). A model whose parameters
    (P bytes) outweigh its activations: the step's peak above the weights and both moments is
    the gradients, plus the new weights and moments computed beside the old ones (AdamW's
    three outputs), 4P; holding the last shard's gradients to the end of the step made it 5P."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    import nanobert.engine_mlx as E
    import nanobert.model_mlx as M
    config = tiny_config(vocab_size=50000)  # the word embeddings: 800k of its 806k parameters
    model = M.BertForSequenceClassification(config).init_weights()
    opt = E.AdamW(model)
    P = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
    rng = np.random.default_rng(0)
    for step in range(2):  # the first step also allocates the moments
        batch = {**mlm_batch(rng, 8, 12, config.vocab_size), "labels": rng.integers(0, 2, 8).astype(np.int32)}
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        E.train_step(model, opt, micro_batches(batch, 0, 1, 1), 1e-3, 1.0, step)
    assert before >= 3 * P
    assert mx.get_peak_memory() - before < 4.5 * P, f"{(mx.get_peak_memory() - before) / P:.2f} P"


@pytest.mark.parametrize("backend", BACKENDS)
def test_predict_in_pieces_equals_the_whole_batch(backend, monkeypatch):
    """predict runs a batch's rows in pieces of at most PREDICT_TOKENS tokens (less memory):
    the outputs are those of the whole batch at once, in order, for a batch that does not
    split evenly (7 rows, 2 per piece)."""
    models, E = load_backend(backend)
    config = tiny_config(num_labels=3)
    model = models.BertForSequenceClassification(config).init_weights()
    batch = mlm_batch(np.random.default_rng(0), 7, 12, config.vocab_size)
    del batch["labels"]
    whole = E.predict(model, batch)["logits"]
    monkeypatch.setattr(E, "PREDICT_TOKENS", 24)
    pieces = E.predict(model, batch)["logits"]
    assert whole.shape == pieces.shape == (7, 3)
    np.testing.assert_allclose(pieces, whole, atol=1e-6)


def test_micro_batches_trim_to_the_longest_row_rounded_up():
    rng = np.random.default_rng(0)
    batch = mlm_batch(rng, 8, 20, 50)
    batch["attention_mask"][:, 11:] = 0  # every row at most 11 long
    batch["attention_mask"][0, :11] = 1
    widths = lambda **kw: [p["input_ids"].shape[1] for p in micro_batches(batch, 0, 1, 2, **kw)]
    lengths = [int(batch["attention_mask"][rows].sum(1).max()) for rows in (slice(0, 4), slice(4, 8))]
    assert widths() == lengths and lengths[0] == 11
    assert widths(multiple=8) == [-(-n // 8) * 8 for n in lengths]
    assert widths(multiple=32) == [20, 20] and widths(trim=False) == [20, 20]  # never wider than the batch


@pytest.mark.parametrize("head", ["BertForMaskedLM", "BertForSequenceClassification", "BertForTokenClassification",
                                  "BertForQuestionAnswering"])
def test_mlx_compiled_step_equals_eager(head, monkeypatch):
    """The MLX twin's training step is mx.compile'd: its loss, gradients and dropout masks are
    the eager step's, for batches of two widths (each traced anew) and for a second model
    (which must get its own compiled function, not the first model's)."""
    import nanobert.engine_mlx as E
    import nanobert.model_mlx as M
    config = tiny_config(num_labels=2)
    rng = np.random.default_rng(0)
    batches = []
    for T in (12, 16):
        batch = mlm_batch(rng, 8, T, config.vocab_size)
        if head == "BertForSequenceClassification":
            batch["labels"] = rng.integers(0, 2, 8).astype(np.int32)
        elif head == "BertForTokenClassification":
            batch["labels"] = np.where(batch["attention_mask"] == 1, rng.integers(0, 2, (8, T)), -100).astype(np.int32)
        elif head == "BertForQuestionAnswering":
            del batch["labels"]
            batch["start_positions"], batch["end_positions"] = (rng.integers(0, 3, 8).astype(np.int32) for _ in "se")
        batches.append(batch)
    clip = E.clip_grad_norm
    results = {}
    for compiled in (False, True):
        monkeypatch.setattr(E, "COMPILE", compiled)
        for seed in (0, 1):  # two models, the second created after the first one's steps
            grads = []
            monkeypatch.setattr(E, "clip_grad_norm", lambda g, c: (grads.append({k: np.array(v) for k, v in g.items()}),
                                                                   clip(g, c))[1])
            E.seed(seed)
            model = getattr(M, head)(config).init_weights()
            opt = E.AdamW(model)
            losses = [E.train_step(model, opt, micro_batches(b, 0, 1, 1), 1e-3, 1.0, step)[0]
                      for step, b in enumerate(batches * 2)]
            assert (getattr(model, "_compiled_loss_and_grad", None) is not None) == compiled
            results[compiled, seed] = losses, grads
    for seed in (0, 1):
        (eager_losses, eager_grads), (losses, grads) = results[False, seed], results[True, seed]
        np.testing.assert_allclose(losses, eager_losses, rtol=1e-5)
        for g, ref in zip(grads, eager_grads):
            for k in ref:
                np.testing.assert_allclose(g[k], ref[k], atol=1e-5 * max(1.0, np.abs(ref[k]).max()), err_msg=k)
    assert results[True, 0][0] != results[True, 1][0]


# --- DDP ----------------------------------------------------------------------------------------

def launcher(name):
    """torchrun / mlx.launch from this Python's environment; a clear failure if it is missing."""
    exe = os.path.join(os.path.dirname(sys.executable), name)
    exe = exe if os.path.exists(exe) else shutil.which(name)
    if exe is None:
        pytest.fail(f"{name} not found next to {sys.executable} or on PATH: install torch / mlx")
    return exe


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddp_two_processes_equal_one_process_double_batch(backend, tiny_model_nodrop_dir, tiny_glue_dir, tmp_path):
    """Dropout off: two processes draw different dropout masks than one, by design."""
    if backend == "torch":
        launch = [launcher("torchrun"), "--nproc_per_node=2"]
    else:
        launch = [launcher("mlx.launch"), "-n", "2", "--backend", "ring", "--", sys.executable]
    common = ["--epochs=1", "--max_steps=4", f"--backend={backend}", "--grad_clip=0.5"]
    single = sst2_args(tiny_model_nodrop_dir, tiny_glue_dir, tmp_path / "one", *common)
    single[single.index("--batch_size=8")] = "--batch_size=16"
    ok(run_script(single))
    two = ok(run_script(sst2_args(tiny_model_nodrop_dir, tiny_glue_dir, tmp_path / "two", *common), launcher=launch,
                        timeout=240))
    assert "(2 process(es))" in two.stdout
    assert_weights_equal(weights(tmp_path / "one" / "ckpt-000004"), weights(tmp_path / "two" / "ckpt-000004"), 1e-5)


# --- logging ----------------------------------------------------------------------------------

def test_tensorboard_gets_the_same_scalars_as_metrics_jsonl(tiny_model_dir, tiny_glue_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "out"
    ok(run_script(sst2_args(tiny_model_dir, tiny_glue_dir, out, "--max_steps=4", "--eval_every=2",
                            "--report_to=tensorboard")))
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    for name in ("loss", "lr", "dev_accuracy"):
        want = [(r["step"], r[name]) for r in rows if name in r]
        got = [(e.step, e.value) for e in events.Scalars(name)]
        assert len(want) >= 2 and [s for s, _ in got] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)  # stored as fp32


def test_peak_rss_is_this_process_not_its_parent():
    """ru_maxrss survives exec: a small child of a 1 GiB process would report 1 GiB."""
    from nanobert.training import peak_rss_mb
    big = np.ones(2**28, np.float32)  # 1 GiB, every page touched
    code = "from nanobert.training import peak_rss_mb; print(peak_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                                 check=True).stdout)
    assert peak_rss_mb() > 1024 > 4 * child
    del big


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_decay_setting_picks_the_schedule_the_run_logs(decay, tiny_model_dir, tiny_glue_dir, tmp_path):
    """--decay reaches the training loop: the lr logged at each step is that schedule's."""
    from nanobert.training import cosine_lr, linear_lr
    out = tmp_path / "out"
    ok(run_script(sst2_args(tiny_model_dir, tiny_glue_dir, out, "--max_steps=6", f"--decay={decay}")))
    logged = {r["step"]: r["lr"] for r in map(json.loads, open(out / "metrics.jsonl")) if "lr" in r}
    schedule = {"cosine": cosine_lr, "linear": linear_lr}[decay]
    # a row for step s is logged after the optimizer step s - 1 (0-based), taken at that step's lr
    assert len(logged) == 6
    assert [logged[s] for s in sorted(logged)] == pytest.approx([schedule(s - 1, 1e-3, 2, 6) for s in sorted(logged)])
    assert cosine_lr(3, 1e-3, 2, 6) != pytest.approx(linear_lr(3, 1e-3, 2, 6))  # the two are told apart


def test_logged_loss_is_the_mean_over_the_log_window(tiny_model_dir, tiny_glue_dir, tmp_path):
    """As HF Trainer's: with --log_every=3 the loss logged at step 3 is the mean of steps
    1-3's losses (each logged by a --log_every=1 run of the same seed), not step 3's alone."""
    def losses(out, log_every):
        ok(run_script(sst2_args(tiny_model_dir, tiny_glue_dir, out, "--max_steps=6", f"--log_every={log_every}")))
        return {r["step"]: r["loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r}
    each, windows = losses(tmp_path / "each", 1), losses(tmp_path / "windows", 3)
    assert sorted(windows) == [3, 6]
    for end in (3, 6):
        assert windows[end] == pytest.approx(np.mean([each[s] for s in range(end - 2, end + 1)]), rel=1e-6)
        # the mean, not the last step: near ln 2 at init the two differ by ~1e-4, still 100x
        # more than the 1e-6 the mean is matched to
        assert windows[end] != pytest.approx(each[end], rel=1e-5)


# --- bad input: one line, non-zero exit -------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--lrr=1"], "error: command line: unknown setting 'lrr'"),
    (["--lr=-1"], "error: setting 'lr' must be > 0, got -1.0"),
    (["--warmup=500", "--max_steps=10"], "error: warmup (500 steps) must be between 0 and the total steps (10)"),
    (["--resume=/no/such/ckpt"], "error: /no/such/ckpt: no such checkpoint directory"),
    (["--batch_size=eight"], "error: command line: setting 'batch_size' must be a int, got 'eight'"),
    (["--config=CONFIG"], "error: CONFIG: unknown setting 'learning_rate'"),
    (["--report_to=wandb"], "error: report_to: expected none or tensorboard, got 'wandb'"),
    (["--decay=exp"], "error: setting 'decay' must be one of cosine, linear, got 'exp'"),
])
def test_bad_input_is_one_clear_line(args, message, tiny_model_dir, tiny_glue_dir, tmp_path):
    ini = tmp_path / "bad.ini"
    ini.write_text("[train]\nlearning_rate = 0.1\n")
    args = [a.replace("CONFIG", str(ini)) for a in args]
    out = run_script(sst2_args(tiny_model_dir, tiny_glue_dir, tmp_path / "out", *args), timeout=120)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith(message.replace("CONFIG", str(ini))), out.stderr
    assert "Traceback" not in out.stderr


FAULTS_PROBE = """
import resource, sys
import numpy as np
import {module}
np._core.multiarray._set_madvise_hugepage(False)  # count 4 KiB pages, not 2 MiB huge ones
faults = []
for _ in range(3):  # a 64 MiB buffer, written, freed, and allocated again
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    np.ones(16 << 20, np.float32)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings (Linux only)")
@pytest.mark.parametrize("module, keep", [("nanobert.engine_torch", "1"), ("nanobert.engine_mlx", "1"),
                                          ("os", "1"), ("nanobert.engine_torch", "0")])
def test_engines_reuse_freed_memory_instead_of_page_faulting(module, keep):
    """After either engine is imported, a freed big buffer is reused: the second and third
    allocation fault in almost no pages (16,384 pages for 64 MiB without it: the "os" control,
    and NANOBERT_KEEP_FREED_MEMORY=0)."""
    out = subprocess.run([sys.executable, "-c", FAULTS_PROBE.format(module=module)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=True,
                         env={**os.environ, "NANOBERT_KEEP_FREED_MEMORY": keep})
    faults = json.loads(out.stdout.strip().splitlines()[-1])
    if module == "os" or keep == "0":
        assert min(faults) > 16000, faults
    else:
        assert max(faults[1:]) < 1000, faults
