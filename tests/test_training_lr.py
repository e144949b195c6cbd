"""Warmup + cosine (linear, constant) learning-rate schedule."""

import math

import pytest

from ssa_megatron.config import OptimConfig
from ssa_megatron.training.lr_schedule import WarmupDecayLR


def test_warmup_then_cosine_to_min():
    s = WarmupDecayLR(OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10), total_steps=110)
    lrs = [s.lr_at(i) for i in range(110)]
    assert lrs[0] == pytest.approx(1e-4)  # linear from 0: (step + 1) / warmup
    assert lrs[9] == pytest.approx(1e-3)  # peak at the last warmup step
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay
    assert lrs[-1] == pytest.approx(1e-5)  # min_lr at the last step
    mid = 10 + (100 - 1) / 2
    assert s.lr_at(int(mid)) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * int(mid - 10) / 99)))


def test_warmup_fraction_and_paper_shape():
    s = WarmupDecayLR(OptimConfig(lr=1e-3, min_lr=0.0, warmup_fraction=0.01), total_steps=31790)
    assert s.warmup_steps == 318
    assert s.lr_at(317) == pytest.approx(1e-3)
    assert s.lr_at(31789) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("style", ["linear", "constant"])
def test_other_decay_styles(style):
    s = WarmupDecayLR(OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=0, decay_style=style), total_steps=11)
    assert s.lr_at(0) == pytest.approx(1.0)
    assert s.lr_at(10) == pytest.approx(0.1 if style == "linear" else 1.0)
    if style == "linear":
        assert s.lr_at(5) == pytest.approx(0.55)


def test_apply_step_and_state_roundtrip():
    class Opt:
        param_groups = [{"lr": 0.0}, {"lr": 0.0, "lr_mult": 0.5}]

    s = WarmupDecayLR(OptimConfig(lr=1.0, warmup_steps=4), total_steps=20)
    opt = Opt()
    for _ in range(7):
        s.apply(opt)
        s.step()
    lr = s.apply(opt)
    assert opt.param_groups[0]["lr"] == lr and opt.param_groups[1]["lr"] == pytest.approx(lr / 2)
    t = WarmupDecayLR(OptimConfig(lr=1.0, warmup_steps=4), total_steps=20)
    t.load_state_dict(s.state_dict())
    assert t.step_count == 7 and t.lr_at(t.step_count) == lr


def test_warmup_longer_than_the_run_is_shortened():
    s = WarmupDecayLR(OptimConfig(lr=1.0, warmup_steps=10), total_steps=5)
    assert s.warmup_steps == 4 and s.lr_at(3) == pytest.approx(1.0)
    assert WarmupDecayLR(OptimConfig(lr=1.0, warmup_steps=3), total_steps=1).lr_at(0) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------------------
# Resuming with another train.steps: optim.on_steps_change.

def _cosine(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """The schedule's formula, written out: linear warmup, cosine to min_lr at step total - 1, min_lr after."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / (total - warmup - 1))
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def _resumed(on_steps_change: str, saved_total: int, new_total: int, at: int, **optim) -> WarmupDecayLR:
    optim = {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 10, **optim}
    first = WarmupDecayLR(OptimConfig(**optim), total_steps=saved_total)
    first.step_count = at
    resumed = WarmupDecayLR(OptimConfig(**optim, on_steps_change=on_steps_change), total_steps=new_total)
    resumed.load_state_dict(first.state_dict())
    return resumed


def test_longer_run_keeps_the_original_cosine_and_holds_min_lr():
    s = _resumed("keep", saved_total=80, new_total=120, at=70)
    assert s.step_count == 70
    for step in range(70, 120):
        assert s.lr_at(step) == pytest.approx(_cosine(step, 80, 10, 3e-3, 3e-4), rel=1e-12), step
    assert all(s.lr_at(step) == pytest.approx(3e-4) for step in range(79, 120))
    assert s.state_dict()["total_steps"] == 80  # a later resume still knows the original length
    assert "80 -> 120" in s.note and "on_steps_change=keep" in s.note and "restretch" in s.note
    assert "\n" not in s.note


def test_longer_run_restretched_recomputes_the_decay_over_the_new_total():
    s = _resumed("restretch", saved_total=80, new_total=90, at=70)
    for step in range(70, 90):
        assert s.lr_at(step) == pytest.approx(_cosine(step, 90, 10, 3e-3, 3e-4), rel=1e-12), step
    assert s.lr_at(70) > _cosine(70, 80, 10, 3e-3, 3e-4)  # what the note warns about: the LR goes back up
    assert s.state_dict()["total_steps"] == 90
    assert "on_steps_change=restretch" in s.note and f"{s.lr_at(70):.3g}" in s.note


def test_restretch_keeps_the_warmup_that_already_ran():
    # warmup_fraction 0.1 of 100 steps = 10; re-deriving it for 1000 steps (100) would put step 50 back in warmup.
    s = _resumed("restretch", saved_total=100, new_total=1000, at=50, warmup_steps=None, warmup_fraction=0.1)
    assert s.warmup_steps == 10
    assert s.lr_at(50) == pytest.approx(_cosine(50, 1000, 10, 3e-3, 3e-4))


def test_shorter_run_kept_stops_before_the_decay_ends():
    s = _resumed("keep", saved_total=100, new_total=80, at=50)
    assert s.lr_at(79) == pytest.approx(_cosine(79, 100, 10, 3e-3, 3e-4)) and s.lr_at(79) > 3e-4
    assert "stops at step 80" in s.note


def test_same_steps_resume_says_nothing():
    s = _resumed("keep", saved_total=80, new_total=80, at=40)
    assert s.note is None and s.total_steps == 80
