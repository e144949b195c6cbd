"""Checkpoints: atomic writes (a kill mid-save leaves `latest` on the last good checkpoint, which loads),
keep-last pruning, the contents a resume needs, the manifest, and loading that runs no code from a checkpoint
(a crafted pickle in `.metadata`, in `common.pt` or among the pickled objects does not execute on resume, on
`checkpoint.load` or in convert_to_hf). The fault-injection tests are in tests/test_faults.py."""

import json
import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

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
    assert info["step"] == 8 and info["consumed_tokens"] == 8 * 4 * 64 and info["manifest"] == "manifest.json"
    # Every file is in the manifest, and the DCP metadata of a training checkpoint holds only the classes the
    # restricted unpickler admits (this fails when a new torch or Megatron writes another one).
    manifest = json.loads((ckpts / "step_00000008" / "manifest.json").read_text())
    assert set(manifest["files"]) == {p.name for p in (ckpts / "step_00000008").iterdir()} - {"manifest.json"}
    assert ckpt_lib.verify_checkpoint(ckpts / "step_00000008").status == "ok"
    assert ckpt_lib.read_dcp_metadata(ckpts / "step_00000008").state_dict_metadata


def test_marker_naming_an_incomplete_checkpoint_is_an_error(tmp_path):
    ckpts = tmp_path / "checkpoints"
    (ckpts / "step_00000005").mkdir(parents=True)
    (ckpts / "latest").write_text("step_00000005\n")
    with pytest.raises(ckpt_lib.CheckpointError, match="not a complete checkpoint"):
        ckpt_lib.Checkpointer(ckpts, keep_last=1).latest()
    with pytest.raises(ckpt_lib.CheckpointError, match=r"no usable checkpoint in .*step_00000005: train_state.json: "
                                                       r"missing \(an incomplete checkpoint\)"):
        ckpt_lib.Checkpointer(ckpts, keep_last=1).newest_usable()
    assert ckpt_lib.Checkpointer(tmp_path / "none", keep_last=1).latest() is None
    assert ckpt_lib.Checkpointer(tmp_path / "none", keep_last=1).newest_usable() is None


# ------------------------------------------------------------------------------------------------------------
# Loading runs no code from a checkpoint, even from one whose writer also rewrote the manifest.

class Payload:
    """Unpickling this calls ``open(marker, "w")``: the marker file appears when a loader runs code from a
    checkpoint (any callable would do; this one is harmless)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant_in_metadata(ckpt: Path, marker: Path) -> None:
    """A valid DCP ``.metadata`` that also carries the payload; the manifest rewritten to match."""
    metadata = ckpt_lib.read_dcp_metadata(ckpt)
    metadata.planner_data = Payload(marker)
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    _live(lambda: pickle.loads((ckpt / ".metadata").read_bytes()), marker)
    ckpt_lib.write_manifest(ckpt)


def plant_common_pt(ckpt: Path, marker: Path) -> None:
    """A legacy ``common.pt`` (which Megatron's load_common_state_dict reads first) carrying the payload."""
    torch.save({"step": 2, "recipe": Payload(marker)}, ckpt / "common.pt")
    _live(lambda: torch.load(ckpt / "common.pt", weights_only=False), marker)
    ckpt_lib.write_manifest(ckpt)


def _live(load, marker: Path) -> None:
    """The payload is real: an unrestricted load runs it."""
    load()
    assert marker.exists()
    marker.unlink()


PLANTS = {"metadata": (plant_in_metadata, r"\.metadata: UnpicklingError: holds a pickled \S*open, which is not a "
                                          r"DCP metadata class \(refused\)"),
          "common.pt": (plant_common_pt, r"common\.pt: holds a pickled \S*open, which loading refuses")}


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("crafted") / "run"
    run_training(tiny_test_recipe(run_dir, "train.steps=3", "checkpoint.interval=1"), max_steps=2)
    return run_dir


def _copy_run(two_step_run, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(two_step_run / "checkpoints", run_dir / "checkpoints")
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["resume", "checkpoint.load", "convert_to_hf"])
@pytest.mark.parametrize("plant", list(PLANTS))
def test_crafted_pickle_does_not_execute(two_step_run, tmp_path, entry, plant, caplog):
    """Step 2 carries a payload: each entry point refuses it, names the file, and uses step 1 where it may choose."""
    run_dir, marker = _copy_run(two_step_run, tmp_path), tmp_path / "executed"
    crafted = run_dir / "checkpoints" / "step_00000002"
    plant_fn, refusal = PLANTS[plant]
    plant_fn(crafted, marker)
    with caplog.at_level(logging.WARNING, logger=ckpt_lib.__name__):
        if entry == "resume":
            result = run_training(tiny_test_recipe(run_dir, "train.steps=3", "checkpoint.interval=1"))
            assert result.start_step == 1 and result.end_step == 3
            assert any(re.search(refusal, r.getMessage()) for r in caplog.records)
        elif entry == "checkpoint.load":
            with pytest.raises(ckpt_lib.CheckpointError, match=refusal):
                run_training(tiny_test_recipe(tmp_path / "fresh", "train.steps=1", f"checkpoint.load={crafted}"))
            result = run_training(tiny_test_recipe(tmp_path / "fresh2", "train.steps=1", f"checkpoint.load={run_dir}"))
            assert result.end_step == 1  # from step 1's weights
        else:
            sys.path.insert(0, str(ROOT / "tools"))
            import convert_to_hf

            with pytest.raises(ckpt_lib.CheckpointError, match=refusal):
                convert_to_hf.main([str(crafted), str(tmp_path / "hf")])
            assert convert_to_hf.main([str(run_dir), str(tmp_path / "hf")]) == 0  # step 1
            assert (tmp_path / "hf" / "model.safetensors").exists()
    assert not marker.exists(), "a pickle from the checkpoint ran"


@pytest.mark.slow
def test_pickled_objects_load_weights_only(tmp_path, monkeypatch):
    """A writer that puts a payload among the pickled objects (here the RNG state) and writes a valid manifest: the
    resume refuses it in one line instead of running it (every torch.load of a load is weights_only)."""
    run_dir, marker = tmp_path / "run", tmp_path / "executed"
    real = ckpt_lib.rng_state
    monkeypatch.setattr(ckpt_lib, "rng_state", lambda: {**real(), "extra": Payload(marker)})
    run_training(tiny_test_recipe(run_dir, "train.steps=2", "checkpoint.interval=1"), max_steps=1)
    monkeypatch.setattr(ckpt_lib, "rng_state", real)
    assert ckpt_lib.verify_checkpoint(run_dir / "checkpoints" / "step_00000001").status == "ok"
    with pytest.raises(ckpt_lib.CheckpointError, match=r"step_00000001.*holds a pickled \S*open, which loading "
                                                       r"refuses \(weights_only"):
        run_training(tiny_test_recipe(run_dir, "train.steps=2", "checkpoint.interval=1"))
    assert not marker.exists(), "a pickle from the checkpoint ran"
