"""The ssa-train command: argument handling, and a short end-to-end run that prints where its outputs went."""

import pytest

from ssa_megatron.training import cli
from helpers.training import TEST_OVERRIDES


def test_print_recipe(capsys):
    assert cli.main(["ssa_1b", "train.steps=5", "--print-recipe"]) == 0
    out = capsys.readouterr().out
    assert "hidden_size: 2048" in out and "steps: 5" in out


def test_bad_override_is_reported_with_its_key(capsys):
    assert cli.main(["tiny", "optim.lr=-1"]) == 2
    assert "optim.lr" in capsys.readouterr().err
    assert cli.main(["tiny", "train.steps"]) == 2
    assert "section.key=value" in capsys.readouterr().err


@pytest.mark.slow
def test_end_to_end_tiny_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["tiny", *TEST_OVERRIDES, f"train.run_dir={run_dir}", "train.steps=4", "checkpoint.interval=0",
            "train.eval_interval=4", "train.eval_batches=1", "train.metrics_interval=2"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "ssa-train: recipe 'test'" in out
    assert "step 4/4 | loss" in out and "eval @ step 4" in out
    assert f"checkpoint: {run_dir / 'checkpoints' / 'step_00000004'}" in out
    assert f"TensorBoard logs: {run_dir / 'tensorboard'}" in out
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "recipe.yaml").is_file()
    # A second launch of the same command, or one with fewer steps, resumes, says in one line that there is
    # nothing left to do, and exits 0 without a loss line.
    for again in (args, [*args, "train.steps=2"]):
        assert cli.main(again) == 0
        out = capsys.readouterr().out
        assert "is at step 4 and train.steps is" in out and "nothing to train" in out
        assert "nan" not in out and "done:" not in out


@pytest.mark.slow
def test_tensorboard_has_the_logged_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    assert cli.main(["tiny", *TEST_OVERRIDES, f"train.run_dir={run_dir}", "train.steps=2", "train.log_interval=1",
                     "train.metrics_interval=1", "checkpoint.interval=0", "checkpoint.save_at_end=false"]) == 0
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("loss/lm", "loss/align", "optim/lr", "optim/grad_norm", "throughput/tokens_per_s",
                "throughput/tflops_per_gpu", "memory/peak_gib", "attn/sparsity", "attn/sparsity/layer_00"):
        assert tag in tags, (tag, sorted(tags))
    assert any(t.startswith("loss/lm_") for t in tags)
