"""A resume checks that it continues the same run: model and SSA settings against the run's recipe.yaml, the
recipe history (recipe.N.yaml), and the LR schedule when train.steps changed (optim.on_steps_change)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from helpers.training import run_training, tiny_test_recipe
from ssa_megatron.config import to_dict
from ssa_megatron.training import cli
from ssa_megatron.training.run_dir import (PARAMETER_KEYS, SAFE_TO_CHANGE, RecipeChangedError, check_resume,
                                           recipe_changes, record_recipe)


class _Store:
    """What check_resume reads of the run's Checkpointer."""

    def __init__(self, run_dir: Path, checkpoints: int):
        self.dir = run_dir / "checkpoints"
        self._checkpoints = [self.dir / f"step_{i:08d}" for i in range(checkpoints)]

    def complete_checkpoints(self):
        return self._checkpoints


def _started(run_dir: Path, *overrides: str):
    """A run dir whose launch with ``overrides`` started (recipe.yaml written) and saved a checkpoint."""
    recipe = tiny_test_recipe(run_dir, *overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    record_recipe(run_dir, recipe, log=lambda line: None)
    return _Store(run_dir, 1)


# ------------------------------------------------------------------------------------------------------------
# The check and the record, without training (quick).

def test_changed_ssa_setting_is_one_line_naming_old_and_new_and_how_to_proceed(tmp_path):
    store = _started(tmp_path)
    with pytest.raises(RecipeChangedError) as caught:
        check_resume(tiny_test_recipe(tmp_path, "ssa.top_k=4", "ssa.alpha=5"), tmp_path, store)
    message = str(caught.value)
    assert isinstance(caught.value, ValueError) and "\n" not in message
    assert "ssa.top_k 2 -> 4" in message and "ssa.alpha 10.0 -> 5.0" in message
    assert "--allow-changes" in message and "checkpoint.allow_changes=true" in message


def test_allow_changes_lets_the_resume_continue_and_says_so(tmp_path):
    store = _started(tmp_path)
    said = []
    check_resume(tiny_test_recipe(tmp_path, "ssa.top_k=4", "checkpoint.allow_changes=true"), tmp_path, store,
                 log=said.append)
    assert len(said) == 1 and "ssa.top_k 2 -> 4" in said[0]


def test_parameter_shape_changes_are_refused_even_when_allowed(tmp_path):
    store = _started(tmp_path)
    for change in ("model.hidden_size=128", "ssa.gate=none", "model.vocab_size=512"):
        with pytest.raises(RecipeChangedError, match="cannot be loaded") as caught:
            check_resume(tiny_test_recipe(tmp_path, change, "checkpoint.allow_changes=true"), tmp_path, store)
        assert change.split("=")[0] in str(caught.value)


def test_inference_and_speed_settings_may_change(tmp_path):
    store = _started(tmp_path)
    check_resume(tiny_test_recipe(tmp_path, "ssa.inference_top_k=8", "ssa.inference_mode=full", "ssa.backend=reference",
                                  "ssa.overlap_branches=false", "model.init_std=0.01", "train.steps=50",
                                  "optim.lr=1e-4", "parallel.tensor_parallel=2"), tmp_path, store)
    assert not SAFE_TO_CHANGE & PARAMETER_KEYS


def test_no_checkpoint_or_no_resume_means_no_check(tmp_path):
    _started(tmp_path)
    check_resume(tiny_test_recipe(tmp_path, "ssa.top_k=4"), tmp_path, _Store(tmp_path, 0))  # a fresh start
    check_resume(tiny_test_recipe(tmp_path, "ssa.top_k=4", "checkpoint.resume=false"), tmp_path, _Store(tmp_path, 1))


def test_stored_recipe_without_a_newer_key_is_compared_with_its_default(tmp_path):
    old = to_dict(tiny_test_recipe(tmp_path))
    del old["ssa"]["smooth_l1_beta"]  # a recipe written before the key existed
    old["ssa"]["retired_key"] = 1  # and a key the schema no longer has
    assert recipe_changes(old, tiny_test_recipe(tmp_path)) == []
    assert recipe_changes(old, tiny_test_recipe(tmp_path, "ssa.smooth_l1_beta=2.0")) == [
        ("ssa.smooth_l1_beta", 1.0, 2.0)]


def test_recipe_history_keeps_each_replaced_recipe_once(tmp_path):
    def record(*overrides):
        record_recipe(tmp_path, tiny_test_recipe(tmp_path, *overrides), log=lambda line: None)

    def top_k(path):
        return yaml.safe_load(path.read_text())["ssa"]["top_k"]

    record()
    record()  # a requeue with the same recipe adds nothing
    assert sorted(p.name for p in tmp_path.glob("recipe*.yaml")) == ["recipe.yaml"]
    record("ssa.top_k=4")
    record("ssa.top_k=8")
    assert sorted(p.name for p in tmp_path.glob("recipe*.yaml")) == ["recipe.1.yaml", "recipe.2.yaml", "recipe.yaml"]
    assert [top_k(tmp_path / n) for n in ("recipe.1.yaml", "recipe.2.yaml", "recipe.yaml")] == [2, 4, 8]


# ------------------------------------------------------------------------------------------------------------
# Real resumes (slow: tiny training runs).

N = 6


@pytest.mark.slow
def test_resume_refuses_changes_before_loading_and_keeps_the_record(tmp_path, capsys):
    run_dir = tmp_path / "run"
    base = [f"train.steps={N}", f"checkpoint.interval={N // 2}"]
    run_training(tiny_test_recipe(run_dir, *base), max_steps=N // 2)
    recorded = (run_dir / "recipe.yaml").read_text()

    # A changed shape: one line, not Megatron's shape-mismatch traceback from the load.
    with pytest.raises(RecipeChangedError, match=r"model.hidden_size 64 -> 128"):
        run_training(tiny_test_recipe(run_dir, *base, "model.hidden_size=128", "model.ffn_hidden_size=256"))
    # The CLI: one line on stderr, exit 1, and the run dir's record untouched by the launch that failed.
    args = [str(_recipe_file(tmp_path, run_dir, base)), "ssa.top_k=4"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "ssa.top_k 2 -> 4" in err and "--allow-changes" in err and "Traceback" not in err
    assert (run_dir / "recipe.yaml").read_text() == recorded and not list(run_dir.glob("recipe.*.yaml"))

    # --allow-changes: the run continues under the new value, and the old record is kept.
    assert cli.main([*args, "--allow-changes"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and f"step {N}/{N}" in out
    assert yaml.safe_load((run_dir / "recipe.1.yaml").read_text())["ssa"]["top_k"] == 2
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["ssa"]["top_k"] == 4


def _recipe_file(tmp_path: Path, run_dir: Path, overrides: list[str]) -> Path:
    path = tmp_path / "recipe_for_cli.yaml"
    path.write_text(yaml.safe_dump(to_dict(tiny_test_recipe(run_dir, *overrides))))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("choice", ["keep", "restretch"])
def test_longer_train_steps_on_resume_follows_the_chosen_schedule(tmp_path, monkeypatch, capsys, choice):
    """Steps 0-3 of a 4-step run, then a resume with train.steps=8: the LRs the optimizer got are the formula's."""
    import ssa_megatron.training.train as train_module

    lrs = []

    class Recording(train_module.WarmupDecayLR):
        def apply(self, optimizer):
            lrs.append(super().apply(optimizer))
            assert optimizer.param_groups[0]["lr"] == lrs[-1]
            return lrs[-1]

    monkeypatch.setattr(train_module, "WarmupDecayLR", Recording)
    run_dir = tmp_path / "run"
    common = ["optim.lr=1e-3", "optim.min_lr=1e-4", "optim.warmup_steps=2", f"optim.on_steps_change={choice}",
              "checkpoint.interval=4"]
    run_training(tiny_test_recipe(run_dir, "train.steps=4", *common))
    capsys.readouterr()
    lrs.clear()
    resumed = run_training(tiny_test_recipe(run_dir, "train.steps=8", *common))
    assert (resumed.start_step, resumed.end_step) == (4, 8)

    total = 4 if choice == "keep" else 8
    expected = [_lr(step, total, warmup=2, lr=1e-3, min_lr=1e-4) for step in range(4, 8)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    if choice == "keep":
        assert lrs == pytest.approx([1e-4] * 4)  # min_lr held after the original end
    out = capsys.readouterr().out
    note = [line for line in out.splitlines() if line.startswith("LR schedule: train.steps 4 -> 8")]
    assert len(note) == 1 and f"on_steps_change={choice}" in note[0]


def _lr(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / (total - warmup - 1))
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
