"""Small recipes and a runner for the training tests (CPU, gloo, world size 1)."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from ssa_megatron.config import RecipeConfig, apply_overrides, from_dict

TEST_OVERRIDES = [
    "name=test", "train.device=cpu", "train.precision=fp32", "data.train_shards=synthetic",
    "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
    "model.num_query_groups=2", "model.vocab_size=256", "model.seq_length=64", "ssa.top_k=2",
    "train.steps=6", "train.micro_batch_size=2", "train.global_batch_size=4", "train.log_interval=2",
    "train.metrics_interval=0", "train.progress_bar=false", "train.wandb=false", "optim.warmup_steps=2",
    "checkpoint.interval=3", "checkpoint.keep_last=2",
]


def tiny_test_recipe(run_dir: str | Path, *overrides: str) -> RecipeConfig:
    """A 2-layer, 64-wide SSA model on synthetic tokens; ``overrides`` as on the command line."""
    data = apply_overrides({}, TEST_OVERRIDES + [f"train.run_dir={run_dir}", *overrides])
    recipe = from_dict(RecipeConfig, data)
    recipe.validate()
    return recipe


def run_training(recipe: RecipeConfig, **kwargs):
    """``train(recipe)``; tears the process group down afterwards unless it existed before."""
    from ssa_megatron.training.parallel import destroy_parallel
    from ssa_megatron.training.train import train

    existed = dist.is_initialized()
    try:
        return train(recipe, **kwargs)
    finally:
        if not existed:
            destroy_parallel()


def resume_in_process_group(rank: int, world_size: int, run_dir: str, overrides: list[str], out: str) -> None:
    """Spawned by ``helpers.megatron.spawn_gloo``: resumes ``run_dir`` under this world size and
    writes rank 0's result (start step, losses) to ``out`` as JSON."""
    import json

    result = run_training(tiny_test_recipe(run_dir, *overrides))
    if rank == 0:
        Path(out).write_text(json.dumps({"start_step": result.start_step, "losses": result.losses}))
