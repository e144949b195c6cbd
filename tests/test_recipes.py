"""Every bundled recipe loads and validates; bad values raise ValueError naming the key; the paper recipe is exact."""

from pathlib import Path

import pytest

from ssa_megatron.config import load_recipe

RECIPES = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


def test_all_recipes_present():
    assert {"tiny", "125m", "ssa_1b", "ssa_7b", "full_attn", "moba"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads_and_validates(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe.train.global_batch_size % recipe.train.micro_batch_size == 0
    par = recipe.parallel
    assert recipe.model.num_query_groups % par.tensor_parallel == 0


def test_ssa_1b_is_the_paper_setup():
    r = load_recipe("ssa_1b")
    m = r.model
    assert (m.hidden_size, m.ffn_hidden_size, m.num_layers) == (2048, 8192, 16)
    assert (m.num_attention_heads, m.num_query_groups, m.head_dim) == (32, 2, 64)
    assert (m.rope_theta, m.tie_embeddings, m.seq_length, m.vocab_size) == (500000.0, True, 8192, 128256)
    assert (r.ssa.block_size, r.ssa.top_k, r.ssa.p_full, r.ssa.alpha) == (16, 16, 0.5, 10.0)
    assert (r.optim.lr, r.optim.betas, r.optim.weight_decay, r.optim.grad_clip) == (1e-3, (0.9, 0.95), 0.1, 1.0)
    assert (r.optim.warmup_fraction, r.optim.decay_style, r.optim.min_lr) == (0.01, "cosine", 0.0)
    tokens_per_step = r.train.global_batch_size * m.seq_length
    assert tokens_per_step == 384 * 8192 == 3_145_728  # "3.15M tokens per step"
    assert abs(tokens_per_step * r.train.steps - 100e9) / 100e9 < 1e-3  # 100B tokens
    assert r.train.precision == "bf16"


@pytest.mark.parametrize("overlay, p_full, alpha", [("full_attn", 1.0, 0.0), ("moba", 0.0, 0.0)])
def test_baseline_overlays_change_only_the_mode(overlay, p_full, alpha):
    base, r = load_recipe("ssa_1b"), load_recipe(overlay)
    assert (r.ssa.p_full, r.ssa.alpha) == (p_full, alpha)
    assert r.model == base.model and r.optim == base.optim
    assert (r.ssa.block_size, r.ssa.top_k, r.ssa.score) == (base.ssa.block_size, base.ssa.top_k, base.ssa.score)
    assert r.train.run_dir != base.train.run_dir


def test_ssa_7b_layout_fits_8_gpu_nodes():
    r = load_recipe("ssa_7b")
    mp = r.parallel.tensor_parallel * r.parallel.pipeline_parallel * r.parallel.context_parallel
    assert 8 % mp == 0 and r.model.num_layers == 32 and r.model.hidden_size == 4096
    assert r.model.num_attention_heads % r.parallel.tensor_parallel == 0


@pytest.mark.parametrize("override, key", [
    ("optim.lr=-1", "optim.lr"),
    ("optim.lr=0", "optim.lr"),
    ("optim.min_lr=0.5", "optim.min_lr"),
    ("optim.warmup_fraction=1.5", "optim.warmup_fraction"),
    ("optim.warmup_steps=-3", "optim.warmup_steps"),
    ("optim.betas=[0.9, 1.0]", "optim.betas"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("optim.eps=0", "optim.eps"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("optim.grad_clip=-1", "optim.grad_clip"),
    ("optim.decay_style=step", "optim.decay_style"),
    ("train.steps=0", "train.steps"),
    ("train.micro_batch_size=0", "train.micro_batch_size"),
    ("train.global_batch_size=7", "train.global_batch_size"),
    ("train.precision=fp8", "train.precision"),
    ("train.recompute=some", "train.recompute"),
    ("train.log_interval=0", "train.log_interval"),
    ("train.eval_interval=-1", "train.eval_interval"),
    ("train.device=tpu", "train.device"),
    ("train.steps=ten", "train.steps"),
    ("train.no_such_key=1", "train.no_such_key"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last"),
    ("checkpoint.interval=-5", "checkpoint.interval"),
    ("ssa.p_full=2", "ssa.p_full"),
    ("model.seq_length=100", "model.seq_length"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_recipe("tiny", [override])


def test_unknown_recipe_is_a_value_error():
    with pytest.raises(ValueError, match="no_such_recipe"):
        load_recipe("no_such_recipe")
