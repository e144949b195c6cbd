"""train.loss_chunk_tokens on a GPU, at the ssa_1b output layer (vocabulary 128256, hidden 2048, bf16) and 32k
tokens: the chunked loss with Megatron's compiled cross-entropy steps (as ``train.fused_ops`` runs it) against
Megatron's output GEMM + fused cross entropy. Checks the loss and both gradients, and that the chunked forward +
backward peaks at less than a quarter of Megatron's memory; prints peak memory and time of both.

  .venv/bin/python -m pytest -q -s tests/gpu/test_output_loss_gpu.py
"""

import pytest
import torch

from helpers.numerics import rel_err

pytestmark = pytest.mark.gpu

TOKENS, HIDDEN, VOCAB, CHUNK = 32768, 2048, 128256, 4096


@pytest.fixture(scope="module")
def megatron_world():
    from helpers.megatron import init_megatron

    init_megatron()
    yield


def _fwd_bwd(loss_fn, hidden, weight, labels, grad_out):
    """(loss, d hidden, d weight, peak bytes above the inputs, milliseconds) of one forward + backward."""
    x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    loss = loss_fn(x, w, labels)
    (loss * grad_out).sum().backward()
    end.record()
    torch.cuda.synchronize()
    return loss.detach(), x.grad, w.grad, torch.cuda.max_memory_allocated() - base, start.elapsed_time(end)


def test_chunked_loss_at_32k_matches_megatron_in_less_memory(megatron_world):
    from megatron.core import parallel_state
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

    from ssa_megatron.megatron.output_loss import chunked_lm_loss

    group = parallel_state.get_tensor_model_parallel_group()
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(TOKENS, 1, HIDDEN, device="cuda", generator=gen).bfloat16()
    weight = (0.02 * torch.randn(VOCAB, HIDDEN, device="cuda", generator=gen)).bfloat16()
    labels = torch.randint(0, VOCAB, (1, TOKENS), device="cuda", generator=gen)
    grad_out = torch.rand(1, TOKENS, device="cuda", generator=gen) / TOKENS

    def megatron(x, w, y):  # GPTModel.output_layer (TP 1) + compute_language_model_loss with the native fusion
        return fused_vocab_parallel_cross_entropy(torch.matmul(x, w.t()), y.t().contiguous(), group).t()

    def chunked(x, w, y):
        return chunked_lm_loss(x, w, y, CHUNK, group, fused_ops=True)

    results = {}
    for name, fn in (("megatron", megatron), ("chunked", chunked)):
        _fwd_bwd(fn, hidden, weight, labels, grad_out)  # compilation
        runs = [_fwd_bwd(fn, hidden, weight, labels, grad_out) for _ in range(3)]
        results[name] = (*runs[-1][:4], sorted(r[4] for r in runs)[1])
    for name, (_, _, _, peak, ms) in results.items():
        print(f"{name}: {TOKENS} tokens, vocab {VOCAB}, chunk {CHUNK if name == 'chunked' else '-'}: "
              f"forward + backward {ms:.1f} ms, peak {peak / 2**30:.2f} GiB above the inputs")
    ref, got = results["megatron"], results["chunked"]
    assert rel_err(got[0], ref[0]) < 1e-5
    assert rel_err(got[1].float(), ref[1].float()) < 1e-2
    assert rel_err(got[2].float(), ref[2].float()) < 1e-2
    assert got[3] < ref[3] / 4
