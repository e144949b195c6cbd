"""The NSA baseline (model.attention: nsa, recipes/nsa.yaml): fla-core's limits reported in one line, the spec
wiring (three gate logits per head, NSACoreAttention), the window branch and block pooling against brute force, and
each gate reaching its own branch on the CPU path (fla's naive functions). fla's kernels need CUDA:
tests/gpu/test_nsa_gpu.py compares them with this path."""

import math

import pytest
import torch

from helpers.megatron import init_megatron, tiny_recipe


@pytest.fixture
def fla():
    """fla-core's naive NSA functions (the 'nsa' extra; the 'dev' extra installs it too)."""
    return pytest.importorskip("fla.ops.nsa.naive", reason="fla-core is not installed (the 'nsa' extra)")


def _nsa_recipe(**model):
    recipe = tiny_recipe(num_layers=1, seq_length=64)
    recipe.model.attention = "nsa"
    recipe.model.hidden_size, recipe.model.num_attention_heads, recipe.model.num_query_groups = 256, 16, 1
    recipe.nsa.block_size, recipe.nsa.block_counts, recipe.nsa.window_size = 16, 2, 24
    for k, v in model.items():
        setattr(recipe.model, k, v)
    return recipe


def test_fla_limits_are_named_in_one_line():
    from ssa_megatron.config import load_recipe

    with pytest.raises(ValueError, match=r"^model.attention=nsa: fla-core's NSA kernels need num_attention_heads / "
                                         r"num_query_groups to be a power of two >= 16 .*got 4 / 2 = 2$"):
        load_recipe("tiny", ["model.attention=nsa"])
    with pytest.raises(ValueError, match=r"got 32 / 4 = 8$"):
        load_recipe("nsa", ["model.num_query_groups=4"])
    with pytest.raises(ValueError, match=r"^nsa.block_size=16 < 2 x nsa.block_counts=16 \(rounded up to 16\)"):
        load_recipe("nsa", ["nsa.block_size=16", "nsa.block_counts=16"])
    with pytest.raises(ValueError, match=r"parallel.context_parallel=2; the NSA baseline runs without"):
        load_recipe("nsa", ["parallel.context_parallel=2"])
    recipe = load_recipe("nsa")
    assert (recipe.model.attention, recipe.nsa.block_size, recipe.nsa.block_counts, recipe.nsa.window_size) == (
        "nsa", 32, 8, 128)
    assert recipe.nsa.block_size * recipe.nsa.block_counts == recipe.ssa.block_size * recipe.ssa.top_k
    with pytest.raises(ValueError, match="model.attention=nsa: the HF model implements SSA attention only"):
        from ssa_megatron.hf.configuration import hf_config_from_recipe

        hf_config_from_recipe(recipe)


def _brute_window(q, k, v, window, scale, docs=None):
    B, T, HQ, D = q.shape
    group = HQ // k.shape[2]
    out = torch.zeros_like(q)
    for b in range(B):
        for t in range(T):
            for h in range(HQ):
                keys = [j for j in range(max(0, t - window + 1), t + 1) if docs is None or docs[b][j] == docs[b][t]]
                s = torch.stack([q[b, t, h] @ k[b, j, h // group] for j in keys]) * scale
                p = torch.softmax(s, 0)
                out[b, t, h] = sum(p[i] * v[b, j, h // group] for i, j in enumerate(keys))
    return out


@pytest.mark.parametrize("window", [1, 5, 40])
def test_sliding_window_attention_equals_brute_force(window):
    from ssa_megatron.megatron.nsa import sliding_window_attention

    g = torch.Generator().manual_seed(window)
    q = torch.randn(2, 24, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 24, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    scale = 8 ** -0.5
    torch.testing.assert_close(sliding_window_attention(q, k, v, window, scale), _brute_window(q, k, v, window, scale))
    cu = torch.tensor([0, 10, 24, 31, 48])  # documents over the flattened 2 x 24 stream
    docs = [[int(torch.searchsorted(cu, b * 24 + t, right=True)) for t in range(24)] for b in range(2)]
    torch.testing.assert_close(sliding_window_attention(q, k, v, window, scale, cu),
                               _brute_window(q, k, v, window, scale, docs))


def test_block_pooling_equals_the_mean_of_each_block():
    from ssa_megatron.megatron.nsa import _mean_pool

    x = torch.randn(2, 37, 3, 5, dtype=torch.float64)
    pooled = _mean_pool(x, 16)
    assert pooled.shape == (2, 3, 3, 5)
    for i, (a, b) in enumerate([(0, 16), (16, 32), (32, 37)]):
        torch.testing.assert_close(pooled[:, i], x[:, a:b].mean(1))


@pytest.fixture(scope="module")
def nsa_model():
    init_megatron(tp=1, pp=1, cp=1)
    from ssa_megatron.megatron.model import build_gpt_model

    recipe = _nsa_recipe()
    recipe.validate()
    torch.manual_seed(0)
    return build_gpt_model(recipe), recipe


def test_spec_wires_three_gates_per_head_and_the_nsa_core(nsa_model):
    from ssa_megatron.megatron.nsa import NSACoreAttention

    model, recipe = nsa_model
    attn = model.decoder.layers[0].self_attention
    assert isinstance(attn.core_attention, NSACoreAttention) and attn.core_attention.nsa == recipe.nsa
    assert attn.linear_gate.weight.shape == (3 * 16, 256)
    assert "decoder.layers.0.self_attention.linear_gate.weight" in model.state_dict()


def test_each_gate_reaches_its_own_branch(nsa_model, fla):
    """Gate logits of +-30 switch single branches on: the core's output is then exactly that branch."""
    from ssa_megatron.megatron.nsa import _mean_pool, sliding_window_attention

    model, recipe = nsa_model
    core = model.decoder.layers[0].self_attention.core_attention
    g = torch.Generator().manual_seed(1)
    s, b, heads, dim = 64, 2, 16, 16
    q = torch.randn(s, b, heads, dim, generator=g)
    k, v = (torch.randn(s, b, 1, dim, generator=g) for _ in range(2))
    scale = dim ** -0.5
    qb, kb, vb = (t.transpose(0, 1) for t in (q, k, v))
    k_cmp, v_cmp = _mean_pool(kb, 16), _mean_pool(vb, 16)
    naive = fla
    branches = {
        0: naive.naive_nsa_compression(qb, k_cmp, v_cmp, 16, scale)[0],
        1: naive.naive_nsa_selection(qb, kb, vb, naive.naive_nsa_topk(qb, k_cmp, 2, 16, scale), 16, scale),
        2: sliding_window_attention(qb, kb, vb, recipe.nsa.window_size, scale),
    }
    for on, expected in branches.items():
        logits = torch.full((s, b, heads, 3), -30.0)
        logits[..., on] = 30.0
        with torch.no_grad():
            out = core(q, k, v, logits.view(s, b, heads * 3))
        torch.testing.assert_close(out, expected.transpose(0, 1).reshape(s, b, -1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(branches[0], branches[1]) and not torch.allclose(branches[1], branches[2])


def test_model_trains_through_all_three_gates(nsa_model, fla):
    model, _ = nsa_model
    tokens = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(64).expand(2, -1)
    model.zero_grad()
    loss = model(tokens, pos, None, labels=tokens).float().mean()
    assert math.isfinite(float(loss))
    loss.backward()
    grad = model.decoder.layers[0].self_attention.linear_gate.weight.grad.view(16, 3, -1)
    assert (grad.abs().sum(dim=(0, 2)) > 0).all()  # compressed, selected and window gates all learn


@pytest.mark.slow
def test_nsa_trains_through_the_training_loop(tmp_path, fla):
    """Two steps of ssa-train's loop with model.attention nsa (CPU: the naive path): the loss falls, the checkpoint
    holds the three-gate projection."""
    from helpers.training import run_training, tiny_test_recipe

    from ssa_megatron.training.checkpoint import read_model_tensors, resolve_checkpoint

    recipe = tiny_test_recipe(
        tmp_path, "model.attention=nsa", "model.num_layers=1", "model.hidden_size=256", "model.num_attention_heads=16",
        "model.num_query_groups=1", "nsa.block_size=16", "nsa.block_counts=2", "nsa.window_size=24", "ssa.alpha=0",
        "ssa.p_full=1.0", "train.steps=3", "train.metrics_interval=1", "checkpoint.interval=0", "optim.warmup_steps=0")
    result = run_training(recipe)
    assert len(result.losses) == 3 and result.losses[-1] < result.losses[0]
    tensors = read_model_tensors(resolve_checkpoint(tmp_path))
    assert tensors["decoder.layers.self_attention.linear_gate.weight"].shape == (1, 48, 256)
