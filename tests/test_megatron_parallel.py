"""Tensor and context parallelism on CPU with 2 gloo processes, against one process."""

import pytest
import torch

from helpers.megatron import init_megatron, spawn_gloo, tiny_recipe


def _core_attention(cp_size: int, ssa, cp_comm_type: str = "all_gather"):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ssa_megatron.megatron.attention import SSACoreAttention

    cfg = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                            context_parallel_size=cp_size, cp_comm_type=cp_comm_type, hidden_dropout=0.0,
                            attention_dropout=0.0, use_cpu_initialization=True)
    return SSACoreAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self",
                            cp_comm_type=cp_comm_type, ssa=ssa)


def test_cp_comm_type_must_be_all_gather():
    from ssa_megatron.megatron.context_parallel import check_cp_comm_type

    check_cp_comm_type("all_gather", 1)
    check_cp_comm_type(["p2p", "allgather"], 2)  # one per layer: layer 2's
    with pytest.raises(NotImplementedError, match="a2a"):
        check_cp_comm_type("a2a", 1)
    with pytest.raises(ValueError, match="'p2p' is not supported"):
        check_cp_comm_type(["p2p", "allgather"], 1)


@pytest.mark.parametrize("cp", [1, 2, 3])
def test_zigzag_layout_round_trip(cp):
    """Each rank's chunks (``split_zigzag``) are named by ``zigzag_positions``; written where the exchange's two
    gathers put them (first chunks in rank order, second chunks into ``_second_chunks``' views), they are the
    natural sequence."""
    from ssa_megatron.megatron.context_parallel import _second_chunks, split_zigzag, zigzag_positions

    S = 8 * cp
    x = torch.arange(S)
    ranks = [split_zigzag(x, cp, r) for r in range(cp)]
    for r, local in enumerate(ranks):
        assert torch.equal(local, zigzag_positions(len(local), cp, r))
    full = torch.full_like(x, -1)
    full[: S // 2] = torch.cat([local[: len(local) // 2] for local in ranks])
    for view, local in zip(_second_chunks(full, cp), ranks):
        view.copy_(local[len(local) // 2:])
    assert torch.equal(full, x)


def test_one_cp_rank_exchanges_nothing():
    from types import SimpleNamespace

    from ssa_megatron.megatron.context_parallel import start_kv_gather

    q, k, v = torch.randn(8, 1, 2, 4), torch.randn(8, 1, 1, 4), torch.randn(8, 1, 1, 4)
    assert start_kv_gather(q, k, v, SimpleNamespace(size=lambda: 1)) is None


def _cp_ranks(rank, world_size, backend="reference"):
    """``backend='triton'``: the kernels under TRITON_INTERPRET=1 (set by the caller), in float32."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from ssa_megatron.config import SSAConfig
    from ssa_megatron.megatron.context_parallel import split_zigzag, zigzag_positions
    from ssa_megatron.megatron.loss import set_alignment_loss_scale
    from ssa_megatron.megatron.mode import force_mode
    from ssa_megatron.ssa import ssa_attention

    init_megatron(cp=2)
    with pytest.raises(NotImplementedError, match="a2a"):
        _core_attention(2, SSAConfig(), "a2a")
    with pytest.raises(ValueError, match="p2p"):
        _core_attention(2, SSAConfig(), "p2p")
    assert zigzag_positions(8, 2, rank).tolist() == ([0, 1, 2, 3, 12, 13, 14, 15] if rank == 0
                                                     else [4, 5, 6, 7, 8, 9, 10, 11])

    S, b, alpha = 128, 2, 10.0
    dtype = torch.float64 if backend == "reference" else torch.float32
    tol = dict(rtol=1e-7, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    set_alignment_loss_scale(1.0)
    for mode, document_mask in (("full", False), ("sparse", False), ("sparse", True), ("full", True)):
        ssa = SSAConfig(block_size=16, top_k=3, alpha=alpha, document_mask=document_mask, backend=backend)
        gen = torch.Generator().manual_seed(42)
        q = torch.randn(S, b, 4, 16, generator=gen, dtype=dtype)
        k = torch.randn(S, b, 2, 16, generator=gen, dtype=dtype)
        v = torch.randn(S, b, 2, 16, generator=gen, dtype=dtype)
        gate = torch.randn(S, b, 4, generator=gen, dtype=dtype)
        w = torch.randn(S, b, 64, generator=gen, dtype=dtype)
        cu = torch.tensor([0, 40, 128, 128 + 77, 256]) if document_mask else None

        # One process: the whole sequence; objective = <out, w> + alpha/L * L_align (L = 1 layer).
        leaves = [t.clone().requires_grad_() for t in (q, k, v, gate)]
        out, loss, _ = ssa_attention(*leaves[:3], leaves[3], ssa, mode, True, cu_seqlens=cu)
        ((out.reshape(S, b, -1) * w).sum() + alpha * loss).backward()
        ref_out = out.reshape(S, b, -1).detach()
        ref_grads = [t.grad for t in leaves]

        # CP: this rank's zigzag chunks through the core attention (async gather fwd / reduce-scatter bwd, scaler).
        core = _core_attention(2, ssa).to(dtype)
        core.train()
        local = [split_zigzag(t, 2, rank).clone().requires_grad_() for t in (q, k, v, gate)]
        psp = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu) if document_mask else None
        with force_mode(mode):
            out_local = core(local[0], local[1], local[2], local[3], packed_seq_params=psp)
        (out_local * split_zigzag(w, 2, rank)).sum().backward()

        tag = f"mode={mode} document_mask={document_mask}"
        torch.testing.assert_close(out_local.detach(), split_zigzag(ref_out, 2, rank), msg=tag, **tol)
        for name, t, g in zip("q k v gate".split(), local, ref_grads):
            torch.testing.assert_close(t.grad, split_zigzag(g, 2, rank), msg=f"d{name} {tag}", **tol)


@pytest.mark.slow
def test_context_parallel_matches_one_process():
    spawn_gloo(_cp_ranks, 2)


@pytest.mark.slow
def test_context_parallel_with_the_kernels_matches_one_process(monkeypatch):
    """The same check through the Triton kernels (interpreter): CP query subsets with global positions in the
    selection, sparse and full kernels, documents included."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # inherited by the spawned ranks before they import the kernels
    spawn_gloo(_cp_ranks, 2, "triton")


def _tp_ranks(rank, world_size):
    import torch.distributed as dist

    from ssa_megatron.megatron.mode import MODE_SAMPLER
    from ssa_megatron.megatron.model import build_gpt_model

    tokens = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(64).expand(2, -1)
    results = {}
    for tp, sp in ((2, True), (2, False), (1, False)):
        init_megatron(tp=tp)
        torch.manual_seed(123)  # CPU init draws the full (master) weights, then each rank keeps its slice
        recipe = tiny_recipe(alpha=10.0, p_full=0.5)
        recipe.parallel.tensor_parallel, recipe.parallel.sequence_parallel = tp, sp
        model = build_gpt_model(recipe)
        model.train()
        MODE_SAMPLER.set_iteration(4)
        shapes = []
        core = model.decoder.layers[0].self_attention.core_attention
        handle = core.register_forward_hook(
            lambda m, args, kwargs, out: shapes.append((args[0].shape, args[1].shape, args[3].shape, out.shape)),
            with_kwargs=True)
        loss = model(tokens, pos, None, labels=tokens).mean()
        loss.backward()
        handle.remove()
        gate_w = model.decoder.layers[0].self_attention.linear_gate.weight
        assert gate_w.shape == (4 // tp, 64)
        assert shapes[0] == ((64, 2, 4 // tp, 16), (64, 2, 2 // tp, 16), (64, 2, 4 // tp), (64, 2, 64 // tp))
        gate_grad = gate_w.grad
        if tp == 2:
            parts = [torch.zeros_like(gate_grad) for _ in range(2)]
            dist.all_gather(parts, gate_grad)
            gate_grad = torch.cat(parts)
        norms = [model.decoder.final_layernorm.weight, model.decoder.layers[1].pre_mlp_layernorm.weight]
        norm_grads = [w.grad.clone() for w in norms]
        if sp:  # each rank normalised half the tokens: what finalize_model_grads sums over the TP group
            assert all(getattr(w, "sequence_parallel", False) for w in norms)
            for g in norm_grads:
                dist.all_reduce(g)
        results[(tp, sp)] = (loss.detach(), gate_grad, *norm_grads)
    for layout in ((2, True), (2, False)):
        for a, b in zip(results[layout], results[(1, False)]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=f"tp, sp = {layout}")


@pytest.mark.slow
def test_tensor_parallel_gate_split_and_match():
    spawn_gloo(_tp_ranks, 2)


def test_kv_heads_not_divisible_by_tp_raises():
    from ssa_megatron.megatron.attention import check_tp_heads

    check_tp_heads(2, 8, 2)
    with pytest.raises(ValueError, match="num_query_groups=2"):
        check_tp_heads(2, 8, 4)
