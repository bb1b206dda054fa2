"""nanobert.report: the README's and docs' tables are what the records in results/ render,
byte for byte, so no figure can drift from its record."""

import json
import os

import pytest

from nanobert import report


@pytest.mark.parametrize("name", report.DOCS)
def test_every_table_in_the_docs_is_what_its_records_render(name):
    with open(os.path.join(report.ROOT, name), encoding="utf-8") as f:
        text = f.read()
    assert report.render(text, name) == text, f"{name}: run `python -m nanobert.report` and commit the result"


def test_readme_and_docs_have_their_tables():
    names = {}
    for doc in report.DOCS:
        with open(os.path.join(report.ROOT, doc), encoding="utf-8") as f:
            names[doc] = f.read().count("<!-- table: ")
    assert set(report.DOCS) >= {"README.md", "docs/results.md", "docs/cpu-speed.md", "docs/gpu.md"}
    assert names["README.md"] >= 4 and names["docs/results.md"] >= 6
    with open(os.path.join(report.ROOT, "README.md"), encoding="utf-8") as f:
        assert len(f.read().splitlines()) <= 300


def test_every_record_is_complete():
    """Each run record belongs to a known row, has that row's metrics, and says where it came
    from: a commit (a run of this code) or a source (copied, with its provenance)."""
    runs = report.load("runs")
    assert runs
    for r in runs:
        assert r["row"] in report.ROWS and r["impl"] in report.IMPLS, r["file"]
        assert all(m in r["metrics"] for m, _ in report.ROWS[r["row"]][1]), r["file"]
        assert r.get("commit") or r.get("source"), r["file"]
        assert r["file"].endswith(f"{r['row']}-{r['impl']}-s{r['seed']}.json")
    for b in report.load("bench"):
        assert b["cpu"] and b["command"] and (b.get("commit") or b.get("source")), b["file"]
        assert {r["workload"] for r in b["results"]} <= set(report.WORKLOADS), b["file"]


def write(path, record):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def test_runs_of_this_code_replace_copied_figures(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RESULTS", str(tmp_path))
    monkeypatch.setattr(report, "ROOT", str(tmp_path))
    copied = {"row": "mrpc", "impl": "torch", "seed": 0, "source": "an old README",
              "metrics": {"dev_accuracy": 70.0, "dev_f1": 80.0}}
    write(tmp_path / "runs" / "mrpc-torch-s0.json", copied)
    assert "acc 70.00 / F1 80.00 (seed 0) †" in "\n".join(report.quality_table(["mrpc"]))
    for seed, acc in ((0, 78.0), (1, 80.0)):
        write(tmp_path / "runs" / f"mrpc-torch-s{seed}x.json",
              {**copied, "seed": seed, "source": None, "commit": "abc", "train_s": 100.0 * (seed + 1),
               "metrics": {"dev_accuracy": acc, "dev_f1": 85.0}})
    table = "\n".join(report.quality_table(["mrpc"]))
    assert "acc 79.00 / F1 85.00 (2 seeds, 150 s) |" in table and "70.00" not in table
    seeds = report.seeds_table("mrpc")
    assert len(seeds) == 2 + 3 and "`abc`" in seeds[2] and "`abc`" in seeds[3] and "† an old README" in seeds[4]


def test_render_rewrites_only_the_blocks_and_names_bad_ones():
    text = "intro\n<!-- table: mlm -->\nstale\n<!-- /table -->\noutro\n"
    out = report.render(text, "X.md")
    assert out.startswith("intro\n<!-- table: mlm -->\n| run |") and out.endswith("\n<!-- /table -->\noutro\n")
    assert "stale" not in out and report.render(out, "X.md") == out
    with pytest.raises(ValueError, match="X.md: unknown table 'nope'"):
        report.render("<!-- table: nope -->\n<!-- /table -->", "X.md")
    with pytest.raises(ValueError, match="X.md: table 'mlm' has no closing"):
        report.render("<!-- table: mlm -->\n", "X.md")


def test_add_files_a_finished_run(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RESULTS", str(tmp_path / "results"))
    out = tmp_path / "out"
    write(out / "run.json", {"commit": "abc", "settings": {"backend": "mlx", "seed": 2},
                             "metrics": {"dev_accuracy": 80.0}})
    path = report.add(str(out), "sst2")
    assert path == str(tmp_path / "results" / "runs" / "sst2-mlx-s2.json")
    record = json.loads(open(path).read())
    assert (record["row"], record["impl"], record["seed"], record["commit"]) == ("sst2", "mlx", 2, "abc")
    with pytest.raises(ValueError, match="unknown row 'sst3'"):
        report.add(str(out), "sst3")
    with pytest.raises(ValueError, match="run.json: no such file"):
        report.add(str(tmp_path / "missing"), "sst2")
    assert report.main(["add", str(tmp_path / "missing"), "sst2"]) == 2


def test_check_exits_1_when_a_table_is_stale(tmp_path, monkeypatch, capsys):
    (tmp_path / "README.md").write_text("<!-- table: mlm -->\nstale\n<!-- /table -->\n")
    monkeypatch.setattr(report, "ROOT", str(tmp_path))
    monkeypatch.setattr(report, "DOCS", ["README.md"])
    assert report.main(["--check"]) == 1 and "README.md: tables differ" in capsys.readouterr().out
    assert "stale" in (tmp_path / "README.md").read_text()  # --check changes nothing
    assert report.main([]) == 0 and report.main(["--check"]) == 0


def test_speed_tables_show_each_cpus_newest_record(tmp_path, monkeypatch):
    """The README shows each CPU's newest bench record by date, whatever the file names; a
    copied record (no date) counts as the oldest."""
    monkeypatch.setattr(report, "RESULTS", str(tmp_path))
    monkeypatch.setattr(report, "ROOT", str(tmp_path))
    base = {"cpu": "CPU A", "cores": 2, "command": "python bench.py", "torch_linears": "oneDNN",
            "gemm_peak_gflops": {"torch": 100}}
    result = {"workload": "cls", "impl": "hf", "vs_hf": 1.0, "tokens_per_s": 1000.0}
    write(tmp_path / "bench" / "a-copied.json", {**base, "source": "an issue", "results": [result]})
    write(tmp_path / "bench" / "a-2026-12-06.json", {**base, "commit": "new", "date": "2026-12-06", "results": [result]})
    write(tmp_path / "bench" / "a-2026-12-05.json", {**base, "commit": "old", "date": "2026-12-05", "results": [result]})
    newest = "\n".join(report.speed_tables(latest_only=True))
    assert "commit `new`" in newest and "commit `old`" not in newest and "an issue" not in newest
    every = "\n".join(report.speed_tables(latest_only=False))
    assert every.index("an issue") < every.index("commit `old`") < every.index("commit `new`")
