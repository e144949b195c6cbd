"""The run directory's record of its recipe, and the check that a resume continues the same run.

``<run_dir>/recipe.yaml`` is the resolved recipe of the newest launch that started training: it is written just
before the first step, so a launch that fails at start-up (a bad resume, a missing data path) leaves it as it was.
When a launch starts with a different recipe, the file it replaces is kept as ``recipe.N.yaml``, N = 1, 2, ... in
the order they were replaced (``recipe.1.yaml`` is the oldest). A launch with the same recipe (a requeued job)
adds nothing, so the numbered files are the run's history of changes, not one file per launch.

A resume is compared with that record before any checkpoint is loaded (:func:`check_resume`). The ``model`` and
``ssa`` sections are checked, except :data:`SAFE_TO_CHANGE`: settings for evaluation and inference only, speed
switches with the same results, and the initialisation a resumed model no longer uses. A difference stops the
launch with one line naming each key (old -> new), unless ``checkpoint.allow_changes`` (``ssa-train
--allow-changes``) says it is meant. Keys in :data:`PARAMETER_KEYS` change the parameters a checkpoint holds, so
they are refused either way: such a checkpoint cannot be loaded into the new model.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist
import yaml

from ssa_megatron.config import RecipeConfig, to_dict

RECIPE = "recipe.yaml"
_KEPT = re.compile(r"^recipe\.(\d+)\.yaml$")

CHECKED_SECTIONS = ("model", "ssa")
SAFE_TO_CHANGE = frozenset({
    "model.init_std",  # initialisation only: a resumed model loads its weights
    "ssa.inference_mode", "ssa.inference_top_k", "ssa.inference_block_size",  # evaluation and inference only
    "ssa.backend",  # the same math (kernels or reference)
    "ssa.overlap_branches",  # speed only, bitwise the same
})
PARAMETER_KEYS = frozenset({
    "model.num_layers", "model.hidden_size", "model.ffn_hidden_size", "model.num_attention_heads",
    "model.num_query_groups", "model.vocab_size", "model.tie_embeddings", "ssa.gate",
    "model.attention",  # nsa has three gate logits per head, ssa one
})
"""Keys whose change adds, removes or reshapes parameters."""


class RecipeChangedError(ValueError):
    """A resume with model or SSA settings other than the run's (a one-line message naming the keys)."""


def recipe_changes(old: dict, new: RecipeConfig) -> list[tuple[str, Any, Any]]:
    """``(key, old, new)`` for each checked key whose value differs. A key the stored recipe lacks (written before
    the key existed) is compared with its default; a key the schema no longer has is ignored."""
    defaults, current = to_dict(RecipeConfig()), to_dict(new)
    changes = []
    for section in CHECKED_SECTIONS:
        stored = old.get(section) or {}
        for key, value in current[section].items():
            name = f"{section}.{key}"
            before = stored.get(key, defaults[section][key])
            if name not in SAFE_TO_CHANGE and before != value:
                changes.append((name, before, value))
    return changes


def check_resume(recipe: RecipeConfig, run_dir: Path, store, log: Callable[[str], None] = print) -> None:
    """Before a resume (``checkpoint.resume``, and ``store``, the run's ``Checkpointer``, holds a checkpoint):
    compares ``recipe`` with the run's recipe.yaml (else the one beside the checkpoint directory) and raises
    :class:`RecipeChangedError` on a change that is not allowed. Rank 0 reads and decides; every rank raises the
    same error."""
    if not recipe.checkpoint.resume:
        return
    message = None
    if (not dist.is_initialized() or dist.get_rank() == 0) and store.complete_checkpoints():
        try:
            message = _resume_problem(recipe, run_dir, store.dir, log)
        except OSError as err:  # every rank must reach the broadcast below
            message = f"{run_dir / RECIPE}: {err}"
    if dist.is_initialized() and dist.get_world_size() > 1:
        shared = [message]
        dist.broadcast_object_list(shared, src=0)
        message = shared[0]
    if message is not None:
        raise RecipeChangedError(message)


def _resume_problem(recipe: RecipeConfig, run_dir: Path, checkpoint_dir: Path, log) -> str | None:
    candidates = [run_dir / RECIPE, checkpoint_dir.parent / RECIPE]
    saved = next((p for p in candidates if p.is_file()), None)
    if saved is None:
        log(f"resume: no {RECIPE} in {run_dir}; the checkpoint's model and SSA settings are not compared with "
            "this recipe")
        return None
    try:
        old = yaml.safe_load(saved.read_text())
    except yaml.YAMLError as err:
        return f"{saved}: not readable YAML ({str(err).splitlines()[0]}); restore it, or delete it to resume unchecked"
    if not isinstance(old, dict):
        return f"{saved}: expected the recipe mapping of the run; restore it, or delete it to resume unchecked"
    changes = recipe_changes(old, recipe)
    if not changes:
        return None
    listed = ", ".join(f"{key} {before!r} -> {after!r}" for key, before, after in changes)
    reshaped = [key for key, _, _ in changes if key in PARAMETER_KEYS]
    where = f"train.run_dir={str(run_dir)!r} was trained with other settings ({saved}): {listed}"
    if reshaped:
        return (f"{where}; {', '.join(reshaped)} change{'s' if len(reshaped) == 1 else ''} the model's parameters, "
                "so its checkpoints cannot be loaded: undo the change, or start a new run in another train.run_dir")
    if recipe.checkpoint.allow_changes:
        log(f"resume with changed settings (checkpoint.allow_changes): {listed}")
        return None
    return (f"{where}; to continue its checkpoint with the new values add --allow-changes "
            "(checkpoint.allow_changes=true), or undo the change, or use another train.run_dir for a new run")


def record_recipe(run_dir: Path, recipe: RecipeConfig, log: Callable[[str], None] = print) -> Path:
    """Writes ``<run_dir>/recipe.yaml`` (call once training starts); a different previous one is kept as
    ``recipe.N.yaml``. Returns the path written."""
    path = run_dir / RECIPE
    text = yaml.safe_dump(to_dict(recipe), sort_keys=False)
    if path.is_file():
        previous = path.read_text()
        if previous == text:
            return path
        numbers = [int(m.group(1)) for p in run_dir.iterdir() if (m := _KEPT.match(p.name))]
        kept = run_dir / f"recipe.{max(numbers, default=0) + 1}.yaml"
        _write_atomic(kept, previous)
        log(f"recipe: {path} (the previous one is kept as {kept.name})")
    _write_atomic(path, text)
    return path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
