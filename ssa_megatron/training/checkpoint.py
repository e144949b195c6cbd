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

This module is the one home of checkpoints: the directory and its ``latest`` marker (``Checkpointer``,
``read_latest``), what a training checkpoint holds (``training_state``), a run's save / resume / weight loading
(``RunCheckpoints``), and reading a checkpoint without a process group or a model (``resolve_checkpoint``,
``read_checkpoint_recipe``, ``read_model_tensors``: the input of the HF conversion and of evaluation).
"""

from __future__ import annotations

import contextlib
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

from ssa_megatron.config import ModelConfig, RecipeConfig, SSAConfig, from_dict, to_dict
from ssa_megatron.training.optimizer import place_fused_adamw_steps, torch_optimizers

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
LATEST = "latest"


# ------------------------------------------------------------------------------------------------------------
# The checkpoint directory: atomic saves, the latest marker, pruning.

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
        path = read_latest(self.dir)
        if path is not None and not (path / "train_state.json").is_file():
            raise RuntimeError(f"{self.dir / LATEST} names {path.name}, which is not a complete checkpoint")
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
        """Resumes from the latest checkpoint (``checkpoint.resume``), else loads the weights of
        ``checkpoint.load``; returns (step, consumed tokens) to continue from, (0, 0) for a fresh start."""
        latest = self.store.latest() if self.recipe.checkpoint.resume else None
        if latest is not None:
            self.resumed_from = latest
            return self._resume(latest)
        if self.recipe.checkpoint.load:
            self._load_weights(Path(self.recipe.checkpoint.load))
        return 0, 0

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
        """checkpoint.load: model weights only (a fresh optimizer, schedule and data position)."""
        path = read_latest(path) or path
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
    """The checkpoint directory that ``path`` names: a run dir (``<run>/checkpoints/latest``), a checkpoint dir
    (``latest`` marker) or one checkpoint (``step_XXXXXXXX`` with ``metadata.json``)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"checkpoint {str(p)!r} does not exist (expected a run directory, its checkpoints/ "
                         "directory or one step_XXXXXXXX checkpoint)")
    if (p / "checkpoints").is_dir() and not (p / LATEST).is_file():
        p = p / "checkpoints"
    latest = read_latest(p)
    if latest is not None:
        if not latest.is_dir():
            raise ValueError(f"checkpoint {str(p)!r}: its latest marker names {str(latest.relative_to(p))!r}, "
                             "which does not exist")
        p = latest
    if not (p / "metadata.json").is_file() or not (p / ".metadata").is_file():
        raise ValueError(f"checkpoint {str(path)!r}: {str(p)!r} is not a torch_dist checkpoint (no metadata.json / "
                         ".metadata); pass a run directory, its checkpoints/ directory or a step_XXXXXXXX directory")
    return p


def read_checkpoint_recipe(ckpt: Path) -> tuple[RecipeConfig, dict]:
    """The recipe a checkpoint was written with (common state, else the run directory's recipe.yaml): a
    RecipeConfig with its model and SSA sections (others at their defaults), and the stored dict as is."""
    data = None
    try:
        data = dist_checkpointing.load_common_state_dict(str(ckpt)).get("recipe")
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

    reader = dcp.FileSystemReader(str(ckpt))
    metadata = reader.read_metadata()
    state = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata) and key.startswith(MODEL_PREFIXES) and "_extra_state" not in key
    }
    if not state:
        raise ValueError(f"checkpoint {str(ckpt)!r} holds no model tensors (keys under embedding./decoder./"
                         "output_layer.)")
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state
