"""train_squad.py end to end, in fresh processes, on a tiny random BERT and a tiny synthetic
SQuAD: train + evaluate + predictions + best/ + demo answer, the --predict CLI, LoRA
(adapter checkpoint, merged export), --eval_only, exact resume, and one-line errors."""

import json
import os
import re
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from tiny import WORDS, run_script
from nanobert import checkpoint
from nanobert.squad import load_squad, squad_em_f1
from nanobert.training import load_backend
from train_squad import DEMO_CONTEXT, DEMO_QUESTION, load_qa_model

BACKENDS = ("torch", "mlx")
# Models this small gain nothing from a second thread, and on a busy machine every op waits
# for it (measured: torch steps 100x slower with another process on the 2 cores).
# 64-token windows with a 16-token stride: the longer contexts (up to ~70 words) need 2-3 windows.
WINDOWS = ["--max_length=64", "--doc_stride=16"]


def synthetic_squad(rng, n_articles, paragraphs, prefix):
    """SQuAD v1.1 JSON: contexts of tiny-vocabulary words, each with one question whose answer
    is a 1-3 word span of it (answer_start computed, so it points at the text)."""
    data = []
    for a in range(n_articles):
        rows = []
        for p in range(paragraphs):
            words = [str(w) for w in rng.choice(WORDS, int(rng.integers(8, 70)))]
            i, k = int(rng.integers(0, len(words) - 3)), int(rng.integers(1, 4))
            start = len(" ".join(words[:i])) + (1 if i else 0)
            question = " ".join(str(w) for w in rng.choice(WORDS, 4)) + " ?"
            rows.append({"context": " ".join(words) + " .",
                         "qas": [{"id": f"{prefix}{a}-{p}", "question": question,
                                  "answers": [{"text": " ".join(words[i:i + k]), "answer_start": start}]}]})
        data.append({"title": f"article {a}", "paragraphs": rows})
    return {"version": "1.1", "data": data}


@pytest.fixture(scope="module")
def squad_dir(tmp_path_factory):
    """train.json (3 articles x 8 questions -> ~30 windows) and eval.json (8 questions)."""
    d = tmp_path_factory.mktemp("tiny_squad")
    rng = np.random.default_rng(0)
    for name, n_articles, prefix in (("train", 3, "t"), ("eval", 1, "e")):
        (d / f"{name}.json").write_text(json.dumps(synthetic_squad(rng, n_articles, 8, prefix)))
    return d


def squad_args(model, data, out, backend, *extra):
    return ["train_squad.py", f"--init={model}", f"--train_data={data / 'train.json'}",
            f"--eval_data={data / 'eval.json'}", f"--out_dir={out}", f"--backend={backend}", *WINDOWS,
            "--batch_size=8", "--eval_batch_size=8", "--lr=1e-3", "--warmup=1", "--log_every=1", *extra]


def run(args, timeout=300):
    return run_script(args, timeout=timeout)


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def answers(stdout):
    """[(question, answer)] from the 'Q: ...' / 'A: ...\t(score s)' lines of a run."""
    return re.findall(r"^Q: (.*)\nA: (.*)\t\(score [-0-9.inf]+\)$", stdout, re.M)


def eval_examples(data):
    return {qa["id"]: p["context"] for a in json.loads((data / "eval.json").read_text())["data"]
            for p in a["paragraphs"] for qa in p["qas"]}


@pytest.fixture(scope="module", params=BACKENDS)
def trained(request, tiny_model_dir, squad_dir, tmp_path_factory):
    """One epoch (~30 windows: 4 steps) of full fine-tuning per backend: (backend, out_dir, CompletedProcess)."""
    out = tmp_path_factory.mktemp(f"squad_{request.param}")
    proc = ok(run(squad_args(tiny_model_dir, squad_dir, out, request.param, "--epochs=1")))
    return request.param, out, proc


# --- training -------------------------------------------------------------------------------------

def test_training_writes_predictions_best_and_answers_the_demo(trained, squad_dir):
    backend, out, proc = trained
    steps = int(re.search(rf"; (\d+) steps of 8 windows \(1 process\(es\)\), backend {backend};", proc.stdout)[1])
    contexts = eval_examples(squad_dir)
    predictions = json.loads((out / "predictions.json").read_text())
    assert set(predictions) == set(contexts)
    for qid, text in predictions.items():
        assert text and text in contexts[qid], qid  # a span of its own context
    assert {"config.json", "model.safetensors", "vocab.txt", "state.json"} <= set(os.listdir(out / "best"))
    best = checkpoint.load(str(out / "best"))
    assert best.state["step"] == steps  # one evaluation, at the end: it is the best
    examples, _ = load_squad(str(squad_dir / "eval.json"))
    assert best.state["metrics"] == {f"eval_{k}": v for k, v in squad_em_f1(predictions, examples).items()}
    assert "qa_outputs.weight" in best.model
    assert os.path.exists(out / f"ckpt-{steps:06d}" / "optimizer.safetensors")
    demo_question, demo_answer = answers(proc.stdout)[-1]
    assert demo_question == DEMO_QUESTION and demo_answer and demo_answer in DEMO_CONTEXT


def test_predict_question_and_context(trained):
    backend, out, _ = trained
    context = "the movie was long . the music was very good and the actor was great ."
    proc = ok(run(["train_squad.py", "--predict", f"--init={out / 'best'}", f"--backend={backend}",
                          "--question", "what was the music ?", "--context", context, *WINDOWS]))
    [(question, answer)] = answers(proc.stdout)
    assert question == "what was the music ?" and answer and answer in context


def test_predict_questions_file(trained, tmp_path):
    """A JSON list and the same as JSON lines; one answer per question, from its own context.
    The second context (~80 words) takes several windows."""
    backend, out, _ = trained
    rows = [{"question": "who was sad ?", "context": "the actor was sad and the film was short ."},
            {"id": "long", "question": "what was quite nice ?",
             "context": " ".join(WORDS * 3) + " . the scene was quite nice !"}]
    for name, text in (("q.json", json.dumps(rows)), ("q.jsonl", "\n".join(json.dumps(r) for r in rows))):
        (tmp_path / name).write_text(text)
        proc = ok(run(["train_squad.py", "--predict", f"--init={out / 'best'}", f"--backend={backend}",
                              f"--questions_file={tmp_path / name}", *WINDOWS]))
        found = answers(proc.stdout)
        assert [q for q, _ in found] == [r["question"] for r in rows], name
        for (_, answer), row in zip(found, rows):
            assert answer and answer in row["context"], name


def test_eval_only_reproduces_the_best_checkpoint_metrics(trained, squad_dir):
    """--eval_only on best/ prints EM/F1 as JSON: the very numbers training recorded for it."""
    backend, out, _ = trained
    proc = ok(run(["train_squad.py", "--eval_only", f"--init={out / 'best'}", f"--backend={backend}",
                          f"--eval_data={squad_dir / 'eval.json'}", f"--out_dir={out / 'eval_only'}", *WINDOWS]))
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert metrics == checkpoint.load(str(out / "best")).state["metrics"]


# --- LoRA -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_saves_adapters_merges_and_predicts(backend, tiny_model_dir, squad_dir, tmp_path):
    out = tmp_path / "lora"
    proc = ok(run(squad_args(tiny_model_dir, squad_dir, out, backend, "--epochs=1", "--lora=2")))
    assert "trainable parameters 290 of" in proc.stdout  # 2 layers x (query, value) x 2 x (16 + 16) + 34
    files = set(os.listdir(out / "best"))
    assert "adapter.safetensors" in files and "model.safetensors" not in files
    adapter = load_file(out / "best" / "adapter.safetensors")
    assert set(adapter) == {f"bert.encoder.layer.{i}.attention.self.{t}.{ab}" for i in range(2)
                            for t in ("query", "value") for ab in ("lora_A", "lora_B")} | {"qa_outputs.weight",
                                                                                          "qa_outputs.bias"}
    merged = out / "merged" / "model.safetensors"
    assert os.path.getsize(out / "best" / "adapter.safetensors") < os.path.getsize(merged) / 5
    assert not any("lora" in k for k in load_file(merged))
    demo_answer = answers(proc.stdout)[-1][1]
    assert demo_answer and demo_answer in DEMO_CONTEXT

    # merged/ is a plain checkpoint, and it computes what the adapter checkpoint computes
    models, E = load_backend(backend)
    plain = models.BertForQuestionAnswering.from_pretrained(str(out / "merged"))
    adapted, _ = load_qa_model(models, str(out / "best"))
    batch = {"input_ids": np.array([[2, 10, 11, 3, 12, 13, 14, 3]], np.int32),
             "attention_mask": np.ones((1, 8), np.int32), "token_type_ids": np.array([[0] * 4 + [1] * 4], np.int32)}
    np.testing.assert_allclose(E.predict(plain, batch)["start_logits"], E.predict(adapted, batch)["start_logits"],
                               rtol=0, atol=1e-5)

    context = "the plot was not very good but the music was great ."
    pred = ok(run(["train_squad.py", "--predict", f"--init={out / 'best'}", f"--backend={backend}",
                          "--question", "what was great ?", "--context", context, *WINDOWS]))
    [(_, answer)] = answers(pred.stdout)
    assert answer and answer in context


# --- resume ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend, lora", [("torch", 0), ("mlx", 0), ("torch", 2)])
def test_resume_equals_straight_run(backend, lora, tiny_model_dir, squad_dir, tmp_path):
    """6 steps straight vs 3 steps, checkpoint, new process, --resume, 3 more: the same weights,
    bit for bit. Step 3 is mid-epoch (4 batches per epoch), dropout is on, the schedule has
    warmup + decay. With LoRA the checkpoint holds only adapters + head; the base comes from
    --init again."""
    args = ["--max_steps=6", "--eval_every=3", "--max_checkpoints=5", "--warmup=2", f"--lora={lora}"]
    ok(run(squad_args(tiny_model_dir, squad_dir, tmp_path / "straight", backend, *args)))
    # What a run killed after step 3 leaves: ckpt-000003, and best/ (step 3 was its only evaluation).
    for name in ("ckpt-000003", "best"):
        shutil.copytree(tmp_path / "straight" / "ckpt-000003", tmp_path / "resumed" / name)
    proc = ok(run(squad_args(tiny_model_dir, squad_dir, tmp_path / "resumed", backend, *args, "--resume")))
    assert "resuming from" in proc.stdout
    straight = checkpoint.load(str(tmp_path / "straight" / "ckpt-000006")).model
    resumed = checkpoint.load(str(tmp_path / "resumed" / "ckpt-000006")).model
    assert straight.keys() == resumed.keys()
    for k in straight:  # bit for bit, in both twins
        np.testing.assert_array_equal(resumed[k], straight[k], err_msg=k)
    half = checkpoint.load(str(tmp_path / "straight" / "ckpt-000003")).model
    assert any(np.abs(half[k] - straight[k]).max() > 1e-4 for k in half)  # the last 3 steps did train


# --- bad input: one line, non-zero exit -----------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--train_data=TRUNCATED"], "error: TRUNCATED line 1 column * not valid JSON"),
    (["--train_data=NO_QAS"], "error: NO_QAS: data[0].paragraphs[0]: missing 'qas'"),
    (["--max_lenght=32"], "error: command line: unknown setting 'max_lenght'"),
    (["--train_articles=x:y"], "error: setting 'train_articles' must be a slice of articles like 0:24, got 'x:y'"),
    (["--predict", "--questions_file=QUESTIONS"],
     "error: QUESTIONS: question 1 needs a non-empty 'question' and 'context'"),
])
def test_bad_input_is_one_clear_line(args, message, tiny_model_dir, squad_dir, tmp_path):
    squad = json.loads((squad_dir / "train.json").read_text())
    files = {"TRUNCATED": tmp_path / "truncated.json", "NO_QAS": tmp_path / "no_qas.json",
             "QUESTIONS": tmp_path / "questions.json"}
    files["TRUNCATED"].write_text(json.dumps(squad)[:-20])
    del squad["data"][0]["paragraphs"][0]["qas"]
    files["NO_QAS"].write_text(json.dumps(squad))
    files["QUESTIONS"].write_text(json.dumps([{"question": "who ?", "context": "the actor ."},
                                              {"question": "what ?", "context": "  "}]))
    for name, path in files.items():
        args = [a.replace(name, str(path)) for a in args]
        message = message.replace(name, str(path))
    proc = run(squad_args(tiny_model_dir, squad_dir, tmp_path / "out", "torch", *args), timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert re.fullmatch(re.escape(message).replace(r"\*", r"\d+:") + ".*", lines[-1]), proc.stderr
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in proc.stderr
