"""Signals to the whole process group: what ``timeout``, ``scancel``, preemption and Ctrl-C deliver.

The training process finishes the step, checkpoints and exits 0; its DataLoader workers ignore the signal
(``loader.WORKER_IGNORED_SIGNALS``) instead of dying and taking the step down with "DataLoader worker ... killed by
signal". The slow tests run ``ssa-train`` in its own session on CPU, signal the group mid-run, and relaunch: the
resumed run ends with the losses of an uninterrupted one.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from helpers.training import run_training, tiny_test_recipe
from ssa_megatron.config import to_dict
from ssa_megatron.data.loader import WORKER_IGNORED_SIGNALS, TokenLoader
from ssa_megatron.training.stop import StopFlag

REPO = Path(__file__).resolve().parent.parent
SEQ = 64  # the tiny test model's seq_length
STEPS = 16  # room for the test to read the log line late: the run must still be going when signalled


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """About 50 rows of 65 tokens in 8-row shards, from a 300-token BPE (the test model has 320 ids)."""
    from ssa_megatron.data.prepare import prepare_shards
    from ssa_megatron.data.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("signal_data")
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.choice([10, 40, 120]))) for _ in range(60)]
    (root / "inputs").mkdir()
    for i, doc in enumerate(docs):
        (root / "inputs" / f"d{i:03d}.txt").write_text(doc)
    tokenizer = train_bpe(docs, 300, root / "tokenizer.json")
    prepare_shards([root / "inputs"], root / "shards", tokenizer, SEQ, rows_per_shard=8, workers=0, progress=False,
                   log=lambda line: None)
    return root / "shards"


def _overrides(shards: Path, num_workers: int) -> list[str]:
    return [f"data.train_shards={shards}", f"data.num_workers={num_workers}", "model.vocab_size=320",
            f"train.steps={STEPS}", "train.log_interval=1", "checkpoint.interval=100"]


# ------------------------------------------------------------------------------------------------------------
# In-process pieces (quick).

def test_stop_flag_handles_what_the_workers_ignore():
    assert set(StopFlag.SIGNALS) <= set(WORKER_IGNORED_SIGNALS)
    assert signal.SIGINT in StopFlag.SIGNALS and signal.SIGTERM in StopFlag.SIGNALS


def test_sigint_is_a_stop_request_and_a_second_one_does_not_abandon_it(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    stop = StopFlag(True, tmp_path / "STOP", is_main=True)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # torchrun forwards the group's signal: each rank may see it twice
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.agree(stop.requested()) and stop.name == "SIGINT"
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is before


def test_data_workers_survive_the_signals_and_the_stream_is_unchanged(shards):
    def make():
        return TokenLoader(shards, SEQ, micro_batch_size=2, num_workers=2, seed=3)

    reference = [b for _, b in zip(range(8), make())]
    it = iter(make())
    got = [next(it) for _ in range(2)]  # the workers are running
    assert not set(WORKER_IGNORED_SIGNALS) & signal.pthread_sigmask(signal.SIG_BLOCK, []), "mask restored"
    workers = multiprocessing.active_children()
    assert len(workers) == 2
    for worker in workers:
        for sig in WORKER_IGNORED_SIGNALS:
            os.kill(worker.pid, sig)
    time.sleep(0.3)
    got += [next(it) for _ in range(6)]
    assert all(w.is_alive() for w in workers)
    it.close()
    for a, b in zip(got, reference):
        assert all(torch.equal(a[k], b[k]) for k in b)


# ------------------------------------------------------------------------------------------------------------
# ssa-train in its own process group (slow: a subprocess imports torch and Megatron, ~7 s on 2 cores).

_references: dict[int, list[float]] = {}


def _reference_losses(tmp_path_factory, shards: Path, num_workers: int) -> list[float]:
    """Losses of an uninterrupted run (in this process), once per worker count: the sample order depends on it."""
    if num_workers not in _references:
        run_dir = tmp_path_factory.mktemp(f"uninterrupted_{num_workers}")
        _references[num_workers] = run_training(tiny_test_recipe(run_dir, *_overrides(shards, num_workers))).losses
    return _references[num_workers]


@pytest.mark.slow
@pytest.mark.parametrize("sig, num_workers", [
    (signal.SIGTERM, 0), (signal.SIGTERM, 1), (signal.SIGTERM, 2), (signal.SIGINT, 0), (signal.SIGINT, 2)])
def test_signal_to_the_process_group_checkpoints_exits_0_and_resumes(tmp_path, tmp_path_factory, shards, sig,
                                                                       num_workers):
    overrides = _overrides(shards, num_workers)
    run_dir = tmp_path / "run"
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(to_dict(tiny_test_recipe(run_dir, *overrides))))

    proc = subprocess.Popen(
        [sys.executable, "-m", "ssa_megatron.training.cli", str(recipe_file)], cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    watchdog = threading.Timer(120, os.killpg, (proc.pid, signal.SIGKILL))
    watchdog.start()
    lines, sent_after = [], None
    try:
        for line in proc.stdout:
            lines.append(line)
            logged = re.match(r"step +(\d+)/", line)
            if sent_after is None and logged and int(logged.group(1)) >= 2:
                os.killpg(proc.pid, sig)  # the group: the training process and its data workers
                sent_after = int(logged.group(1))
        code = proc.wait()
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = "".join(lines)
    assert sent_after is not None, out
    assert code == 0, out
    assert "killed by signal" not in out and "Traceback" not in out, out
    stopped = re.search(rf"stopping at step (\d+) on {sig.name}", out)
    assert stopped, out
    step = int(stopped.group(1))
    assert sent_after <= step < STEPS
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"

    reference = _reference_losses(tmp_path_factory, shards, num_workers)
    printed = [float(m) for m in re.findall(r"^step +\d+/\d+ \| loss (\S+)", out, re.M)]
    assert printed == [round(x, 4) for x in reference[:step]]
    resumed = run_training(tiny_test_recipe(run_dir, *overrides))  # the relaunch
    assert resumed.start_step == step and resumed.end_step == STEPS
    assert resumed.losses == reference[step:]  # bitwise
    assert not list(run_dir.glob("recipe.*.yaml"))  # the same recipe: no history entry
