"""The alignment loss's auto-scaler, its scale hook in Megatron's schedule, and the metrics tracker."""

import pytest
import torch

from ssa_megatron.megatron.loss import AlignmentLossScaler, alignment_loss_weight, set_alignment_loss_scale
from helpers.megatron import init_megatron, spawn_gloo, tiny_recipe


@pytest.fixture(scope="module")
def megatron_world():
    init_megatron(tp=1, pp=1, cp=1)
    yield


def test_scaler_is_identity_forward_and_injects_scale():
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(5, requires_grad=True)
    set_alignment_loss_scale(torch.tensor(0.25))
    out = AlignmentLossScaler.apply(x * 1.0, (w**2).sum() * 3.0)
    torch.testing.assert_close(out, x)
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))
    torch.testing.assert_close(w.grad, 2 * w.detach() * 3.0 * 0.25)


def test_attach_alignment_loss_only_when_it_has_a_gradient():
    from ssa_megatron.megatron.loss import attach_alignment_loss

    x = torch.randn(3, requires_grad=True)
    w = torch.tensor(2.0, requires_grad=True)
    set_alignment_loss_scale(0.5)
    assert attach_alignment_loss(x, torch.zeros(()), 3.0) is x  # not computed
    with torch.no_grad():
        assert attach_alignment_loss(x, w * w, 3.0) is x  # first pass of a checkpointed region
    out = attach_alignment_loss(x, w * w, 3.0)
    assert out is not x
    out.sum().backward()
    torch.testing.assert_close(w.grad, torch.tensor(2 * 2.0 * 3.0 * 0.5))


def test_loss_weight():
    assert alignment_loss_weight(10.0, 4, 1, 1, False, 128) == pytest.approx(2.5)
    assert alignment_loss_weight(10.0, 4, 2, 2, False, 128) == pytest.approx(2.5 / 4)
    assert alignment_loss_weight(10.0, 4, 2, 2, True, 128) == pytest.approx(2.5 / 2 * 128)


def test_model_injected_gradient_is_alpha_over_L_times_scale(megatron_world, monkeypatch):
    """With the LM loss zeroed, the gradient equals scale · α/L · ∂(Σ_layers L_layer): run once with the scaler
    and once with the scaler disabled and the raw per-layer losses back-propagated explicitly."""
    import ssa_megatron.megatron.attention as attn_mod
    import ssa_megatron.megatron.loss as loss_mod
    from ssa_megatron.megatron.mode import MODE_SAMPLER
    from ssa_megatron.megatron.model import build_gpt_model

    recipe = tiny_recipe(num_layers=2, alpha=10.0)
    model = build_gpt_model(recipe)
    model.train()
    MODE_SAMPLER.set_iteration(0)
    raw_losses = []
    real = attn_mod.ssa_attention

    def capture(*args, **kwargs):
        out, loss, stats = real(*args, **kwargs)
        raw_losses.append(loss)
        return out, loss, stats

    monkeypatch.setattr(attn_mod, "ssa_attention", capture)
    tokens = torch.randint(0, 128, (2, 64))
    pos = torch.arange(64).expand(2, -1)
    scale = 0.375

    class NoScaler:
        @staticmethod
        def apply(output, loss):
            return output

    with monkeypatch.context() as m:
        m.setattr(loss_mod, "AlignmentLossScaler", NoScaler)
        out = model(tokens, pos, None, labels=tokens)
        (out.sum() * 0.0 + scale * 10.0 / 2 * sum(raw_losses)).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    raw_losses.clear()

    set_alignment_loss_scale(scale)
    out = model(tokens, pos, None, labels=tokens)
    (out.sum() * 0.0).backward()
    assert len(raw_losses) == 2
    nonzero = 0
    for (name, p), e in zip(model.named_parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-9, msg=name)
        nonzero += int(e.abs().sum() > 0)
    assert nonzero > 5


def test_schedule_sets_scale_and_normalizes_like_lm_loss(megatron_world):
    """Megatron's no-pipelining schedule (the real one, on CPU) sets scale = 1/num_microbatches through the
    0.19 hook; the gradient equals the hand-accumulated Σ_mb (LM_mb + α·mean_layers L) / num_microbatches."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from ssa_megatron.megatron.mode import MODE_SAMPLER
    from ssa_megatron.megatron.model import build_gpt_model

    recipe = tiny_recipe(num_layers=2, alpha=10.0, p_full=0.5)
    torch.manual_seed(5)
    model = build_gpt_model(recipe)
    torch.manual_seed(5)
    twin = build_gpt_model(recipe)
    twin.load_state_dict(model.state_dict())
    model.train(), twin.train()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 128, (2, 64), generator=gen) for _ in range(3)]
    pos = torch.arange(64).expand(2, -1)

    def forward_step(data_iterator, m):
        tokens = next(data_iterator)
        out = m(tokens, pos, None, labels=tokens)

        def loss_func(output):
            loss = output.float().mean()
            return loss, {"lm loss": loss.detach()}

        return out, loss_func

    MODE_SAMPLER.set_iteration(2)
    set_alignment_loss_scale(123.0)  # overwritten by the schedule
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=model, num_microbatches=3,
        seq_length=64, micro_batch_size=2, forward_only=False,
    )
    assert float(AlignmentLossScaler.main_loss_backward_scale) == pytest.approx(1 / 3)

    set_alignment_loss_scale(1 / 3)
    for mb, tokens in enumerate(batches):
        for layer in twin.decoder.layers:
            layer.current_microbatch = mb
        (twin(tokens, pos, None, labels=tokens).float().mean() / 3).backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8, msg=name)


# ----------------------------------------------------------------------------------------------------------------
# Tracker


def _tracker_ranks(rank, world_size):
    import torch.distributed as dist

    from ssa_megatron.megatron.mode import sample_mode
    from ssa_megatron.megatron.tracker import SSAMetricsTracker

    # Simulated layout: 2 layers; rank 0 owns layer 1 and rank 1 owns layer 2 (PP), and both ranks also record
    # layer 1's attention statistic (DP/CP replicas) → sum over owners, mean over replicas.
    tracker = SSAMetricsTracker()
    for mb in range(2):
        if rank == 0:
            tracker.record("alignment_loss", 1, 2, 1.0 + mb)  # mean 1.5
        else:
            tracker.record("alignment_loss", 2, 2, 4.0)
        tracker.record("attn_sparsity", 1, 2, 0.5 + 0.25 * rank)  # mean over ranks 0.625
        tracker.record_mode(mb, "full" if mb == 0 else "sparse")
        tracker.record_mode(mb, "full" if mb == 0 else "sparse")  # a second layer: counted once
    out = tracker.reduce()
    assert out["alignment_loss/layer_1"] == pytest.approx(1.5)
    assert out["alignment_loss/layer_2"] == pytest.approx(4.0)
    assert out["alignment_loss"] == pytest.approx(2.75)
    assert out["attn_sparsity"] == pytest.approx(0.625)
    assert "attn_sparsity/layer_2" not in out
    assert out["microbatches_full"] == 1 and out["microbatches_sparse"] == 1
    assert tracker.reduce()["microbatches_full"] == 0  # reset after reduce

    # The mode sampler agrees across ranks with different torch RNG states.
    torch.manual_seed(100 + rank)
    modes = torch.tensor([sample_mode(1234, it, mb, 0.5) == "full" for it in range(50) for mb in range(4)])
    gathered = [torch.zeros_like(modes) for _ in range(world_size)]
    dist.all_gather(gathered, modes)
    assert torch.equal(gathered[0], gathered[1])


@pytest.mark.slow
def test_tracker_reduction_two_ranks():
    spawn_gloo(_tracker_ranks, 2)


def test_tracker_sums_tensors_where_they_live():
    """Tensor values (what the layers record) are summed as tensors, detached, without reading them on the host;
    floats still work; the reduction divides by the number of records per layer."""
    from ssa_megatron.megatron.tracker import SSAMetricsTracker

    tracker = SSAMetricsTracker()
    w = torch.tensor(2.0, requires_grad=True)
    tracker.record("alignment_loss", 1, 2, w * 1.5)  # 3.0, carries a graph
    tracker.record("alignment_loss", 1, 2, torch.tensor([5.0]))  # any one-element shape
    tracker.record("alignment_loss", 2, 2, 0.25)
    assert isinstance(tracker.sums["alignment_loss"], torch.Tensor)
    assert not tracker.sums["alignment_loss"].requires_grad
    out = tracker.reduce()
    assert out["alignment_loss/layer_1"] == pytest.approx(4.0)
    assert out["alignment_loss/layer_2"] == pytest.approx(0.25)
    assert out["alignment_loss"] == pytest.approx((4.0 + 0.25) / 2)


def test_tracker_records_a_layer_forward():
    """One layer forward: the loss and its two terms when computed, each statistic's mean over heads when
    collected, nothing else."""
    from ssa_megatron.megatron.tracker import SSAMetricsTracker
    from ssa_megatron.ssa import SSAStats

    tracker = SSAMetricsTracker()
    tracker.record_layer(2, 2, torch.tensor(0.75), SSAStats(mode="full"))
    assert tracker.sums == {}
    stats = SSAStats(mode="sparse", sparsity_loss=torch.tensor(0.5), commitment_loss=torch.tensor(0.25),
                     metrics={"sparsity": torch.tensor([0.2, 0.4]), "sink_mass": torch.tensor([0.1, 0.3])})
    tracker.record_layer(2, 2, torch.tensor(0.75, requires_grad=True), stats)
    out = tracker.reduce()
    assert out["alignment_loss/layer_2"] == pytest.approx(0.75)
    assert out["sparsity_loss"] == pytest.approx(0.5) and out["commitment_loss"] == pytest.approx(0.25)
    assert out["attn_sparsity/layer_2"] == pytest.approx(0.3) and out["attn_sink_mass"] == pytest.approx(0.2)
    assert "alignment_loss/layer_1" not in out
