"""Throughput as the job reports it: the window since the last log line leaves evaluation and checkpoint time
out, the steady state is the median step after the warm-up, and MFU counts FLOPs as Megatron and PaLM do."""

import time

import pytest
import torch

from helpers.training import run_training, tiny_test_recipe
from ssa_megatron.config import load_recipe
from ssa_megatron.training import metrics
from ssa_megatron.training.metrics import Throughput


def _throughput(monkeypatch, clock):
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock[0])
    return Throughput(load_recipe("tiny"), world_size=1, device=torch.device("cpu"))


def test_window_and_steps_leave_out_excluded_time(monkeypatch):
    clock = [100.0]
    tp = _throughput(monkeypatch, clock)
    clock[0] += 2.0
    assert tp.step_done(1000) == pytest.approx(2.0)
    with tp.excluded():  # an evaluation of 5 s between two steps
        clock[0] += 5.0
    clock[0] += 1.0
    assert tp.step_done(1000) == pytest.approx(1.0)
    window = tp.read()
    assert window["throughput/tokens_per_s"] == pytest.approx(2000 / 3.0)
    clock[0] += 4.0
    tp.step_done(1000)
    assert tp.read()["throughput/tokens_per_s"] == pytest.approx(1000 / 4.0)  # the window restarted


def test_steady_state_is_the_median_after_the_warmup(monkeypatch):
    clock = [0.0]
    tp = _throughput(monkeypatch, clock)
    for seconds in (30.0, 3.0, 2.0, 1.0, 1.2, 0.9, 5.0):  # three warm-up steps, then four
        clock[0] += seconds
        tp.step_done(4096)
    steady = tp.steady()
    assert steady["steps"] == 4 and steady["first_step_seconds"] == pytest.approx(30.0)
    assert steady["step_seconds"] == pytest.approx(1.2)  # median of 1.0, 1.2, 0.9, 5.0 (upper middle)
    assert steady["throughput/tokens_per_s"] == pytest.approx(4096 / 1.2)
    assert "mfu" not in " ".join(steady)  # no peak FLOP/s known on the CPU
    short = _throughput(monkeypatch, clock)
    clock[0] += 1.0
    short.step_done(10)
    assert short.steady() is None


def test_mfu_leaves_out_the_input_embedding():
    tied = load_recipe("ssa_1b")
    untied = load_recipe("ssa_1b", ["model.tie_embeddings=false"])
    m = tied.model
    # The output layer multiplies every token whether or not it shares its weight with the input embedding.
    assert metrics.matmul_parameters(tied) == metrics.matmul_parameters(untied)
    assert metrics.parameter_count(untied) - metrics.parameter_count(tied) == m.vocab_size * m.hidden_size
    assert metrics.parameter_count(tied) == metrics.matmul_parameters(tied)
    attention = 6 * m.num_layers * m.num_attention_heads * m.head_dim * m.seq_length
    assert metrics.model_flops_per_token(untied) == 6 * metrics.matmul_parameters(untied) + attention


@pytest.mark.slow
def test_the_run_reports_a_steady_state(tmp_path, capsys):
    result = run_training(tiny_test_recipe(tmp_path / "run", "train.steps=6", "checkpoint.interval=0"))
    assert result.steady is not None and result.steady["steps"] == 3
    assert result.steady["throughput/tokens_per_s"] > 0 and result.peak_memory_gib > 0
    assert "steady state over 3 steps:" in capsys.readouterr().out


def test_compile_caches_keep_triton_and_give_inductor_a_fresh_dir(monkeypatch, tmp_path):
    from ssa_megatron.training import compile_caches

    for var in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SSA_MEGATRON_CACHE", str(tmp_path / "cache"))
    compile_caches.configure()
    import os

    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "cache" / "triton")  # outlives the launch
    inductor = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    assert os.path.isdir(inductor) and not inductor.startswith(str(tmp_path / "cache"))  # per launch
    monkeypatch.setenv("TRITON_CACHE_DIR", "/mine")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/mine2")
    compile_caches.configure()
    assert os.environ["TRITON_CACHE_DIR"] == "/mine" and os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/mine2"


def test_a_step_report_keeps_its_values_while_the_next_step_records():
    """The loop reads a step's report while the next step runs: the tracker must start the next step empty, and
    the report must give this step's losses (per mode), SSA values and stop vote, as the synchronous reductions do."""
    from types import SimpleNamespace

    from ssa_megatron.megatron.tracker import SSAMetricsTracker
    from ssa_megatron.training.step import StepReport, reduce_lm_losses

    dims = SimpleNamespace(device=torch.device("cpu"), is_last_stage=True, tp_rank=0)
    reports = [{"lm_sum": torch.tensor(6.0), "tokens": torch.tensor(3.0), "mode": "full"},
               {"lm_sum": torch.tensor(2.0), "tokens": torch.tensor(4.0), "mode": "sparse"}]
    tracker = SSAMetricsTracker()
    for layer, value in ((1, 0.5), (2, 1.5), (2, 2.5)):
        tracker.record("alignment_loss", layer, 2, torch.tensor(value))
    tracker.record_mode(0, "full")
    report = StepReport(7, reports, dims, tracker, stop_vote=True, num_layers=2, mark=time.perf_counter)
    tracker.record("alignment_loss", 1, 2, torch.tensor(100.0))  # the next step, before the report is read
    lm, stop, ssa = report.read()
    assert lm == reduce_lm_losses(reports, dims) and lm["loss/lm"] == pytest.approx(8 / 7)
    assert lm["loss/lm_full"] == pytest.approx(2.0) and lm["loss/lm_sparse"] == pytest.approx(0.5) and stop
    assert ssa["alignment_loss/layer_1"] == 0.5 and ssa["alignment_loss/layer_2"] == pytest.approx(2.0)
    assert ssa["alignment_loss"] == pytest.approx(1.25) and ssa["microbatches_full"] == 1.0
    assert tracker.reduce()["alignment_loss/layer_1"] == 100.0  # the next step's own value only


def test_prefetched_batches_keep_the_checkpointed_position():
    """The loop fetches step N + 1's batches while step N runs; a checkpoint after step N must still hold the
    position before them, and a resumed feed serves exactly the batches the uninterrupted one serves."""
    from ssa_megatron.data.synthetic import SyntheticTokens
    from ssa_megatron.training.step import StepBatches

    def loader():
        return SyntheticTokens(vocab_size=97, seq_length=16, micro_batch_size=1, seed=3)

    feed = StepBatches(loader(), 2, torch.device("cpu"))
    feed.next_step(1)
    before = feed.state_dict()
    feed.prefetch()
    assert feed.state_dict() == before  # the prefetched step is not counted
    served = [b["tokens"] for b in feed.next_step(1)[0]]
    assert feed.state_dict() != before
    resumed = StepBatches(loader(), 2, torch.device("cpu"))
    resumed.load_state_dict(before)
    again = [b["tokens"] for b in resumed.next_step(1)[0]]
    assert len(served) == 2 and all(torch.equal(a, b) for a, b in zip(served, again))
