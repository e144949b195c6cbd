"""The per-micro-batch mode: a pure function of (seed, iteration, micro-batch), replayed under recompute."""

import pytest
import torch

from ssa_megatron.megatron.mode import MODE_SAMPLER, force_mode, sample_mode
from helpers.megatron import init_megatron, tiny_recipe


def test_sample_mode_deterministic_and_calibrated():
    draws = [sample_mode(1234, it, mb, 0.5) for it in range(200) for mb in range(8)]
    assert draws == [sample_mode(1234, it, mb, 0.5) for it in range(200) for mb in range(8)]
    share = draws.count("full") / len(draws)
    assert 0.45 < share < 0.55
    assert draws != [sample_mode(99, it, mb, 0.5) for it in range(200) for mb in range(8)]
    assert {sample_mode(1, it, mb, 1.0) for it in range(50) for mb in range(4)} == {"full"}
    assert {sample_mode(1, it, mb, 0.0) for it in range(50) for mb in range(4)} == {"sparse"}
    # Independent of torch's RNG (ranks have different RNG states).
    torch.manual_seed(0)
    a = sample_mode(5, 6, 7, 0.3)
    torch.manual_seed(1)
    assert sample_mode(5, 6, 7, 0.3) == a


def _two_modes_iteration(p_full=0.5, seed=None):
    seed = MODE_SAMPLER.seed if seed is None else seed
    for it in range(100):
        if sample_mode(seed, it, 0, p_full) != sample_mode(seed, it, 1, p_full):
            return it
    raise AssertionError("no iteration with different modes")


@pytest.fixture(scope="module")
def megatron_world():
    init_megatron(tp=1, pp=1, cp=1)
    yield


def _run_interleaved(recompute: str, iteration: int):
    """Forward micro-batches 0 and 1, then backward 0 and 1 (the 1F1B order that makes recompute see a stale
    micro-batch index)."""
    from ssa_megatron.megatron.model import build_gpt_model
    from ssa_megatron.megatron.tracker import get_ssa_tracker

    recipe = tiny_recipe(alpha=10.0, p_full=0.5)
    recipe.train.recompute = recompute
    torch.manual_seed(11)
    model = build_gpt_model(recipe)
    model.train()
    MODE_SAMPLER.set_iteration(iteration)
    get_ssa_tracker().reset()
    gen = torch.Generator().manual_seed(3)
    losses = []
    for mb in range(2):
        for layer in model.decoder.layers:
            layer.current_microbatch = mb
        tokens = torch.randint(0, 128, (2, 64), generator=gen)
        losses.append(model(tokens, torch.arange(64).expand(2, -1), None, labels=tokens).mean())
    for loss in losses:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return [l.detach() for l in losses], grads, get_ssa_tracker().reduce()


def test_recompute_replays_the_forward_mode(megatron_world):
    iteration = _two_modes_iteration()
    base_losses, base_grads, base_report = _run_interleaved("none", iteration)
    for recompute in ("selective", "full"):
        losses, grads, report = _run_interleaved(recompute, iteration)
        for a, b in zip(losses, base_losses):
            torch.testing.assert_close(a, b)
        for name in base_grads:
            torch.testing.assert_close(grads[name], base_grads[name], rtol=1e-4, atol=1e-6, msg=name)
        assert report == pytest.approx(base_report)
    assert base_report["microbatches_full"] == 1 and base_report["microbatches_sparse"] == 1


def test_force_mode_and_inference_mode(megatron_world):
    from ssa_megatron.megatron.model import build_gpt_model

    model = build_gpt_model(tiny_recipe(p_full=0.5))
    tokens = torch.randint(0, 128, (1, 64))
    pos = torch.arange(64)[None]
    model.eval()
    with torch.no_grad():
        out_default = model(tokens, pos, None)
        assert MODE_SAMPLER.last_mode == "sparse"  # SSAConfig.inference_mode
        with force_mode("full"):
            out_full = model(tokens, pos, None)
            assert MODE_SAMPLER.last_mode == "full"
    assert not torch.allclose(out_default, out_full)
    with pytest.raises(ValueError):
        with force_mode("dense"):
            pass


def test_recompute_modes_replay_in_forward_order():
    from ssa_megatron.megatron.mode import RecomputeReplay

    modes = RecomputeReplay("mode")
    modes.push("full", iteration=1)
    modes.push("sparse", iteration=1)
    assert [modes.pop(), modes.pop()] == ["full", "sparse"]
    modes.push("full", iteration=1)
    modes.push("sparse", iteration=2)  # a new iteration drops what its predecessor left
    assert modes.pop() == "sparse"
    with pytest.raises(RuntimeError, match="no recorded mode"):
        modes.pop()


def test_layer_mode_precedence_and_recompute(monkeypatch):
    """Forced beats everything, then the inference mode when not training; a checkpointed forward's sampled mode
    is replayed by its recompute whatever the micro-batch index says by then."""
    from ssa_megatron.megatron import mode as mode_lib

    sampler = mode_lib.ModeSampler(seed=1234)
    sampler.set_iteration(_two_modes_iteration(seed=1234))
    layer = mode_lib.LayerMode(p_full=0.5, inference_mode="sparse", sampler=sampler)
    sampled = [sampler.mode_for(mb, 0.5) for mb in (0, 1)]
    assert sampled[0] != sampled[1]

    assert layer.choose(training=False, microbatch=0) == "sparse"
    assert [layer.choose(training=True, microbatch=mb) for mb in (0, 1)] == sampled
    sampler.forced = "full"
    assert layer.choose(training=True, microbatch=1) == layer.choose(training=False, microbatch=0) == "full"
    sampler.forced = None

    monkeypatch.setattr(mode_lib, "in_checkpointed_forward", lambda: True)
    assert [layer.choose(training=True, microbatch=mb) for mb in (0, 1)] == sampled
    monkeypatch.setattr(mode_lib, "in_checkpointed_forward", lambda: False)
    monkeypatch.setattr(mode_lib, "is_recomputing", lambda: True)
    assert [layer.choose(training=True, microbatch=1) for _ in range(2)] == sampled

    layer.record("sparse", 3, training_forward=False)
    assert sampler.last_mode == "sparse" and 3 not in sampler.modes_this_iteration
    layer.record("full", 3, training_forward=True)
    assert sampler.last_mode == "full" and sampler.modes_this_iteration[3] == "full"
