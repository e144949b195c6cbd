"""Checkpoints: atomic writes (a kill mid-save leaves `latest` on the last good checkpoint, which loads),
keep-last pruning, and the contents a resume needs."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ssa_megatron.training import checkpoint as ckpt_lib
from helpers.training import run_training, tiny_test_recipe

ROOT = Path(__file__).resolve().parent.parent


def _latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


@pytest.mark.slow
def test_exception_mid_save_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    first = run_training(tiny_test_recipe(run_dir, "train.steps=6", "checkpoint.interval=3"), max_steps=3)
    assert _latest(run_dir) == "step_00000003"

    real_save = ckpt_lib.dist_checkpointing.save

    def dying_save(state, directory):
        real_save(state, directory)  # the shards are on disk ...
        raise KeyboardInterrupt("killed mid-save")  # ... but the save never completes

    monkeypatch.setattr(ckpt_lib.dist_checkpointing, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run_training(tiny_test_recipe(run_dir, "train.steps=6", "checkpoint.interval=3"))
    ckpts = run_dir / "checkpoints"
    assert _latest(run_dir) == "step_00000003"
    assert (ckpts / ".tmp-step_00000006").is_dir() and not (ckpts / "step_00000006").exists()

    # The last good checkpoint loads and the run finishes; the stale temporary directory is cleaned up.
    monkeypatch.setattr(ckpt_lib.dist_checkpointing, "save", real_save)
    rest = run_training(tiny_test_recipe(run_dir, "train.steps=6", "checkpoint.interval=3"))
    assert rest.start_step == 3 and rest.end_step == 6
    assert len(first.losses + rest.losses) == 6
    assert _latest(run_dir) == "step_00000006"
    assert not list(ckpts.glob(".tmp-*"))


KILLED_SAVE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from ssa_megatron.training import checkpoint as ckpt_lib
    from helpers.training import run_training, tiny_test_recipe

    run_dir, marker = Path(sys.argv[1]), Path(sys.argv[2])
    real_save = ckpt_lib.dist_checkpointing.save
    def slow_save(state, directory):
        if "step_00000006" in str(directory):
            real_save(state, directory)
            marker.write_text("writing")
            time.sleep(120)  # SIGKILLed here: shards written, not yet renamed or marked latest
        else:
            real_save(state, directory)
    ckpt_lib.dist_checkpointing.save = slow_save
    if __name__ == "__main__":
        run_training(tiny_test_recipe(run_dir, "train.steps=9", "checkpoint.interval=3"))
""")


@pytest.mark.slow
def test_sigkill_during_save(tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "saving"
    script = tmp_path / "killed_save.py"
    script.write_text(KILLED_SAVE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))  # ssa_megatron, helpers
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir), str(marker)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"training exited early: {proc.stderr.read().decode()[-3000:]}")
            if time.time() > deadline:
                pytest.fail("the save of step 6 never started")
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    ckpts = run_dir / "checkpoints"
    assert _latest(run_dir) == "step_00000003"
    assert (ckpts / ".tmp-step_00000006").is_dir()
    checkpointer = ckpt_lib.Checkpointer(ckpts, keep_last=2)
    assert checkpointer.latest() == ckpts / "step_00000003"
    assert checkpointer.read_train_state(checkpointer.latest())["step"] == 3
    resumed = run_training(tiny_test_recipe(run_dir, "train.steps=9", "checkpoint.interval=3"))
    assert resumed.start_step == 3 and resumed.end_step == 9


@pytest.mark.slow
def test_keep_last_prunes_and_contents(tmp_path):
    run_dir = tmp_path / "run"
    run_training(tiny_test_recipe(run_dir, "train.steps=8", "checkpoint.interval=2", "checkpoint.keep_last=2"))
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_")) == ["step_00000006",
                                                                                     "step_00000008"]
    assert _latest(run_dir) == "step_00000008"
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(ckpts / "step_00000008"))
    assert common["step"] == 8
    assert common["consumed_tokens"] == 8 * 4 * 64
    assert common["recipe"]["model"]["hidden_size"] == 64
    assert common["layout"] == {"tp": 1, "pp": 1, "cp": 1, "dp": 1, "vpp": None, "world_size": 1}
    assert common["scheduler"]["step_count"] == 8
    info = ckpt_lib.Checkpointer.read_train_state(ckpts / "step_00000008")
    assert info["step"] == 8 and info["consumed_tokens"] == 8 * 4 * 64


def test_marker_naming_an_incomplete_checkpoint_is_an_error(tmp_path):
    ckpts = tmp_path / "checkpoints"
    (ckpts / "step_00000005").mkdir(parents=True)
    (ckpts / "latest").write_text("step_00000005\n")
    with pytest.raises(RuntimeError, match="not a complete checkpoint"):
        ckpt_lib.Checkpointer(ckpts, keep_last=1).latest()
    assert ckpt_lib.Checkpointer(tmp_path / "none", keep_last=1).latest() is None
