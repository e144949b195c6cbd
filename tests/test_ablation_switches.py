"""The paper's ablation switches and the output-layer init (issue 18 items 5 and 8), against the reference:
``ssa.alignment`` (one-direction alignment: which branch a term moves), ``ssa.mode_sampling: per_layer`` (modes differ
across the layers of one micro-batch) and ``model.scaled_output_init`` (the std of the output projections)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers.megatron import init_megatron, tiny_recipe
from ssa_megatron.config import SSAConfig
from ssa_megatron.megatron import mode as mode_lib
from ssa_megatron.ssa import reference as R
from ssa_megatron.ssa import ssa_attention

# ------------------------------------------------------------------------------------------ one-direction alignment


@pytest.mark.parametrize("terms, moves_full, moves_sparse", [
    ("bidirectional", True, True), ("sparsity_only", True, False), ("commitment_only", False, True)])
def test_alignment_terms_move_only_their_branch(terms, moves_full, moves_sparse):
    torch.manual_seed(0)
    o_full = torch.randn(8, 1, 2, 4, dtype=torch.float64, requires_grad=True)
    o_sparse = torch.randn(8, 1, 2, 4, dtype=torch.float64, requires_grad=True)
    total, sparsity, commitment = R.alignment_loss(o_full, o_sparse, terms=terms)
    g_full, g_sparse = torch.autograd.grad(total, (o_full, o_sparse), allow_unused=True)
    assert (g_full is not None) == moves_full and (g_sparse is not None) == moves_sparse
    # the stopped branch is the other one's target: the gradient is SmoothL1's toward it
    if moves_full:
        torch.testing.assert_close(g_full, torch.autograd.grad(F.smooth_l1_loss(o_full, o_sparse.detach()), o_full)[0])
    if moves_sparse:
        torch.testing.assert_close(g_sparse,
                                   torch.autograd.grad(F.smooth_l1_loss(o_full.detach(), o_sparse), o_sparse)[0])
    assert torch.isclose(total, sparsity + commitment if terms == "bidirectional" else sparsity)


def _layer_inputs():
    torch.manual_seed(1)
    q = torch.randn(64, 1, 4, 8, requires_grad=True)
    k, v = (torch.randn(64, 1, 2, 8, requires_grad=True) for _ in range(2))
    gate = torch.randn(64, 1, 4, requires_grad=True)
    return q, k, v, gate


@pytest.mark.parametrize("backend", ["reference", "triton"])  # triton: the fused kernel must step aside
@pytest.mark.parametrize("terms", ["sparsity_only", "commitment_only"])
def test_ssa_attention_one_direction_matches_the_reference_term(terms, backend):
    q, k, v, gate = _layer_inputs()
    cfg = SSAConfig(block_size=16, top_k=2, alpha=10.0, alignment=terms, backend=backend)
    _, loss, stats = ssa_attention(q, k, v, gate, cfg, "sparse", training=True)
    got = torch.autograd.grad(loss, (q, k, v, gate))

    idx, _ = R.select_blocks(q.detach(), k.detach(), 16, 2)
    gated_full = R.apply_gate(R.full_attention(q, k, v)[0], gate)
    gated_sparse = R.apply_gate(R.sparse_attention(q, k, v, idx, 16)[0], gate)
    if terms == "sparsity_only":  # the full branch moves toward the stopped sparse output
        want_loss = F.smooth_l1_loss(gated_full, gated_sparse.detach())
    else:
        want_loss = F.smooth_l1_loss(gated_full.detach(), gated_sparse)
    want = torch.autograd.grad(want_loss, (q, k, v, gate))
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-7)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert stats.sparsity_loss is not None and stats.commitment_loss is not None  # both logged either way


# ------------------------------------------------------------------------------------------ per-layer modes


def test_per_layer_modes_are_own_draws_and_deterministic():
    sampler = mode_lib.ModeSampler(seed=7)
    layers = [mode_lib.LayerMode(0.5, "sparse", sampler, layer=n) for n in range(1, 9)]
    shared = [mode_lib.LayerMode(0.5, "sparse", sampler) for _ in range(8)]
    mixed = 0
    for it in range(20):
        sampler.set_iteration(it)
        for mb in range(2):
            per_layer = [m.choose(True, mb) for m in layers]
            assert per_layer == [m.choose(True, mb) for m in layers]  # same on every call (every rank)
            assert len({m.choose(True, mb) for m in shared}) == 1
            mixed += len(set(per_layer)) > 1
    assert mixed >= 30  # 8 fair draws agree with probability 2^-7


@pytest.fixture(scope="module")
def megatron_world():
    init_megatron(tp=1, pp=1, cp=1)
    yield


def _modes_of_one_forward(monkeypatch, mode_sampling: str, iteration: int) -> list[str]:
    from ssa_megatron.megatron import attention as meg_attention
    from ssa_megatron.megatron.model import build_gpt_model

    seen = []

    def spy(q, k, v, gate, cfg, mode, training, **kwargs):
        seen.append(mode)
        return ssa_attention(q, k, v, gate, cfg, mode, training, **kwargs)

    monkeypatch.setattr(meg_attention, "ssa_attention", spy)
    recipe = tiny_recipe(num_layers=6, alpha=10.0, p_full=0.5, mode_sampling=mode_sampling)
    model = build_gpt_model(recipe)
    model.train()
    mode_lib.MODE_SAMPLER.set_iteration(iteration)
    tokens = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(0))
    model(tokens, torch.arange(64).expand(2, -1), None, labels=tokens).mean().backward()
    return seen


def test_per_layer_modes_differ_across_layers_of_one_microbatch(megatron_world, monkeypatch):
    seed = mode_lib.MODE_SAMPLER.seed
    iteration = next(it for it in range(100)
                     if len({mode_lib.sample_mode(seed, it, 0, 0.5, layer) for layer in range(1, 7)}) > 1)
    per_layer = _modes_of_one_forward(monkeypatch, "per_layer", iteration)
    assert per_layer == [mode_lib.sample_mode(seed, iteration, 0, 0.5, layer) for layer in range(1, 7)]
    assert len(set(per_layer)) == 2
    per_microbatch = _modes_of_one_forward(monkeypatch, "per_microbatch", iteration)
    assert per_microbatch == [mode_lib.sample_mode(seed, iteration, 0, 0.5)] * 6


# ------------------------------------------------------------------------------------------ output-layer init


@pytest.mark.parametrize("scaled", [True, False])
def test_scaled_output_init_sets_the_std_of_the_output_projections(megatron_world, scaled):
    from ssa_megatron.megatron.model import build_gpt_model

    recipe = tiny_recipe(num_layers=8)
    recipe.model.scaled_output_init = scaled
    torch.manual_seed(3)
    model = build_gpt_model(recipe)
    std = recipe.model.init_std
    want_out = std / math.sqrt(2 * 8) if scaled else std
    for name, p in model.named_parameters():
        if p.dim() < 2:
            continue  # norm weights
        want = want_out if name.endswith(("linear_proj.weight", "linear_fc2.weight")) else std
        # the std of n normal samples is within 4 standard errors (want / sqrt(2n)) of the true one
        assert abs(p.detach().float().std().item() - want) < 4 * want / math.sqrt(2 * p.numel()), name


# ------------------------------------------------------------------------------------------ recipes


def test_ssa_300m_is_the_paper_ablation_model():
    from ssa_megatron.config import load_recipe

    r = load_recipe("ssa_300m")
    m = r.model
    assert (m.hidden_size, m.ffn_hidden_size, m.num_layers, m.head_dim) == (1024, 4096, 16, 64)
    assert m.num_attention_heads // m.num_query_groups == 16  # 16:1 heads
    assert (r.ssa.block_size, r.ssa.top_k, r.ssa.p_full, r.ssa.alpha) == (16, 16, 0.5, 10.0)
    assert abs(r.train.global_batch_size * m.seq_length * r.train.steps - 50e9) / 50e9 < 1e-3  # 50B tokens
    assert not m.scaled_output_init  # the authors' init


@pytest.mark.parametrize("overlay, section, key, value", [
    ("ssa_300m_per_layer_mode", "ssa", "mode_sampling", "per_layer"),
    ("ssa_300m_sparsity_only", "ssa", "alignment", "sparsity_only"),
    ("ssa_300m_commitment_only", "ssa", "alignment", "commitment_only"),
])
def test_ablation_overlays_change_only_their_switch(overlay, section, key, value):
    import dataclasses

    from ssa_megatron.config import load_recipe

    base, r = load_recipe("ssa_300m"), load_recipe(overlay)
    assert getattr(getattr(r, section), key) == value
    assert dataclasses.replace(getattr(r, section), **{key: getattr(getattr(base, section), key)}) == \
        getattr(base, section)
    assert r.model == base.model and r.optim == base.optim and r.train.run_dir != base.train.run_dir
