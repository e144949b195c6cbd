"""Fault injection, the faults a user meets: SIGKILL at moments of a save, damaged checkpoint files of every kind
(bytes flipped, truncated, emptied, deleted, a file planted), a deleted or stale ``latest`` marker.

After each, no good state is lost: verification names the damaged file, resume falls back to the newest good
checkpoint and continues the loss curve of an uninterrupted run bitwise (CPU, fp32), and pruning kept that
checkpoint. Signals to the whole process group are in tests/test_faults_signals.py.
"""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers.training import run_training, tiny_test_recipe
from ssa_megatron.training import checkpoint as ckpt_lib
from ssa_megatron.training.checkpoint import CheckpointError, Checkpointer, read_dcp_metadata, verify_checkpoint

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import verify_checkpoint as verify_tool  # noqa: E402  (tools/ is not a package)

STEPS = ["train.steps=6", "checkpoint.interval=3", "checkpoint.keep_last=2"]
"""The runs below: checkpoints at steps 3 and 6, both kept."""


# ------------------------------------------------------------------------------------------------------------
# Damage, as a disk, a copy or an editor does it.

def flip(path: Path, offset: int | None = None, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    start = len(data) // 2 if offset is None else offset
    for i in range(start, min(start + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path, size: int | None = None) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2 if size is None else size)


def item_offset(ckpt: Path, prefix: str) -> tuple[str, int]:
    """The shard file and byte offset of the first item whose key starts with ``prefix`` (a tensor or a pickled
    object: RNG state, data position, common state)."""
    for index, info in read_dcp_metadata(ckpt).storage_data.items():
        if index.fqn.startswith(prefix):
            return info.relative_path, info.offset + info.length // 2
    raise AssertionError(f"no item {prefix!r} in {ckpt}")


def damage(ckpt: Path, how: str) -> str:
    """Applies fault ``how`` (``<fault>:<file or distcp item>``) to checkpoint ``ckpt``; returns the damaged file."""
    fault, _, target = how.partition(":")
    if target.startswith("distcp@"):
        name, offset = item_offset(ckpt, target.split("@", 1)[1])
        flip(ckpt / name, offset, count=8)
        return name
    name = next(ckpt.glob("*.distcp")).name if target == "distcp" else target
    path = ckpt / name
    if fault == "flip":
        flip(path)
    elif fault == "truncate":
        truncate(path)
    elif fault == "empty":
        truncate(path, 0)
    elif fault == "delete":
        path.unlink()
    elif fault == "plant":
        torch.save({"planted": 1}, path)
    else:
        raise ValueError(how)
    return name


# ------------------------------------------------------------------------------------------------------------
# Fast: every file kind of a checkpoint, damaged every way, is named; the next older checkpoint is chosen.

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``checkpoints/step_00000001`` and ``step_00000002`` with the kinds of content a training checkpoint holds:
    tensors, a per-rank RNG state, a data position and common state, written by the project's Checkpointer."""
    from helpers.megatron import init_megatron

    init_megatron()
    root = tmp_path_factory.mktemp("saved") / "checkpoints"
    for step in (1, 2):
        Checkpointer(root, keep_last=3).save(step, _state(step))
    return root


def _state(step: int) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    torch.manual_seed(step)
    return {"model": {"weight": ShardedTensor.from_rank_offsets("model.weight", torch.randn(64, 64), replica_id=0)},
            "rng_state": ShardedObject("rng_state", {"torch": torch.get_rng_state()}, (1,), (0,), replica_id=0),
            "data_state": ShardedObject("data_state", {"position": step}, (1,), (0,), replica_id=0),
            "step": step, "recipe": {"name": "faults"}}


@pytest.fixture
def ckpts(saved, tmp_path):
    root = tmp_path / "checkpoints"
    shutil.copytree(saved, root)
    return root


FILE_FAULTS = {
    "flip:distcp@model.weight": r"__0_0\.distcp: content differs from manifest\.json",
    "flip:distcp@rng_state": r"__0_0\.distcp: content differs",
    "flip:distcp@data_state": r"__0_0\.distcp: content differs",
    "flip:distcp@common_state": r"__0_0\.distcp: content differs",
    "flip:.metadata": r"\.metadata: content differs",
    "flip:metadata.json": r"metadata\.json: content differs",
    "flip:train_state.json": r"train_state\.json: content differs",
    "flip:manifest.json": r"manifest\.json: (unreadable|damaged|not a checkpoint manifest)",
    "truncate:distcp": r"__0_0\.distcp: \d+ bytes, manifest\.json says \d+",
    "truncate:.metadata": r"\.metadata: \d+ bytes, manifest\.json says",
    "truncate:train_state.json": r"train_state\.json: \d+ bytes",
    "truncate:manifest.json": r"manifest\.json: unreadable",
    "empty:.metadata": r"\.metadata: 0 bytes, manifest\.json says",
    "empty:metadata.json": r"metadata\.json: 0 bytes",
    "delete:distcp": r"__0_0\.distcp: missing \(listed in manifest\.json\)",
    "delete:.metadata": r"\.metadata: missing",
    "delete:train_state.json": r"train_state\.json: missing",
    "delete:manifest.json": r"manifest\.json: missing \(this checkpoint was written with one\)",
    "plant:common.pt": r"common\.pt: not in manifest\.json",
}


@pytest.mark.parametrize("how", list(FILE_FAULTS))
def test_damaged_file_is_named_and_the_older_checkpoint_chosen(ckpts, how, caplog, capsys):
    newest = ckpts / "step_00000002"
    damage(newest, how)
    verdict = verify_checkpoint(newest)
    assert verdict.status == "bad"
    assert re.match(FILE_FAULTS[how], verdict.problem), verdict.problem
    with caplog.at_level(logging.WARNING, logger=ckpt_lib.__name__):
        assert Checkpointer(ckpts, keep_last=2).newest_usable() == ckpts / "step_00000001"
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 1 and "step_00000002" in skipped[0] and verdict.problem in skipped[0]
    # The command-line check says the same in one line per checkpoint, and fails: the newest is bad.
    assert verify_tool.main([str(ckpts)]) == 1
    out = capsys.readouterr().out
    assert f"step_00000002: BAD: {verdict.problem}" in out and "step_00000001: ok" in out
    assert "a resume would use step_00000001" in out.splitlines()[-1]


def _strip_manifest(ckpt: Path) -> None:
    """What a checkpoint written before manifests looks like."""
    (ckpt / "manifest.json").unlink()
    state = json.loads((ckpt / "train_state.json").read_text())
    del state["manifest"]
    (ckpt / "train_state.json").write_text(json.dumps(state))


@pytest.mark.parametrize("how,problem", [
    (None, None),
    ("truncate:distcp", r"__0_0\.distcp: \d+ bytes, shorter than the \d+ that \.metadata names"),
    ("empty:.metadata", r"\.metadata: EOFError: empty file"),
    ("truncate:.metadata", r"\.metadata: (EOFError|UnpicklingError)"),
    ("delete:distcp", r"__0_0\.distcp: missing \(named by \.metadata\)"),
])
def test_checkpoint_without_manifest_loads_unverified_but_structure_is_checked(ckpts, how, problem, caplog):
    newest = ckpts / "step_00000002"
    _strip_manifest(newest)
    if how:
        damage(newest, how)
    verdict = verify_checkpoint(newest)
    with caplog.at_level(logging.WARNING, logger=ckpt_lib.__name__):
        chosen = Checkpointer(ckpts, keep_last=2).newest_usable()
    if how is None:
        assert verdict.status == "unverified" and chosen == newest
        assert any("no manifest.json" in r.getMessage() and "unverified" in r.getMessage() for r in caplog.records)
    else:
        assert verdict.status == "bad" and re.match(problem, verdict.problem), verdict.problem
        assert chosen == ckpts / "step_00000001"


def test_latest_marker_faults(ckpts, caplog):
    store = Checkpointer(ckpts, keep_last=2)
    marker = ckpts / "latest"
    with caplog.at_level(logging.WARNING, logger=ckpt_lib.__name__):
        marker.unlink()  # deleted
        assert store.newest_usable() == ckpts / "step_00000002"
        marker.write_text("step_00000009\n")  # names a step that does not exist
        assert store.newest_usable() == ckpts / "step_00000002"
        marker.write_text("step_00000001\n")  # a save killed after its rename, before the marker moved
        assert store.newest_usable() == ckpts / "step_00000002"
    lines = [r.getMessage() for r in caplog.records]
    assert any("latest is missing" in line for line in lines)
    assert any("names 'step_00000009', which does not exist" in line for line in lines)
    assert any("names step_00000001, but step_00000002 is newer and verifies" in line for line in lines)
    # Nothing at all but a marker naming a missing step: stop, rather than silently start afresh.
    for ckpt in ckpts.glob("step_*"):
        shutil.rmtree(ckpt)
    with pytest.raises(CheckpointError, match="names step_00000001, which does not exist"):
        store.newest_usable()


def test_no_usable_checkpoint_is_one_line(ckpts):
    damage(ckpts / "step_00000002", "flip:distcp")
    damage(ckpts / "step_00000001", "empty:.metadata")
    with pytest.raises(CheckpointError) as err:
        Checkpointer(ckpts, keep_last=2).newest_usable()
    message = str(err.value)
    assert "\n" not in message and "no usable checkpoint" in message
    assert "step_00000002: __0_0.distcp: content differs" in message and "step_00000001: .metadata: 0 bytes" in message
    with pytest.raises(CheckpointError, match="step_00000002': __0_0.distcp: content differs"):
        ckpt_lib.resolve_checkpoint(ckpts / "step_00000002")


@pytest.mark.parametrize("weakness", ["unverified", "bad"])
def test_pruning_keeps_the_newest_verified_checkpoint_before_one_that_is_not(ckpts, weakness):
    if weakness == "unverified":
        _strip_manifest(ckpts / "step_00000002")
    else:
        damage(ckpts / "step_00000002", "flip:distcp@model.weight")
    store = Checkpointer(ckpts, keep_last=2)
    store.save(3, _state(3))  # keeps step 2 and 3; step 1 is the good state before step 2, so it stays too
    assert sorted(p.name for p in store.complete_checkpoints()) == ["step_00000001", "step_00000002",
                                                                    "step_00000003"]
    store.save(4, _state(4))  # steps 3 and 4 verify: ordinary pruning
    assert sorted(p.name for p in store.complete_checkpoints()) == ["step_00000003", "step_00000004"]
    assert all(verify_checkpoint(p).status == "ok" for p in store.complete_checkpoints())


# ------------------------------------------------------------------------------------------------------------
# Slow: damage, then resume; the run continues the uninterrupted curve.

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of 6 steps; its checkpoints (steps 3 and 6) are the material the faults damage."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = run_training(tiny_test_recipe(run_dir, *STEPS))
    assert result.end_step == 6 and len(result.losses) == 6
    return result.losses, run_dir / "checkpoints"


def _copy_checkpoints(reference, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(reference[1], run_dir / "checkpoints")
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("how", [
    "flip:distcp@decoder",  # the case: flipped weights resumed silently, then pruning deleted step 3
    "flip:distcp@rng_state",
    "truncate:distcp",
    "empty:.metadata",
    "delete latest, flip:distcp@optimizer",
    "latest names a deleted step",
])
def test_resume_after_damage_falls_back_and_continues_the_curve(reference, tmp_path, how, caplog):
    losses, _ = reference
    run_dir = _copy_checkpoints(reference, tmp_path)
    ckpts = run_dir / "checkpoints"
    if how == "latest names a deleted step":
        shutil.rmtree(ckpts / "step_00000006")
    else:
        if how.startswith("delete latest"):
            (ckpts / "latest").unlink()
            how = how.split(", ")[1]
        damage(ckpts / "step_00000006", how)
    with caplog.at_level(logging.WARNING, logger=ckpt_lib.__name__):
        resumed = run_training(tiny_test_recipe(run_dir, *STEPS))
    assert resumed.start_step == 3 and resumed.losses == losses[3:]  # bitwise
    if how != "latest names a deleted step":
        assert any("step_00000006 skipped" in r.getMessage() for r in caplog.records)
    # Step 3 was kept, step 6 written again; both verify.
    assert [p.name for p in Checkpointer(ckpts, 2).complete_checkpoints()] == ["step_00000003", "step_00000006"]
    assert verify_tool.main([str(run_dir)]) == 0


KILLED_SAVES = textwrap.dedent('''
    """Imports the stack once, then forks, per moment: a training run (6 steps, a save every step) SIGKILLed at
    that moment of the save of step 3, and then a resume of the same run dir, which writes what it did as JSON.
    Forking spares each run the 6 s import on a 2-core machine; two experiments run at a time."""
    import json, logging, os, random, shutil, signal, sys, time
    from pathlib import Path

    from ssa_megatron.training import checkpoint as ckpt_lib
    from helpers.training import run_training, tiny_test_recipe

    OVERRIDES = ["train.steps=6", "checkpoint.interval=1", "checkpoint.keep_last=2"]
    KILLED_STEP = "step_00000003"


    def die():
        os.kill(os.getpid(), signal.SIGKILL)


    def arm(moment, saving):
        """Patches the save of step 3 to SIGKILL this process at ``moment`` ("external": tell the parent instead)."""
        real_save, real_manifest, real_hash = ckpt_lib.Checkpointer.save, ckpt_lib.write_manifest, ckpt_lib._hash_piece
        real_atomic, real_prune, real_rmtree = ckpt_lib._write_atomic, ckpt_lib.Checkpointer._prune, shutil.rmtree
        real_dcp_save = ckpt_lib.dist_checkpointing.save
        ours = lambda path: KILLED_STEP in str(path)

        def save(self, step, state, extra=None):
            if step == 3:  # tell the parent, with how long the previous save took
                saving.with_suffix(".tmp").write_text(str(self.last_save_seconds))
                saving.with_suffix(".tmp").rename(saving)
            return real_save(self, step, state, extra)

        def dcp_save(state, directory):
            real_dcp_save(state, directory)
            if moment == "shards written" and ours(directory):
                die()

        def hash_piece(path, *args):
            digest = real_hash(path, *args)
            if moment == "hashing" and ours(path):
                die()
            return digest

        def manifest(directory):
            result = real_manifest(directory)
            if moment == "manifest written" and ours(directory):
                die()
            return result

        def atomic(path, text):
            if moment == "renamed, latest not moved" and path.name == "latest" and KILLED_STEP in text:
                die()
            real_atomic(path, text)

        def prune(self, keep):
            if moment == "latest moved, not pruned" and ours(keep):
                die()
            real_prune(self, keep)

        def rmtree(path, *args, **kwargs):
            if moment == "pruning" and "step_00000001" in str(path):
                files = sorted(Path(path).iterdir())
                for f in files[: len(files) // 2]:
                    f.unlink()
                die()
            real_rmtree(path, *args, **kwargs)

        ckpt_lib.Checkpointer.save = save
        ckpt_lib.dist_checkpointing.save = dcp_save
        ckpt_lib._hash_piece = hash_piece
        ckpt_lib.write_manifest = manifest
        ckpt_lib._write_atomic = atomic
        ckpt_lib.Checkpointer._prune = prune
        ckpt_lib.shutil.rmtree = rmtree


    def experiment(moment, out, seed):
        run_dir, saving = out / "run", out / "saving"
        out.mkdir(parents=True)
        pid = os.fork()
        if pid == 0:
            arm(moment, saving)
            run_training(tiny_test_recipe(run_dir, *OVERRIDES))
            os._exit(3)  # not killed: the patch never fired
        delay = None
        if moment == "external":
            while not saving.exists():
                time.sleep(0.001)
            delay = random.Random(seed).uniform(0.0, float(saving.read_text()))  # into the save
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
        status = os.waitpid(pid, 0)[1]
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        after_kill = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        pid = os.fork()
        if pid == 0:  # the resume, as a relaunch of the same command
            lines = []
            handler = logging.Handler()
            handler.emit = lambda record: lines.append(record.getMessage())
            logging.getLogger(ckpt_lib.__name__).addHandler(handler)
            result = run_training(tiny_test_recipe(run_dir, *OVERRIDES))
            (out / "result.json").write_text(json.dumps({
                "moment": moment, "killed": killed, "delay": delay, "after_kill": after_kill,
                "start_step": result.start_step, "losses": result.losses, "warnings": lines}))
            os._exit(0)
        os.waitpid(pid, 0)


    if __name__ == "__main__":
        out, seed, moments = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
        running = []
        for i, moment in enumerate(moments):
            pid = os.fork()
            if pid == 0:
                experiment(moment, out / str(i), seed)
                os._exit(0)
            running.append(pid)
            if len(running) == 2:
                os.waitpid(running.pop(0), 0)
        for pid in running:
            os.waitpid(pid, 0)
''')

MOMENTS = {  # the moment of the save of step 3 -> the step a resume must start from
    "shards written": 2, "hashing": 2, "manifest written": 2, "renamed, latest not moved": 3,
    "latest moved, not pruned": 3, "pruning": 3, "external": None,
}


@pytest.mark.slow
def test_sigkill_at_moments_of_a_save_loses_no_good_state(reference, tmp_path):
    """SIGKILL inside the save of step 3 at each of its moments, and once from outside after a random delay within
    the time a save takes; the relaunch resumes from step 3 if its save got past the rename, else from step 2, and
    continues the curve."""
    losses, _ = reference
    seed = int.from_bytes(os.urandom(2), "little")
    script = tmp_path / "killed_saves.py"
    script.write_text(KILLED_SAVES)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "out"), str(seed), *MOMENTS], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    for i, (moment, expected) in enumerate(MOMENTS.items()):
        result_file = tmp_path / "out" / str(i) / "result.json"
        assert result_file.exists(), f"{moment}: the resume did not finish: {proc.stderr.decode()[-3000:]}"
        result = json.loads(result_file.read_text())
        where = f"{moment} (seed {seed}, delay {result['delay']}, left {result['after_kill']})"
        assert result["killed"], f"{where}: the run was not killed"
        if expected is None:  # a random moment: at least the last completed save
            assert result["start_step"] >= 2, where
        else:
            assert result["start_step"] == expected, where
        assert result["losses"] == losses[result["start_step"]:], where  # bitwise
        ckpts = tmp_path / "out" / str(i) / "run" / "checkpoints"
        assert verify_tool.main([str(ckpts)]) == 0, where
