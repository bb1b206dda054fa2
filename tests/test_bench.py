"""bench.py times the same work three ways: HF's model and both twins loaded from the
checkpoint HF saved, on the same batch. Building a workload must leave no files behind
(each build writes a checkpoint: 87 MiB here, 418 MiB for bert-base)."""

import tempfile

import numpy as np

import bench


def test_workload_runs_one_model_three_ways_and_leaves_no_files(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the build's checkpoint goes
    steps, flops, tokens = bench.build("qa_infer")
    assert not list(tmp_path.rglob("*.safetensors")) and not list(tmp_path.glob("tmp*"))
    assert set(steps) == {"hf", "torch", "mlx"} and tokens == 16 * 384
    assert flops["hf"] == flops["torch"] == flops["mlx"] > 0  # no dense head to tell them apart
    out = {impl: step() for impl, step in steps.items()}
    for impl in ("torch", "mlx"):
        for name in ("start_logits", "end_logits"):
            np.testing.assert_allclose(out[impl][name], out["hf"][name].numpy(), atol=1e-3, rtol=0)
