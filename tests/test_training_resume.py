"""Resume equivalence: N steps uninterrupted == N/2 steps, a restart from the checkpoint, N/2 more steps.

Same losses bitwise (CPU, gloo, world size 1, fp32), including the data position: the resumed run consumes exactly
the batches the uninterrupted run would have. Checked on synthetic tokens, and on the embedded default corpus
through the data pipeline's resumable loader.
"""

import pytest
import torch

from helpers.training import run_training, tiny_test_recipe

N = 6


@pytest.mark.slow
@pytest.mark.parametrize("data", ["synthetic", "builtin"])
def test_resume_gives_the_same_loss_curve(tmp_path, data):
    overrides = [f"train.steps={N}", f"checkpoint.interval={N // 2}"]
    if data == "builtin":
        builtin = pytest.importorskip("ssa_megatron.data.builtin")
        # 1 MB of the embedded corpus (the whole library takes ~20 s to tokenize), read through TokenLoader.
        shards, _ = builtin.ensure_builtin_corpus(tmp_path / "cache", 64, 512, max_mb=1.0, progress=False,
                                                  log=lambda line: None)
        overrides += [f"data.train_shards={shards}", "data.num_workers=0", "model.vocab_size=512"]
    a_dir, b_dir = tmp_path / "uninterrupted", tmp_path / "interrupted"

    full = run_training(tiny_test_recipe(a_dir, *overrides))
    first = run_training(tiny_test_recipe(b_dir, *overrides), max_steps=N // 2)
    second = run_training(tiny_test_recipe(b_dir, *overrides))

    assert (first.end_step, second.start_step, second.end_step) == (N // 2, N // 2, N)
    assert first.losses + second.losses == full.losses  # bitwise
    assert full.losses[-1] < full.losses[0]

    # Same final model and the same data position in both checkpoints.
    from ssa_megatron.training.checkpoint import Checkpointer

    a = Checkpointer(a_dir / "checkpoints", 2).latest()
    b = Checkpointer(b_dir / "checkpoints", 2).latest()
    assert a.name == b.name == f"step_{N:08d}"
    flat_a = torch.load(_flatten(a, tmp_path / "a.pt"), weights_only=False)
    flat_b = torch.load(_flatten(b, tmp_path / "b.pt"), weights_only=False)
    tensors = [k for k, v in flat_a.items() if torch.is_tensor(v)]  # model weights and optimizer moments
    assert any(k.startswith("decoder.") for k in tensors) and any(k.startswith("optimizer.") for k in tensors)
    for key in tensors:
        assert torch.equal(flat_a[key], flat_b[key]), key
    assert _data_state(flat_a) == _data_state(flat_b)


def _flatten(ckpt, out):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(ckpt), str(out))
    return out


def _data_state(flat):
    keys = [k for k in flat if k.startswith("data_state")]
    assert keys, "the checkpoint holds the data position"
    return [flat[k] for k in sorted(keys)]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["stop_file", "sigterm"])
def test_stop_request_checkpoints_exits_and_resumes(tmp_path, how):
    """What the SLURM scripts rely on before a time limit: the step finishes, a checkpoint is written, the run
    exits cleanly, and the next launch continues the same curve."""
    import os
    import signal

    overrides = [f"train.steps={N}", "checkpoint.interval=100"]
    reference = run_training(tiny_test_recipe(tmp_path / "reference", *overrides))

    run_dir = tmp_path / "run"

    def request_stop(step, _model):
        if step == 1:
            if how == "stop_file":
                (run_dir / "STOP").touch()
            else:
                os.kill(os.getpid(), signal.SIGTERM)

    first = run_training(tiny_test_recipe(run_dir, *overrides), step_hook=request_stop)
    # Requested during step 2; the vote rides on step 2's report, read while step 3 runs: the run stops after 3.
    assert first.stopped_by_signal and first.end_step == 3
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    second = run_training(tiny_test_recipe(run_dir, *overrides))
    assert second.start_step == 3 and not (run_dir / "STOP").exists()
    assert first.losses + second.losses == reference.losses


@pytest.mark.slow
def test_resume_under_tensor_parallelism(tmp_path):
    """A checkpoint written at TP 1 (one process) resumes at TP 2 (two gloo processes): Megatron reshards model
    and optimizer; the data-parallel size is unchanged, so the data position is restored too, and the curve
    continues the uninterrupted one up to the rounding of split matmuls."""
    import json

    from helpers.megatron import spawn_gloo
    from helpers.training import resume_in_process_group

    overrides = [f"train.steps={N}", f"checkpoint.interval={N // 2}"]
    full = run_training(tiny_test_recipe(tmp_path / "reference", *overrides))
    run_dir = tmp_path / "run"
    first = run_training(tiny_test_recipe(run_dir, *overrides), max_steps=N // 2)
    out = tmp_path / "resumed.json"
    spawn_gloo(resume_in_process_group, 2, str(run_dir), overrides + ["parallel.tensor_parallel=2"], str(out))
    resumed = json.loads(out.read_text())
    assert resumed["start_step"] == N // 2
    assert first.losses == full.losses[: N // 2]
    assert resumed["losses"] == pytest.approx(full.losses[N // 2:], abs=2e-4)




def test_checkpoint_keys_are_those_of_the_bare_model():
    """On GPU each chunk is wrapped in Megatron's DDP (whose sharded_state_dict prefixes 'module.'). Checkpoints use
    the bare model's keys, so they load whatever the wrapping (a resumed GPU run failed on this before)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from ssa_megatron.megatron.model import build_gpt_model
    from helpers.megatron import init_megatron, tiny_recipe
    from ssa_megatron.training.checkpoint import load_model_chunks, training_state

    init_megatron()
    recipe = tiny_recipe()
    bare = build_gpt_model(recipe)
    wrapped = DistributedDataParallel(config=bare.config, ddp_config=DistributedDataParallelConfig(),
                                      module=build_gpt_model(recipe))
    assert set(wrapped.sharded_state_dict()) != set(bare.sharded_state_dict())  # the wrapper adds 'module.'
    state = training_state(model_chunks=[wrapped], optimizer=None, scheduler=None, data_state=None, step=0,
                           consumed_tokens=0, recipe={}, dims=_Dims(), with_optimizer=False,
                           with_rank_objects=False)
    assert set(state["model"]) == set(bare.sharded_state_dict())
    load_model_chunks([wrapped], {"model": bare.state_dict()})
    for (name, a), b in zip(bare.state_dict().items(), wrapped.module.state_dict().values()):
        if torch.is_tensor(a):
            assert torch.equal(a, b), name


class _Dims:
    pp = tp = cp = dp = 1
    pp_rank = tp_rank = cp_rank = dp_rank = 0
    vpp = None
    world_size = 1
