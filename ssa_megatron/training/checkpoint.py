"""Atomic, resumable checkpoints with ``megatron.core.dist_checkpointing`` (torch_dist format).

Layout under ``checkpoint.dir`` (default ``<run_dir>/checkpoints``)::

    step_00000100/        a complete checkpoint (DCP shards + Megatron metadata + train_state.json)
    step_00000200/
    latest                the name of the newest complete checkpoint (replaced atomically)
    .tmp-step_00000300/   a save in progress (or one that was killed); never read, removed by the next save

A save writes everything into the temporary directory, then renames it to ``step_N`` and only then replaces the
``latest`` marker (write + fsync + ``os.replace``). A process killed at any moment therefore leaves ``latest``
naming a complete checkpoint. Older checkpoints beyond ``keep_last`` are deleted after the marker moves.

What a checkpoint holds is assembled by ``training_state`` below: model chunks, optimizer, LR scheduler, RNG
states (per rank), data-loader position (per data-parallel rank), step, consumed tokens, parallel layout and
the resolved recipe. The model and optimizer are saved as resharding-capable sharded tensors, so a run may
resume under another TP/PP/DP layout; RNG and data positions are then restarted (with a warning), because they
are per-rank objects.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.utils import unwrap_model

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
LATEST = "latest"


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


class Checkpointer:
    """Saves and finds checkpoints in one directory. All ranks call ``save``; rank 0 does the renames."""

    def __init__(self, directory: str | Path, keep_last: int, rank: int = 0):
        self.dir = Path(directory).expanduser()
        self.keep_last = keep_last
        self.rank = rank

    @staticmethod
    def step_dir_name(step: int) -> str:
        return f"step_{step:08d}"

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoint directories, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The checkpoint the ``latest`` marker names, or None when there is none yet."""
        marker = self.dir / LATEST
        if not marker.is_file():
            return None
        path = self.dir / marker.read_text().strip()
        if not (path / "train_state.json").is_file():
            raise RuntimeError(f"{marker} names {path.name}, which is not a complete checkpoint")
        return path

    def save(self, step: int, state: dict, extra: dict | None = None) -> Path:
        """Writes ``state`` (a sharded state dict) as checkpoint ``step``; returns its directory."""
        final = self.dir / self.step_dir_name(step)
        tmp = self.dir / f".tmp-{final.name}"
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob(".tmp-step_*"):  # a save that was killed
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        _barrier()
        _use_in_process_results_queue()
        dist_checkpointing.save(state, str(tmp))
        _barrier()
        if self.rank == 0:
            info = {"step": step, **(extra or {})}
            with open(tmp / "train_state.json", "w") as f:
                json.dump(info, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():  # re-saving a step (e.g. after a resume): keep the marker valid throughout
                old = self.dir / f".tmp-old-{final.name}"
                os.rename(final, old)
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
            _fsync_dir(self.dir)
            _write_atomic(self.dir / LATEST, final.name + "\n")
            self._prune(keep=final)
        _barrier()
        return final

    def _prune(self, keep: Path) -> None:
        complete = [p for p in self.complete_checkpoints() if p != keep]
        for old in complete[: max(0, len(complete) - (self.keep_last - 1))]:
            shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def read_train_state(path: Path) -> dict:
        return json.loads((path / "train_state.json").read_text())

    @staticmethod
    def load(path: Path, template: dict) -> dict:
        """Loads the tensors and objects ``template`` asks for (built with ``is_loading=True``)."""
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
