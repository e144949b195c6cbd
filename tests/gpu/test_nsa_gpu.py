"""The NSA baseline on a GPU: fla-core's kernels (the CUDA path of NSACoreAttention) against the CPU path (fla's
naive functions + the SDPA window), forward and backward, with and without documents; flash-attn's window branch
against SDPA's when flash-attn is installed."""

import pytest
import torch

from helpers.numerics import rel_err

pytestmark = pytest.mark.gpu
pytest.importorskip("fla.ops.nsa", reason="fla-core is not installed (the 'nsa' extra)")


def _core(block_size=32, block_counts=8, window=128):
    from megatron.core.transformer.enums import AttnMaskType

    from helpers.megatron import init_megatron, tiny_recipe
    from ssa_megatron.config import NSAConfig
    from ssa_megatron.megatron.model import transformer_config_from_recipe
    from ssa_megatron.megatron.nsa import NSACoreAttention

    init_megatron()
    config = transformer_config_from_recipe(tiny_recipe())
    return NSACoreAttention(config, 1, AttnMaskType.causal, "self", nsa=NSAConfig(block_size, block_counts, window))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_path_matches_the_reference_path(dtype):
    core = _core()
    g = torch.Generator(device="cuda").manual_seed(0)
    s, b, hq, hkv, d = 1024, 2, 32, 2, 64
    q = torch.randn(s, b, hq, d, device="cuda", dtype=dtype, generator=g, requires_grad=True)
    k, v = (torch.randn(s, b, hkv, d, device="cuda", dtype=dtype, generator=g, requires_grad=True) for _ in range(2))
    gates = torch.randn(s, b, hq * 3, device="cuda", dtype=dtype, generator=g, requires_grad=True)
    dy = torch.randn(s, b, hq * d, device="cuda", dtype=dtype, generator=g)
    out = core(q, k, v, gates)
    grads = torch.autograd.grad((out * dy).sum(), (q, k, v, gates))
    cpu = [t.detach().cpu().double().requires_grad_() for t in (q, k, v, gates)]
    want = core(*cpu)
    want_grads = torch.autograd.grad((want * dy.cpu().double()).sum(), cpu)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    assert rel_err(out.double().cpu(), want) < tol
    for got, ref in zip(grads, want_grads):
        assert rel_err(got.double().cpu(), ref) < 5 * tol


def test_documents_run_as_flattened_rows():
    from ssa_megatron.megatron.attention import document_packed_seq_params

    core = _core()
    s, b, hq, hkv, d = 512, 2, 16, 1, 64
    q = torch.randn(s, b, hq, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(s, b, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    gates = torch.randn(s, b, hq * 3, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, 512, 1024], device="cuda", dtype=torch.int32)  # one document per row: as no documents
    with_docs = core(q, k, v, gates, packed_seq_params=document_packed_seq_params(cu, s))
    assert rel_err(with_docs.float(), core(q, k, v, gates).float()) < 1e-2


def test_flash_window_matches_sdpa_window():
    pytest.importorskip("flash_attn", reason="flash-attn is not installed (the 'flash' extra)")
    from ssa_megatron.megatron.nsa import sliding_window_attention

    q = torch.randn(2, 1024, 32, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 1024, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    flash = sliding_window_attention(q, k, v, 128, 0.125)
    sdpa = sliding_window_attention(q.float(), k.float(), v.float(), 128, 0.125)  # fp32 takes the SDPA path
    assert rel_err(flash.float(), sdpa) < 1e-2
