"""The LM loss on a GPU: ssa_kernels.cross_entropy_loss against Megatron's fused (torch.compile'd) cross entropy at the
ssa_1b shape (8192 tokens, vocabulary 128256, bf16), the model's loss path, and train.loss_chunk_tokens at 32k tokens
against the unchunked output layer + loss. Prints times and peak memory of each.

  .venv/bin/python -m pytest -q -s tests/gpu/test_cross_entropy_gpu.py
"""

import statistics

import pytest
import torch

from helpers.numerics import rel_err

pytestmark = pytest.mark.gpu

VOCAB, HIDDEN = 128256, 2048


@pytest.fixture(scope="module")
def megatron_world():
    from helpers.megatron import init_megatron

    init_megatron()
    yield


def _group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def _run(loss_fn, inputs, grad_out, reps=5):
    """Forward + backward of ``loss_fn(*leaves)`` on fresh copies of ``inputs`` (the loss may overwrite its
    logits), ``reps`` times after one warm-up (compilation). Returns the last (loss, grads), the median forward and
    backward milliseconds, and the peak bytes allocated above the inputs."""
    fwd, bwd = [], []
    for _ in range(reps + 1):
        leaves = [t.clone().requires_grad_() for t in inputs]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        events[0].record()
        loss = loss_fn(*leaves)
        events[1].record()
        loss.backward(grad_out)
        events[2].record()
        torch.cuda.synchronize()
        fwd.append(events[0].elapsed_time(events[1]))
        bwd.append(events[1].elapsed_time(events[2]))
        peak = torch.cuda.max_memory_allocated() - base
    return (loss.detach(), [t.grad for t in leaves]), statistics.median(fwd[1:]), statistics.median(bwd[1:]), peak


def _report(name, fwd, bwd, peak):
    print(f"{name}: forward {fwd:.2f} ms, backward {bwd:.2f} ms, total {fwd + bwd:.2f} ms; "
          f"peak {peak / 2**30:.2f} GiB above the inputs")


def test_kernel_matches_megatron_fused_and_is_faster(megatron_world):
    """One ssa_1b micro-batch's loss: bf16 logits [8192, 128256]; the kernel as the model runs it (gradient written
    over the logits) against fused_vocab_parallel_cross_entropy (what train.fused_ops ran before)."""
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
    from ssa_kernels import cross_entropy_loss

    tokens = 8192
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (2 * torch.randn(tokens, 1, VOCAB, device="cuda", generator=gen)).bfloat16()
    target = torch.randint(0, VOCAB, (tokens, 1), device="cuda", generator=gen)
    target[:2, 0] = torch.tensor([0, VOCAB - 1])
    grad_out = torch.rand(tokens, 1, device="cuda", generator=gen) / tokens
    group = _group()
    megatron = _run(lambda x: fused_vocab_parallel_cross_entropy(x, target, group), [logits], grad_out)
    ours = _run(lambda x: cross_entropy_loss(x, target, tp_group=group, overwrite_logits=True), [logits], grad_out)
    print()
    _report(f"megatron fused cross entropy [{tokens}, {VOCAB}] bf16", *megatron[1:])
    _report(f"ssa_kernels.cross_entropy_loss [{tokens}, {VOCAB}] bf16", *ours[1:])
    (ref_loss, (ref_grad,)), (loss, (grad,)) = megatron[0], ours[0]
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert rel_err(loss, ref_loss) < 1e-5
    assert rel_err(grad.float(), ref_grad.float()) < 1e-2
    assert ours[1] + ours[2] < megatron[1] + megatron[2]
    assert ours[3] < megatron[3] / 2  # no fp32 [tokens, V] buffers


def test_model_loss_path_matches_megatron_s(megatron_world, monkeypatch):
    """SSAGPTModel on CUDA (a tiny fp32 model): the kernel in GPTModel's loss and in each chunk gives Megatron's
    loss and gradients."""
    from helpers.megatron import tiny_recipe

    from ssa_megatron.megatron import output_loss
    from ssa_megatron.megatron.mode import MODE_SAMPLER
    from ssa_megatron.megatron.model import build_gpt_model

    s, b = 64, 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randint(0, 128, (b, s), device="cuda", generator=gen)
    labels = torch.randint(0, 128, (b, s), device="cuda", generator=gen)
    weights = torch.rand(b, s, device="cuda", generator=gen)
    recipe = tiny_recipe(seq_length=s)
    recipe.train.fused_ops = False  # Megatron's unfused cross entropy: its fused one rounds the gradient to bf16
    model = build_gpt_model(recipe)
    results = {}
    for name, kernel, chunk in (("megatron", False, 0), ("kernel", True, 0), ("kernel chunked", True, 37)):
        monkeypatch.setattr(output_loss, "uses_triton_loss", lambda t, kernel=kernel: kernel)
        model.loss_chunk_tokens = chunk  # what train.loss_chunk_tokens sets at construction
        model.zero_grad(set_to_none=True)
        MODE_SAMPLER.set_iteration(3)  # the same layer modes every time
        loss = model(tokens, torch.arange(s, device="cuda").expand(b, -1), None, labels=labels)
        (loss * weights).sum().backward()
        results[name] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    ref_loss, ref_grads = results.pop("megatron")
    for name, (loss, grads) in results.items():
        assert rel_err(loss, ref_loss) < 1e-5, name
        for param, g in grads.items():
            assert rel_err(g, ref_grads[param]) < 1e-4, f"{name}: d {param}"


def test_chunked_loss_at_32k(megatron_world):
    """train.loss_chunk_tokens=4096 at 32k tokens (ssa_1b_32k's setting) against the unchunked output GEMM + the
    kernel (the model's path without the switch) and Megatron's output GEMM + fused cross entropy: loss and both
    gradients, time, and peak memory."""
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
    from ssa_kernels import cross_entropy_loss

    from ssa_megatron.megatron.output_loss import chunked_lm_loss

    tokens, chunk = 32768, 4096
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(tokens, 1, HIDDEN, device="cuda", generator=gen).bfloat16()
    weight = (0.02 * torch.randn(VOCAB, HIDDEN, device="cuda", generator=gen)).bfloat16()
    labels = torch.randint(0, VOCAB, (1, tokens), device="cuda", generator=gen)
    grad_out = torch.rand(1, tokens, device="cuda", generator=gen) / tokens
    group = _group()

    def megatron(x, w):  # GPTModel.output_layer (TP 1) + Megatron's compute_language_model_loss, native fusion
        return fused_vocab_parallel_cross_entropy(torch.matmul(x, w.t()), labels.t().contiguous(), group).t()

    def unchunked(x, w):  # the same GEMM + SSAGPTModel.compute_language_model_loss on CUDA
        return cross_entropy_loss(torch.matmul(x, w.t()), labels.t(), tp_group=group, overwrite_logits=True).t()

    def chunked(x, w):
        return chunked_lm_loss(x, w, labels, chunk, group)

    runs = {name: _run(fn, [hidden, weight], grad_out, reps=3)
            for name, fn in (("megatron", megatron), ("unchunked", unchunked), ("chunked", chunked))}
    print()
    for name, run in runs.items():
        _report(f"output layer + loss, {name}, {tokens} tokens" + (f", chunk {chunk}" if name == "chunked" else ""),
                *run[1:])
    ref_loss, (ref_dx, ref_dw) = runs["megatron"][0]
    for name in ("unchunked", "chunked"):
        loss, (dx, dw) = runs[name][0]
        assert dx.dtype == dw.dtype == torch.bfloat16, name
        assert rel_err(loss, ref_loss) < 1e-5, name
        assert rel_err(dx.float(), ref_dx.float()) < 1e-2, name
        assert rel_err(dw.float(), ref_dw.float()) < 1e-2, name
    assert runs["chunked"][3] < runs["unchunked"][3] / 2
    assert runs["chunked"][3] < runs["megatron"][3] / 4
