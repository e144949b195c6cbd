"""tools/bench_training.py runs ssa-train's own loop: one process, and under torchrun (data parallel 2 over gloo on
CPU), where --micro-batches is per data-parallel rank and rank 0 alone reports."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHAPE = ["--device", "cpu", "--layers", "2", "--seq", "128", "--micro-batches", "2", "--steps", "1",
         "--fallback-layers", "0", "model.hidden_size=64", "model.ffn_hidden_size=128",
         "model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=512", "ssa.block_size=16",
         "ssa.top_k=2"]


@pytest.mark.slow
def test_bench_training_under_torchrun_reports_the_data_parallel_job(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "tools" / "bench_training.py"), "--modes", "ssa", "--json", str(out), *SHAPE],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    (row,) = report["results"]
    assert row["mode"] == "ssa" and row["micro_batches"] == 2 and row["step_ms"] > 0
    # both ranks' tokens count: 2 ranks x 2 micro-batches x 128 tokens per step
    assert row["tokens_per_s"] == pytest.approx(2 * 2 * 128 / (row["step_ms"] / 1e3), rel=1e-6)
    assert proc.stdout.count("bench_training: wrote") == 1  # rank 0 alone reports
    assert "2 process(es)" in proc.stdout
