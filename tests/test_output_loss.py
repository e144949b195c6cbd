"""The chunked output layer and LM loss (``train.loss_chunk_tokens``, ssa_megatron/megatron/output_loss.py) against
Megatron's own output layer + cross entropy: loss and gradients, tied and untied, TP 2 with and without sequence
parallelism, and a short training run."""

import pytest
import torch

from helpers.megatron import init_megatron, spawn_gloo, tiny_recipe
from helpers.numerics import rel_err

S, B = 64, 2  # 128 tokens: chunks of 37 leave a remainder of 17


@pytest.fixture(scope="module")
def megatron_world():
    init_megatron(tp=1)
    yield


def _model(chunk: int, tied: bool = True, tp: int = 1, sequence_parallel: bool = False, seed: int = 123):
    from ssa_megatron.megatron.model import build_gpt_model

    recipe = tiny_recipe(seq_length=S, tp=tp)
    recipe.model.tie_embeddings = tied
    recipe.parallel.sequence_parallel = sequence_parallel
    recipe.train.loss_chunk_tokens = chunk
    torch.manual_seed(seed)  # the same weights for every chunk size (CPU init draws the full weights)
    model = build_gpt_model(recipe)
    model.train()
    return model


def _loss_and_grads(model, iteration: int = 3):
    """Per-token loss [b, s] and every parameter's gradient under an uneven per-token weighting (a loss mask)."""
    from ssa_megatron.megatron.mode import MODE_SAMPLER

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 128, (B, S), generator=gen)
    labels = torch.randint(0, 128, (B, S), generator=gen)
    weights = torch.rand(B, S, generator=gen) * (torch.rand(B, S, generator=gen) > 0.2)
    MODE_SAMPLER.set_iteration(iteration)
    loss = model(tokens, torch.arange(S).expand(B, -1), None, labels=labels)
    (loss * weights).sum().backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _assert_same(reference, chunked, tag: str, rtol=1e-5, atol=1e-6):
    (ref_loss, ref_grads), (loss, grads) = reference, chunked
    assert loss.shape == ref_loss.shape == (B, S) and loss.dtype == ref_loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol, msg=f"loss {tag}")
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:  # the decoder's gradients carry grad_hidden; the output / embedding weight its own
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=rtol, atol=atol, msg=f"d {name} {tag}")


@pytest.mark.parametrize("tied", [True, False])
def test_model_loss_and_grads_equal_megatron_fp32(megatron_world, tied):
    reference = _loss_and_grads(_model(0, tied))
    for chunk in (37, 128, 1000):  # a remainder chunk; exactly one chunk; one chunk larger than the tokens
        _assert_same(reference, _loss_and_grads(_model(chunk, tied)), f"tied={tied} chunk={chunk}")
    if not tied:
        assert "output_layer.weight" in reference[1]


@pytest.mark.parametrize("tied", [True, False])
def test_triton_loss_path_equals_megatron_s(megatron_world, monkeypatch, tied):
    """The CUDA path, run here through Triton's interpreter: ssa_kernels.cross_entropy as GPTModel's loss
    (SSAGPTModel.compute_language_model_loss, the gradient written over the logits) and in each chunk (the
    gradient written over the recomputed logits) gives Megatron's loss and gradients."""
    from ssa_megatron.megatron import output_loss

    reference = _loss_and_grads(_model(0, tied))
    monkeypatch.setattr(output_loss, "uses_triton_loss", lambda t: True)
    for chunk in (0, 37):
        _assert_same(reference, _loss_and_grads(_model(chunk, tied)), f"triton tied={tied} chunk={chunk}")


def test_logits_without_labels_are_megatron_s(megatron_world):
    """Inference and evaluation without labels return GPTModel's logits [b, s, V] whatever the switch."""
    tokens = torch.randint(0, 128, (B, S))
    pos = torch.arange(S).expand(B, -1)
    outs = []
    for chunk in (0, 37):
        model = _model(chunk).eval()
        with torch.no_grad():
            outs.append(model(tokens, pos, None))
    assert outs[0].shape == (B, S, 128)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)


def test_bf16_close_to_megatron(megatron_world):
    """bf16 hidden states and weight at a wider vocabulary: the loss and both gradients against Megatron's output
    GEMM + vocab_parallel_cross_entropy (the unfused path a CPU run takes). The weight gradient differs by about one
    bf16 rounding: each chunk's GEMM rounds its part before the fp32 sum."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from ssa_megatron.megatron.output_loss import chunked_lm_loss

    gen = torch.Generator().manual_seed(1)
    s, b, h, vocab = 96, 2, 64, 1000
    hidden = torch.randn(s, b, h, generator=gen).bfloat16()
    weight = (torch.randn(vocab, h, generator=gen) * 0.2).bfloat16()
    labels = torch.randint(0, vocab, (b, s), generator=gen)
    grad_out = torch.rand(b, s, generator=gen)
    group = parallel_state.get_tensor_model_parallel_group()

    results = []
    for chunk in (0, 50):
        x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if chunk:
            loss = chunked_lm_loss(x, w, labels, chunk, group)
        else:
            logits = torch.matmul(x, w.t())
            loss = vocab_parallel_cross_entropy(logits, labels.t().contiguous(), tp_group=group).t()
        (loss * grad_out).sum().backward()
        results.append((loss.detach(), x.grad, w.grad))
    (ref_loss, ref_dx, ref_dw), (loss, dx, dw) = results
    assert dx.dtype == dw.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert rel_err(dx.float(), ref_dx.float()) < 1e-3
    assert rel_err(dw.float(), ref_dw.float()) < 1e-2


def test_bad_values_are_refused_in_one_line(megatron_world):
    from ssa_megatron.config import RecipeConfig, apply_overrides, from_dict
    from ssa_megatron.megatron.model import build_gpt_model, transformer_config_from_recipe

    assert RecipeConfig().train.loss_chunk_tokens == 0
    with pytest.raises(ValueError, match=r"train\.loss_chunk_tokens=-1: must be >= 0"):
        from_dict(RecipeConfig, apply_overrides({}, ["train.loss_chunk_tokens=-1"])).validate()
    recipe = tiny_recipe()
    recipe.train.loss_chunk_tokens = 64
    config = transformer_config_from_recipe(recipe, use_mup=True)
    with pytest.raises(ValueError, match="loss_chunk_tokens=64: .* does not support use_mup; "
                                         "set train.loss_chunk_tokens=0"):
        build_gpt_model(recipe, config=config)


def _output_layer(sequence_parallel: bool):
    """GPTModel's output layer as it builds it (column-parallel, no bias, logits left split by vocabulary)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, tensor_model_parallel_size=2,
                               sequence_parallel=sequence_parallel, use_cpu_initialization=True)
    torch.manual_seed(5)
    return ColumnParallelLinear(64, 256, config=config, init_method=torch.nn.init.normal_, bias=False,
                                gather_output=False)


def _tp_ranks(rank, world_size):
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from ssa_megatron.megatron import output_loss
    from ssa_megatron.megatron.output_loss import chunked_lm_loss

    init_megatron(tp=2)
    # The whole model: local decoder layers have no sequence parallelism without Apex or TE (Megatron's torch
    # norm refuses it), so it is checked on the output layer alone below.
    for tied in (True, False):
        tag = f"tp=2 tied={tied}"
        reference = _loss_and_grads(_model(0, tied, tp=2))
        chunked = _loss_and_grads(_model(37, tied, tp=2))
        _assert_same(reference, chunked, tag)
        # The weight is this rank's vocabulary half, and the loss is the whole vocabulary's on every rank.
        name = "embedding.word_embeddings.weight" if tied else "output_layer.weight"
        assert chunked[1][name].shape == (64, 64), tag
        other = chunked[0].clone()
        dist.broadcast(other, src=0)
        torch.testing.assert_close(chunked[0], other, rtol=0, atol=0, msg=tag)

    # The CUDA path's kernel (ssa_kernels.cross_entropy, interpreted here) in GPTModel's loss and in each chunk:
    # this process's copy of the module, so the switch is set by hand (no monkeypatch in a spawned rank).
    reference = _loss_and_grads(_model(0, False, tp=2))
    output_loss.uses_triton_loss = lambda t: True
    for chunk in (0, 37):
        _assert_same(reference, _loss_and_grads(_model(chunk, False, tp=2)), f"tp=2 triton chunk={chunk}")

    group = parallel_state.get_tensor_model_parallel_group()
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(S, B, 64, generator=gen)  # the same on both ranks
    labels = torch.randint(0, 256, (B, S), generator=gen)
    grad_out = torch.rand(B, S, generator=gen)
    for kernel, sequence_parallel in ((False, False), (False, True), (True, True)):
        output_loss.uses_triton_loss = lambda t: kernel  # in the chunks; Megatron's cross entropy unchunked
        local = hidden.chunk(2)[rank] if sequence_parallel else hidden  # [s/tp, b, h] under sequence parallelism
        results = []
        for chunk in (0, 37):
            layer = _output_layer(sequence_parallel)
            x = local.clone().requires_grad_()
            if chunk:
                loss = chunked_lm_loss(x, layer.weight, labels, chunk, group, sequence_parallel=sequence_parallel)
            else:
                logits, _ = layer(x)
                loss = vocab_parallel_cross_entropy(logits, labels.t().contiguous(), tp_group=group).t()
            (loss * grad_out).sum().backward()
            results.append((loss.detach(), x.grad, layer.weight.grad))
        for name, ours, ref in zip(("loss", "d hidden", "d weight"), results[1], results[0]):
            # the kernel's exp(x − lse) against Megatron's exp(x − max) / sum: fp32 roundings on logits of ~±40
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 if kernel else 1e-6,
                                       msg=f"{name} sequence_parallel={sequence_parallel} kernel={kernel}")


@pytest.mark.slow
def test_tensor_parallel_model_and_sequence_parallel_output_layer():
    spawn_gloo(_tp_ranks, 2)


@pytest.mark.slow
def test_training_losses_equal_with_the_switch(tmp_path, monkeypatch):
    """A tiny ssa-train run (fp32, CPU) logs the same losses with the chunked loss as with Megatron's."""
    from helpers.training import run_training, tiny_test_recipe

    from ssa_megatron.megatron import model as model_module

    calls = []
    chunked_lm_loss = model_module.chunked_lm_loss
    monkeypatch.setattr(model_module, "chunked_lm_loss", lambda *a, **k: calls.append(1) or chunked_lm_loss(*a, **k))
    runs = {}
    for chunk in (0, 40):
        recipe = tiny_test_recipe(tmp_path / f"chunk{chunk}", "train.steps=3", "train.log_interval=1",
                                  "checkpoint.interval=0", "checkpoint.save_at_end=false",
                                  f"train.loss_chunk_tokens={chunk}")
        runs[chunk] = run_training(recipe).losses
        assert bool(calls) == bool(chunk)  # the switch reaches the model the loop builds
    assert len(runs[0]) == 3
    torch.testing.assert_close(torch.tensor(runs[40]), torch.tensor(runs[0]), rtol=1e-5, atol=1e-6)
