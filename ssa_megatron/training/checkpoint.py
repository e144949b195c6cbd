"""Atomic, verified, resumable checkpoints with ``megatron.core.dist_checkpointing`` (torch_dist format).

Layout under ``checkpoint.dir`` (default ``<run_dir>/checkpoints``)::

    step_00000100/        a complete checkpoint: DCP shards (*.distcp), .metadata, metadata.json,
                          train_state.json, and manifest.json (size and sha256 of every other file)
    step_00000200/
    latest                the name of the newest complete checkpoint (replaced atomically)
    .tmp-step_00000300/   a save in progress (or one that was killed); never read, removed by the next save

A save writes everything into the temporary directory, hashes every file into ``manifest.json``, renames the
directory to ``step_N`` and only then replaces the ``latest`` marker (write + fsync + ``os.replace``). A process
killed at any moment therefore leaves ``latest`` naming a complete checkpoint. Older checkpoints beyond
``keep_last`` are deleted after the marker moves, except the newest verified one older than a checkpoint that
does not verify.

Resume, ``checkpoint.load`` and the conversion input verify a checkpoint against its manifest before reading it,
and fall back to the newest checkpoint that verifies (one log line per one skipped), or stop with a
``CheckpointError`` (one line naming the file) when none does. Nothing in a checkpoint can run code when it is
read: torch DCP's pickled ``.metadata`` goes through an unpickler that admits only the DCP metadata classes, and
every ``torch.load`` during a load (Megatron's common state, the RNG and data-position objects, a legacy
``common.pt``) is forced to ``weights_only=True``. docs/training.md, "Checkpoints: integrity and trust", states
what this proves and what it does not.

What a checkpoint holds is assembled by ``training_state`` below: model chunks, optimizer, LR scheduler, RNG
states (per rank), data-loader position (per data-parallel rank), step, consumed tokens, parallel layout and
the resolved recipe. The model and optimizer are saved as resharding-capable sharded tensors, so a run may
resume under another TP/PP/DP layout; RNG and data positions are then restarted (with a warning), because they
are per-rank objects.

This module is the one home of checkpoints: integrity (``write_manifest``, ``verify_checkpoint``,
``read_dcp_metadata``, ``CheckpointError``), the directory and its ``latest`` marker (``Checkpointer``,
``read_latest``), what a training checkpoint holds (``training_state``), a run's save / resume / weight loading
(``RunCheckpoints``), and reading a checkpoint without a process group or a model (``resolve_checkpoint``,
``read_checkpoint_recipe``, ``read_model_tensors``: the input of the HF conversion and of evaluation).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import queue
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.utils import unwrap_model
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import StorageMeta

from ssa_megatron.config import ModelConfig, RecipeConfig, SSAConfig, from_dict, to_dict
from ssa_megatron.training.optimizer import place_fused_adamw_steps, torch_optimizers

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (damaged, incomplete, or holding objects that would run code), or no usable
    checkpoint at all. The message is one line naming the checkpoint and the file, for a CLI to print as is."""


# ------------------------------------------------------------------------------------------------------------
# Integrity: a manifest of content hashes per checkpoint.

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "ssa_megatron.checkpoint_manifest/1"
HASH = "sha256"
"""sha256 rather than blake2b: with the SHA extensions of current x86 CPUs hashlib's sha256 ran 1.7 GB/s per thread
against blake2b's 0.9 GB/s (AMD EPYC, 8 MiB reads; docs/training.md, "Checkpoints: integrity and trust")."""
REQUIRED_FILES = (".metadata", "metadata.json", "train_state.json")
"""Files every checkpoint this module writes has, so a manifest that lacks one is itself damaged."""
PIECE_BYTES = 256 << 20
"""Files are hashed in pieces of this size (one digest each), so one large shard hashes on several threads."""
_READ_BYTES = 8 << 20
_HASH_THREADS = max(1, min(16, os.cpu_count() or 1))


def _hash_piece(path: Path, start: int, length: int, algorithm: str = HASH) -> str:
    digest = hashlib.new(algorithm)
    buf = bytearray(_READ_BYTES)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        while length:
            n = f.readinto(view[:min(len(buf), length)])
            if not n:
                raise OSError(f"{path.name}: ended while being read")
            digest.update(view[:n])
            length -= n
    return digest.hexdigest()


def _hash_files(directory: Path, names: list[str], algorithm: str = HASH) -> dict[str, dict]:
    """``{name: {"bytes": size, algorithm: [one hex digest per PIECE_BYTES piece]}}``. Pieces hash in parallel
    threads (hashlib releases the GIL on large buffers): rank 0 does this while the other ranks wait for it."""
    sizes = {name: (directory / name).stat().st_size for name in names}
    pieces = [(name, start, min(PIECE_BYTES, sizes[name] - start))
              for name in names for start in range(0, max(sizes[name], 1), PIECE_BYTES)]
    with ThreadPoolExecutor(max(1, min(_HASH_THREADS, len(pieces)))) as pool:
        digests = list(pool.map(lambda piece: _hash_piece(directory / piece[0], *piece[1:], algorithm), pieces))
    files: dict[str, dict] = {name: {"bytes": sizes[name], algorithm: []} for name in names}
    for (name, _, _), digest in zip(pieces, digests):
        files[name][algorithm].append(digest)
    return files


def _digest_of(files: dict) -> str:
    """The manifest's own checksum (of its canonical file list), so a damaged manifest names itself rather than a
    file whose listed hash it garbled."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def _files_of(directory: Path) -> list[str]:
    """Every file under ``directory`` (relative POSIX paths, sorted), the manifest and its temporary left out."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.name not in (MANIFEST, MANIFEST + ".tmp"))


def write_manifest(directory: Path) -> dict:
    """Hashes every file of a complete checkpoint directory into ``manifest.json`` (temporary file, fsync, rename).

    The hashes are computed right after the files are complete, not while they are written: Megatron's torch_dist
    writer (DCP's file writer, in threads of every rank) offers no hook on the bytes it writes, and hashing inside
    it would mean patching it. The files were just written, so this read comes from the page cache; sha256 runs
    about 1.7 GB/s per thread, 256 MiB pieces in parallel (measured in docs/training.md, beside the save).
    """
    files = _hash_files(directory, _files_of(directory))
    manifest = {"format": MANIFEST_FORMAT, "algorithm": HASH, "files": files, "files_sha256": _digest_of(files)}
    _write_atomic(directory / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


@dataclass(frozen=True)
class Verdict:
    """What verifying one checkpoint found.

    ``ok``: every file is listed in its manifest with the same size and hash, and the DCP metadata reads through the
    restricted unpickler with every shard as long as it says. ``unverified``: no manifest (written before checkpoints
    had one): the structure checks passed, the contents are not checked. ``bad``: ``problem`` names the file.
    """

    path: Path
    status: str
    problem: str = ""

    @property
    def usable(self) -> bool:
        return self.status != "bad"

    def describe(self) -> str:
        if self.status == "bad":
            return f"{self.path.name}: {self.problem}"
        if self.status == "unverified":
            return f"{self.path.name}: unverified (no {MANIFEST}: written before checkpoints had manifests)"
        return f"{self.path.name}: ok"


_VERDICTS: dict[Path, tuple[tuple, Verdict]] = {}
"""Verdicts of this process, keyed by directory and valid while no file's size, mtime or inode changes: a
checkpoint is hashed once per process, whoever asks (resume, pruning, conversion)."""


def _signature(path: Path) -> tuple:
    try:
        return tuple((name, st.st_size, st.st_mtime_ns, st.st_ino)
                     for name in _files_of(path) + [MANIFEST] if (st := _stat(path / name)) is not None)
    except OSError:
        return ()


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:
        return None


def verify_checkpoint(path: str | Path) -> Verdict:
    """Checks one checkpoint directory against its manifest and the DCP metadata (see :class:`Verdict`).

    Hashes every file unless this process already verified the same files (same size, mtime and inode).
    """
    path = Path(path)
    signature = _signature(path)
    cached = _VERDICTS.get(path)
    if cached is not None and signature and cached[0] == signature:
        return cached[1]
    status, problem = _check(path)
    verdict = Verdict(path, status, problem)
    if signature:
        _VERDICTS[path] = (signature, verdict)
    return verdict


def _remember_ok(path: Path) -> None:
    """Marks a checkpoint this process just wrote and hashed as verified."""
    _VERDICTS[path] = (_signature(path), Verdict(path, "ok"))


def _check(path: Path) -> tuple[str, str]:
    if not path.is_dir():
        return "bad", "missing (no such directory)"
    status = "unverified"
    if (path / MANIFEST).exists():
        problem = _check_manifest(path)
        if problem:
            return "bad", problem
        status = "ok"
    else:
        try:
            state = json.loads((path / "train_state.json").read_text())
        except FileNotFoundError:
            return "bad", "train_state.json: missing (an incomplete checkpoint)"
        except (OSError, ValueError) as err:
            return "bad", f"train_state.json: unreadable ({_one_line(err)})"
        if isinstance(state, dict) and state.get("manifest"):
            return "bad", f"{MANIFEST}: missing (this checkpoint was written with one)"
    problem = _check_structure(path)
    return ("bad", problem) if problem else (status, "")


def _check_manifest(path: Path) -> str:
    """The first problem found comparing ``path`` with its manifest, or ''."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        return f"{MANIFEST}: unreadable ({_one_line(err)})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    algorithm = manifest.get("algorithm") if isinstance(manifest, dict) else None
    if (not isinstance(files, dict) or manifest.get("format") != MANIFEST_FORMAT
            or algorithm not in hashlib.algorithms_guaranteed
            or not all(isinstance(e, dict) and isinstance(e.get("bytes"), int) and isinstance(e.get(algorithm), list)
                       for e in files.values())):
        return f"{MANIFEST}: not a checkpoint manifest ({MANIFEST_FORMAT})"
    if manifest.get("files_sha256") != _digest_of(files):
        return f"{MANIFEST}: damaged (its own checksum differs)"
    present = set(_files_of(path))
    for name in REQUIRED_FILES:
        if name not in files:
            return f"{MANIFEST}: does not list {name}"
    for name in sorted(set(files) - present):
        return f"{name}: missing (listed in {MANIFEST})"
    for name in sorted(present - set(files)):
        return f"{name}: not in {MANIFEST} (the save did not write it)"
    for name, entry in sorted(files.items()):
        size = (path / name).stat().st_size
        if size != entry["bytes"]:
            return f"{name}: {size} bytes, {MANIFEST} says {entry['bytes']} (truncated or overwritten)"
    try:
        actual = _hash_files(path, sorted(files), algorithm)
    except OSError as err:
        where = f"{Path(err.filename).name}: " if err.filename else ""
        return f"{where}unreadable ({_one_line(err)})"
    for name, entry in sorted(files.items()):
        if actual[name][algorithm] != entry[algorithm]:
            return f"{name}: content differs from {MANIFEST} ({algorithm})"
    return ""


def _check_structure(path: Path) -> str:
    """What a checkpoint without a manifest can still be checked for, and what a load reads first: the DCP metadata
    through the restricted unpickler, every shard at least as long as the byte ranges it names, metadata.json, and
    a legacy ``common.pt`` that holds nothing but plain types. The first problem, or ''."""
    try:
        metadata = _unpickle_dcp_metadata(path / ".metadata")
    except FileNotFoundError:
        return ".metadata: missing"
    except Exception as err:  # any unpickling failure: truncated, empty, refused class
        return f".metadata: {_one_line(err)}"
    ends: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        name = str(info.relative_path)
        ends[name] = max(ends.get(name, 0), int(info.offset) + int(info.length))
    for name, end in sorted(ends.items()):
        st = _stat(path / name)
        if st is None:
            return f"{name}: missing (named by .metadata)"
        if st.st_size < end:
            return f"{name}: {st.st_size} bytes, shorter than the {end} that .metadata names (truncated)"
    if not (path / "metadata.json").is_file():
        return "metadata.json: missing"
    if (path / "common.pt").exists():
        try:
            torch.load(path / "common.pt", map_location="cpu", weights_only=True)
        except Exception as err:
            return f"common.pt: {_refusal(err)}"
    return ""


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def _refusal(err: BaseException) -> str:
    """One line for torch's multi-line 'Weights only load failed ... Unsupported global: GLOBAL x.y' error."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    if found:
        return (f"holds a pickled {found.group(1)}, which loading refuses (weights_only: tensors, numbers, "
                "strings, lists and dicts only)")
    return f"unreadable ({_one_line(err)})"


# ------------------------------------------------------------------------------------------------------------
# Loading that runs no code from the checkpoint.

_DCP_METADATA_CLASSES = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
}
"""What torch DCP's ``.metadata`` pickle is made of (torch 2.11, Megatron-core 0.19), besides torch dtypes;
tests/test_training_checkpoint.py fails when a new torch or Megatron writes anything else."""


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Unpickles torch DCP's ``.metadata`` admitting only the classes it is made of: a crafted pickle that names any
    other callable (``os.system``, ``builtins.open``, ...) is refused before anything is called."""

    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_METADATA_CLASSES or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"holds a pickled {module}.{name}, which is not a DCP metadata class (refused)")


def _unpickle_dcp_metadata(file: Path):
    with open(file, "rb") as f:
        if not os.fstat(f.fileno()).st_size:
            raise EOFError("empty file")
        return _DCPMetadataUnpickler(f).load()


def read_dcp_metadata(ckpt: Path):
    """torch DCP's ``Metadata`` of a checkpoint, read through the restricted unpickler; ``CheckpointError`` when it
    is missing, damaged or names another class."""
    try:
        return _unpickle_dcp_metadata(Path(ckpt) / ".metadata")
    except Exception as err:
        raise CheckpointError(f"checkpoint {str(ckpt)!r}: .metadata: {_one_line(err)}") from err


class _RestrictedMetadataReader(FileSystemReader):
    """torch DCP's file reader with ``.metadata`` read through the restricted unpickler (``read_metadata`` is the
    StorageReader method DCP calls for it)."""

    def read_metadata(self, *args, **kwargs):
        metadata = read_dcp_metadata(Path(str(self.path)))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_FORCE_NO_WEIGHTS_ONLY = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@contextlib.contextmanager
def _plain_objects_only(ckpt: Path):
    """Inside, every ``torch.load`` runs with ``weights_only=True`` (tensors, numbers, strings, lists, dicts), also
    the ones Megatron and torch DCP make with ``weights_only=False``: Megatron's common state, the RNG and
    data-position objects, a legacy ``common.pt``. Those loads sit inside Megatron's ``load`` with no parameter or
    hook to reach them; torch's documented switch for this is an environment variable it reads at every
    ``torch.load``, so it is set for the duration of the load (a concurrent ``torch.load`` elsewhere in the process
    is made stricter, never laxer). A refused object becomes a one-line ``CheckpointError``. Before the load,
    every rank reads ``.metadata`` through the restricted unpickler, so torch's own unrestricted read of it (again
    inside Megatron) unpickles only bytes already proven to hold DCP metadata classes."""
    read_dcp_metadata(ckpt)
    saved = {k: os.environ.pop(k, None) for k in (_FORCE_WEIGHTS_ONLY, _FORCE_NO_WEIGHTS_ONLY)}
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    try:
        yield
    except BaseException as err:  # torch DCP hands a refusal on as text in its CheckpointException(BaseException)
        if "Weights only load failed" not in str(err):
            raise
        raise CheckpointError(f"checkpoint {str(ckpt)!r}: {_refusal(err)}") from err
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


# ------------------------------------------------------------------------------------------------------------
# The checkpoint directory: atomic saves, the latest marker, choosing what to resume from, pruning.

def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _use_in_process_results_queue() -> None:
    """Megatron's torch_dist writer hands its results over a ``multiprocessing.Manager`` queue, whose server is a
    spawned process (it re-imports torch: ~15 s on a 2-core machine, on the first save). Our saves are synchronous
    and the writer runs threads in this process, so a plain in-process queue is equivalent."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    if getattr(filesystem_async, "_results_queue", "absent") is None:
        filesystem_async._results_queue = queue.Queue()


def read_latest(directory: Path) -> Path | None:
    """The checkpoint that ``directory``'s ``latest`` marker names (not checked), or None without a marker."""
    marker = directory / LATEST
    if not marker.is_file():
        return None
    return directory / marker.read_text().strip()


def _step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


class Checkpointer:
    """Saves and finds checkpoints in one directory. All ranks call ``save``; rank 0 hashes, renames and prunes."""

    def __init__(self, directory: str | Path, keep_last: int, rank: int = 0):
        self.dir = Path(directory).expanduser()
        self.keep_last = keep_last
        self.rank = rank
        self.last_save_seconds = 0.0
        self.last_hash_seconds = 0.0
        """Wall time of the last ``save`` and, on rank 0, of hashing its files into the manifest."""

    @staticmethod
    def step_dir_name(step: int) -> str:
        return f"step_{step:08d}"

    def complete_checkpoints(self) -> list[Path]:
        """Checkpoint directories (``step_N``: complete when written, whether still intact or not), oldest first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The checkpoint the ``latest`` marker names, or None when there is none yet (not verified: see
        ``newest_usable``)."""
        path = read_latest(self.dir)
        if path is not None and not (path / "train_state.json").is_file():
            raise CheckpointError(f"{self.dir / LATEST} names {path.name}, which is not a complete checkpoint")
        return path

    def newest_usable(self) -> Path | None:
        """The checkpoint to resume from: the newest one that verifies, or that has no manifest (written before
        checkpoints had one; accepted with a warning). Newer ones that fail are skipped with one warning each, and
        a missing or stale ``latest`` marker is reported in one line. None when the directory holds no
        checkpoint; ``CheckpointError`` when it holds some and none is usable."""
        candidates = self.complete_checkpoints()
        marker = self.dir / LATEST
        named = marker.read_text().strip() if marker.is_file() else None
        if not candidates:
            if named:
                raise CheckpointError(f"{marker} names {named}, which does not exist, and {self.dir} holds no other "
                                      "checkpoint; remove the marker to start afresh")
            return None
        if named is None:
            log.warning("%s is missing; resuming from the newest checkpoint that verifies", marker)
        elif not (self.dir / named).is_dir() or not _STEP_DIR.match(named):
            log.warning("%s names %r, which does not exist; resuming from the newest checkpoint that verifies",
                        marker, named)
        skipped = []
        for path in reversed(candidates):
            verdict = verify_checkpoint(path)
            if not verdict.usable:
                log.warning("checkpoint %s skipped: %s", path, verdict.problem)
                skipped.append(verdict)
                continue
            if verdict.status == "unverified":
                log.warning("checkpoint %s has no %s (written before checkpoints had manifests): loading it "
                            "unverified", path, MANIFEST)
            if named and _STEP_DIR.match(named) and named < path.name:
                log.warning("%s names %s, but %s is newer and verifies (a save stopped before it moved the marker)",
                            marker, named, path.name)
            return path
        raise CheckpointError(f"no usable checkpoint in {self.dir}: " + "; ".join(v.describe() for v in skipped))

    def save(self, step: int, state: dict, extra: dict | None = None) -> Path:
        """Writes ``state`` (a sharded state dict) as checkpoint ``step``; returns its directory."""
        started = time.perf_counter()
        final = self.dir / self.step_dir_name(step)
        tmp = self.dir / f".tmp-{final.name}"
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in [*self.dir.glob(".tmp-step_*"), *self.dir.glob(".tmp-old-step_*")]:  # killed saves
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        _barrier()
        _use_in_process_results_queue()
        dist_checkpointing.save(state, str(tmp))
        _barrier()
        if self.rank == 0:
            info = {"step": step, **(extra or {}), "manifest": MANIFEST}
            with open(tmp / "train_state.json", "w") as f:
                json.dump(info, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            hashing = time.perf_counter()
            write_manifest(tmp)
            self.last_hash_seconds = time.perf_counter() - hashing
            if final.exists():  # re-saving a step (e.g. after a resume): keep the marker valid throughout
                old = self.dir / f".tmp-old-{final.name}"
                os.rename(final, old)
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
            _fsync_dir(self.dir)
            _remember_ok(final)
            _write_atomic(self.dir / LATEST, final.name + "\n")
            self._prune(keep=final)
        _barrier()
        self.last_save_seconds = time.perf_counter() - started
        return final

    def _prune(self, keep: Path) -> None:
        """Deletes all but the newest ``keep_last`` checkpoints (``keep`` always stays), except, for each kept one
        that does not verify, the newest older one that does: the checkpoint a resume would fall back to."""
        everything = self.complete_checkpoints()
        others = [p for p in everything if p != keep]
        cut = max(0, len(others) - (self.keep_last - 1))
        doomed, kept = others[:cut], others[cut:]
        spared: set[Path] = set()
        for weak in kept:
            verdict = verify_checkpoint(weak)  # cached for the checkpoints this process wrote or resumed from
            if verdict.status == "ok":
                continue
            for older in reversed([p for p in everything if _step_of(p) < _step_of(weak)]):
                if verify_checkpoint(older).status == "ok":
                    if older in doomed and older not in spared:
                        spared.add(older)
                        log.warning("keeping %s beyond checkpoint.keep_last=%d: it is the newest verified "
                                    "checkpoint before %s", older, self.keep_last, verdict.describe())
                    break
        for old in doomed:
            if old not in spared:
                shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def read_train_state(path: Path) -> dict:
        return json.loads((path / "train_state.json").read_text())

    @staticmethod
    def load(path: Path, template: dict) -> dict:
        """Loads the tensors and objects ``template`` asks for (built with ``is_loading=True``), running no code
        from the checkpoint (``_plain_objects_only``). Verifying it first is the caller's choice
        (``verify_checkpoint``, ``newest_usable``, ``resolve_checkpoint``): in a job it is rank 0's."""
        with _plain_objects_only(path):
            return dist_checkpointing.load(template, str(path))


# ------------------------------------------------------------------------------------------------------------
# What a training checkpoint holds.

def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "tracker": None, "cuda": None}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
        state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
        if state.get("tracker") is not None:
            tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def layout_of(dims) -> dict:
    return {"tp": dims.tp, "pp": dims.pp, "cp": dims.cp, "dp": dims.dp, "vpp": dims.vpp,
            "world_size": dims.world_size}


def training_state(
    *,
    model_chunks: list[torch.nn.Module],
    optimizer,
    scheduler,
    data_state: Callable[[], Any] | None,
    step: int,
    consumed_tokens: int,
    recipe: dict,
    dims,
    is_loading: bool = False,
    with_optimizer: bool = True,
    with_rank_objects: bool = True,
    with_data_state: bool | None = None,
    optimizer_format: str = "fully_reshardable",
) -> dict:
    """The sharded state dict of a training run (for saving, or as a template for loading).

    ``optimizer_format`` is Megatron's ``distrib_optim_sharding_type`` for the distributed optimizer (other
    optimizers ignore it); a load must use the format the checkpoint was written in (its ``optimizer_format``).
    """
    state: dict[str, Any] = {}
    model_sd: dict[str, Any] = {}
    # The bare models (no DDP / Float16Module wrappers), so keys do not depend on precision or data parallelism.
    for i, chunk in enumerate(unwrap_model(model_chunks)):
        key = "model" if len(model_chunks) == 1 else f"model{i}"
        state[key] = chunk.sharded_state_dict()
        model_sd[key] = state[key]
    if with_optimizer:
        metadata = {"distrib_optim_sharding_type": optimizer_format, "chained_optim_avoid_prefix": True,
                    "distrib_optim_fully_reshardable_mem_efficient": False}
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)
        state["optimizer_format"] = optimizer_format
        state["scheduler"] = scheduler.state_dict()
    state["step"] = step
    state["consumed_tokens"] = consumed_tokens
    state["recipe"] = recipe
    state["layout"] = layout_of(dims)
    if with_data_state is None:
        with_data_state = with_rank_objects
    if with_rank_objects:
        # One RNG state per rank: restorable only under the same layout.
        state["rng_state"] = ShardedObject(
            "rng_state", rng_state() if not is_loading else None, (dims.pp, dims.tp, dims.cp, dims.dp),
            (dims.pp_rank, dims.tp_rank, dims.cp_rank, dims.dp_rank), replica_id=0,
        )
    if with_data_state:
        # One data position per data-parallel rank (the TP/CP/PP ranks of a data-parallel replica read the same
        # batches, so only one of them writes it): restorable whenever the data-parallel size is the same.
        if data_state is not None:
            state["data_state"] = ShardedObject(
                "data_state", data_state() if not is_loading else None, (dims.dp,), (dims.dp_rank,),
                replica_id=(dims.pp_rank, dims.tp_rank, dims.cp_rank),
            )
    return state


def load_model_chunks(model_chunks: list[torch.nn.Module], loaded: dict) -> None:
    for i, chunk in enumerate(unwrap_model(model_chunks)):
        chunk.load_state_dict(loaded["model" if len(model_chunks) == 1 else f"model{i}"])


# ------------------------------------------------------------------------------------------------------------
# A training run's checkpoints: save, resume, or start from another run's weights.

class RunCheckpoints:
    """The checkpoints of one training run (``checkpoint.*`` of the recipe), bound to the run's live objects.

    ``restore()`` once before the loop, ``due(step, stopping)`` and ``save(step, consumed_tokens)`` after each step.
    """

    def __init__(self, recipe: RecipeConfig, dims, run_dir: Path, *, model_chunks: list[torch.nn.Module], optimizer,
                 scheduler, train_loader):
        self.store = Checkpointer(Path(recipe.checkpoint.dir or run_dir / "checkpoints"), recipe.checkpoint.keep_last,
                                  dims.rank)
        self.recipe = recipe
        self.dims = dims
        self.model_chunks = model_chunks
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_loader = train_loader
        self.resumed_from: Path | None = None
        """The checkpoint ``restore`` resumed from (None: a fresh start, or weights only)."""

    def state(self, step: int, consumed_tokens: int, is_loading: bool = False, **kw) -> dict:
        """:func:`training_state` of this run."""
        kw.setdefault("optimizer_format", self.recipe.checkpoint.optimizer_format)
        return training_state(
            model_chunks=self.model_chunks, optimizer=self.optimizer, scheduler=self.scheduler,
            data_state=self.train_loader.state_dict, step=step, consumed_tokens=consumed_tokens,
            recipe=to_dict(self.recipe), dims=self.dims, is_loading=is_loading, **kw)

    def restore(self) -> tuple[int, int]:
        """Resumes from the newest checkpoint that verifies (``checkpoint.resume``; newer ones that do not are
        skipped with a warning each), else loads the weights of ``checkpoint.load``; returns (step, consumed tokens)
        to continue from, (0, 0) for a fresh start. ``CheckpointError`` when the run has checkpoints and none is
        usable, or ``checkpoint.load`` names none that is."""
        if self.recipe.checkpoint.resume:
            chosen = self._chosen_on_rank0(self.store.newest_usable)
            if chosen is not None:
                self.resumed_from = chosen
                return self._resume(chosen)
        if self.recipe.checkpoint.load:
            self._load_weights(self._chosen_on_rank0(lambda: resolve_checkpoint(self.recipe.checkpoint.load)))
        return 0, 0

    def _chosen_on_rank0(self, choose: Callable[[], Path | None]) -> Path | None:
        """``choose()`` on rank 0 alone (verifying hashes whole checkpoints), its answer shared with every rank; when
        it fails, every rank raises (rank 0 its own error, the others a CheckpointError with its message)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return choose()
        answer: list[Any] = [None, None]
        error = None
        if self.dims.rank == 0:
            try:
                answer[0] = choose()
            except Exception as err:  # every rank must leave the broadcast below
                error, answer[1] = err, str(err)
        dist.broadcast_object_list(answer, src=0)  # strings from rank 0 of this job
        if error is not None:
            raise error
        if answer[1] is not None:
            raise CheckpointError(f"rank 0: {answer[1]}")
        return None if answer[0] is None else Path(answer[0])

    def due(self, step: int, stopping: bool) -> bool:
        """Whether to save after ``step``: every ``checkpoint.interval`` steps, on a stop request, and at the end
        (``checkpoint.save_at_end``)."""
        interval = self.recipe.checkpoint.interval
        return bool((interval and step % interval == 0) or stopping or (
            step == self.recipe.train.steps and self.recipe.checkpoint.save_at_end))

    def save(self, step: int, consumed_tokens: int) -> Path:
        return self.store.save(step, self.state(step, consumed_tokens),
                               {"consumed_tokens": consumed_tokens, "layout": layout_of(self.dims),
                                "recipe": self.recipe.name})

    def _resume(self, path: Path) -> tuple[int, int]:
        dims, optimizer = self.dims, self.optimizer
        with _plain_objects_only(path):
            common = dist_checkpointing.load_common_state_dict(str(path))
        layout, saved = layout_of(dims), common.get("layout", {})
        same_layout = saved == layout
        optimizer_format = common.get("optimizer_format", "fully_reshardable")
        if optimizer_format == "dp_reshardable" and (saved.get("tp"), saved.get("pp")) != (layout["tp"],
                                                                                          layout["pp"]):
            raise ValueError(f"{path} was written with checkpoint.optimizer_format=dp_reshardable under tp "
                             f"{saved.get('tp')} pp {saved.get('pp')}; it resumes only with the same TP and PP "
                             f"(now tp {layout['tp']} pp {layout['pp']})")
        same_dp = saved.get("dp") == layout["dp"]
        ensure_optimizer_state(optimizer)
        template = self.state(0, 0, is_loading=True, with_rank_objects=same_layout, with_data_state=same_dp,
                              optimizer_format=optimizer_format)
        loaded = self.store.load(path, template)
        load_model_chunks(self.model_chunks, loaded)
        with torch_adam_step_kept_out_of_param_load(optimizer):
            optimizer.load_state_dict(loaded["optimizer"])
        place_fused_adamw_steps(optimizer)  # a loaded Adam step is a CPU scalar; fused AdamW wants it on the GPU
        self.scheduler.load_state_dict(loaded["scheduler"])
        if same_layout:
            set_rng_state(loaded["rng_state"])
        if same_dp and "data_state" in loaded:
            self.train_loader.load_state_dict(loaded["data_state"])
        if not same_layout and dims.is_main:
            log.warning("resuming %s under another parallel layout (%s -> %s): model and optimizer resharded; RNG "
                        "streams restart%s", path, saved, layout,
                        "" if same_dp else "; the data-parallel size changed, so data positions restart too")
        return int(loaded["step"]), int(loaded["consumed_tokens"])

    def _load_weights(self, path: Path) -> None:
        """checkpoint.load: model weights only (a fresh optimizer, schedule and data position), from the checkpoint
        that ``resolve_checkpoint`` chose and verified."""
        loaded = Checkpointer.load(path, self.state(0, 0, is_loading=True, with_optimizer=False,
                                                    with_rank_objects=False))
        load_model_chunks(self.model_chunks, loaded)
        if hasattr(self.optimizer, "reload_model_params"):
            self.optimizer.reload_model_params()


# ------------------------------------------------------------------------------------------------------------
# Loading optimizer state into the torch AdamW that Megatron 0.19.2 falls back to without Apex/TE.

def ensure_optimizer_state(optimizer) -> None:
    """Gives every parameter of Megatron's optimizers zero Adam state (``step`` 0) when it has none yet.

    Torch AdamW creates its state lazily at the first step, while Megatron's DistributedOptimizer without Apex or
    Transformer Engine reads every parameter's ``step`` when it builds the sharded state dict a checkpoint is loaded
    into (``assert len(steps) == 1`` fails on a fresh optimizer). The load then overwrites this state.
    """
    for inner in torch_optimizers(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                # fused AdamW keeps step on the parameter's device (use_fused_adamw)
                state.setdefault("step", torch.zeros((), dtype=torch.float32,
                                                     device=p.device if group.get("fused") else "cpu"))


@contextlib.contextmanager
def torch_adam_step_kept_out_of_param_load(optimizer):
    """Lets Megatron 0.19.2's DistributedOptimizer load its parameter state into torch's AdamW.

    Without Apex/TE, Megatron falls back to ``torch.optim.AdamW``, whose per-parameter state holds a ``step``
    tensor. ``load_state_dict`` first restores ``step`` from the param groups, then copies the saved parameter
    state into every tensor of the optimizer state, ``step`` included, while the saved state has no ``step``
    (it is "handled separately"): ``KeyError: 'step'``. Inside this context the copy skips ``step``.
    """
    patched = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        setter = getattr(opt, "_set_main_param_and_optimizer_states", None)
        index = getattr(opt, "model_param_group_index_map", None)
        if setter is None or index is None:
            continue

        def set_without_step(model_param, tensors, _opt=opt, _setter=setter):
            group_index, group_order = _opt.model_param_group_index_map[model_param]
            state = _opt.optimizer.state[_opt.optimizer.param_groups[group_index]["params"][group_order]]
            step = state.pop("step", None) if "step" not in tensors else None
            try:
                _setter(model_param, tensors)
            finally:
                if step is not None:
                    state["step"] = step

        opt._set_main_param_and_optimizer_states = set_without_step
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states  # back to the class's method


# ------------------------------------------------------------------------------------------------------------
# Reading a checkpoint without a process group or a model: the input of HF conversion and of evaluation.

MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")
"""Keys of the model's tensors in a checkpoint (the rest is optimizer state and run metadata)."""


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint that ``path`` names, verified: a run directory or its ``checkpoints/`` directory gives the
    newest checkpoint there that verifies (``Checkpointer.newest_usable``: one warning per newer one skipped), one
    checkpoint directory (``step_XXXXXXXX``, or any directory with DCP ``.metadata``) must verify itself. A
    checkpoint without manifest (written before checkpoints had one) is accepted with a warning. Raises
    ``CheckpointError`` (a ValueError) naming the checkpoint and the file at fault."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist (expected a run directory, its checkpoints/ "
                              "directory or one step_XXXXXXXX checkpoint)")
    if _is_one_checkpoint(p):
        verdict = verify_checkpoint(p)
        if not verdict.usable:
            raise CheckpointError(f"checkpoint {str(p)!r}: {verdict.problem}")
        if verdict.status == "unverified":
            log.warning("checkpoint %s has no %s (written before checkpoints had manifests): reading it unverified",
                        p, MANIFEST)
        return p
    if (p / "checkpoints").is_dir() and not (p / LATEST).is_file() and not any(_STEP_DIR.match(c.name)
                                                                                 for c in p.iterdir()):
        p = p / "checkpoints"
    chosen = Checkpointer(p, keep_last=1).newest_usable()
    if chosen is None:
        raise CheckpointError(f"checkpoint {str(path)!r}: {str(p)!r} is not a torch_dist checkpoint (no "
                              "metadata.json / .metadata) and holds none; pass a run directory, its checkpoints/ "
                              "directory or a step_XXXXXXXX directory")
    return chosen


def _is_one_checkpoint(p: Path) -> bool:
    return p.is_dir() and (bool(_STEP_DIR.match(p.name)) or (p / ".metadata").exists() or (p / MANIFEST).exists())


def _require_usable(ckpt: Path) -> None:
    """Readers below verify what they are given too (free when ``resolve_checkpoint`` just did: verdicts are
    cached), so calling them directly skips no check."""
    verdict = verify_checkpoint(ckpt)
    if not verdict.usable:
        raise CheckpointError(f"checkpoint {str(ckpt)!r}: {verdict.problem}")


def read_checkpoint_recipe(ckpt: Path) -> tuple[RecipeConfig, dict]:
    """The recipe a checkpoint was written with (common state, else the run directory's recipe.yaml): a
    RecipeConfig with its model and SSA sections (others at their defaults), and the stored dict as is."""
    _require_usable(ckpt)
    data = None
    try:
        with _plain_objects_only(ckpt):
            data = dist_checkpointing.load_common_state_dict(str(ckpt)).get("recipe")
    except CheckpointError:
        raise
    except Exception as err:  # a checkpoint without common state: fall back to recipe.yaml
        log.warning("checkpoint %s: no readable common state (%s); looking for recipe.yaml", ckpt, err)
    if data is None:
        import yaml

        for candidate in (ckpt.parent.parent / "recipe.yaml", ckpt.parent / "recipe.yaml"):
            if candidate.is_file():
                data = yaml.safe_load(candidate.read_text())
                break
    if not isinstance(data, dict) or "model" not in data:
        raise ValueError(f"checkpoint {str(ckpt)!r} holds no recipe (common state 'recipe' or the run's "
                         "recipe.yaml); pass the recipe explicitly")
    return recipe_from_dict(data, f"checkpoint {str(ckpt)!r}"), data


def recipe_from_dict(data: dict, source: str) -> RecipeConfig:
    """A RecipeConfig with the ``model`` and ``ssa`` sections of ``data`` (a stored recipe); the training-only
    sections are not needed here and may come from another version of the schema."""
    try:
        recipe = RecipeConfig(name=str(data.get("name", "converted")),
                              model=from_dict(ModelConfig, data["model"], "model"),
                              ssa=from_dict(SSAConfig, data.get("ssa") or {}, "ssa"))
        recipe.model.validate()
        recipe.ssa.validate()
    except ValueError as err:
        raise ValueError(f"{source}: its recipe is not usable: {err}") from err
    return recipe


def read_model_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """The model tensors of a torch_dist checkpoint (global, layers stacked on dim 0); optimizer state and
    non-tensor entries are not read."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    _require_usable(ckpt)
    reader = _RestrictedMetadataReader(str(ckpt))
    metadata = reader.read_metadata()
    state = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata) and key.startswith(MODEL_PREFIXES) and "_extra_state" not in key
    }
    if not state:
        raise ValueError(f"checkpoint {str(ckpt)!r} holds no model tensors (keys under embedding./decoder./"
                         "output_layer.)")
    with _plain_objects_only(ckpt):
        dcp.load(state, storage_reader=reader, no_dist=True)
    return state
