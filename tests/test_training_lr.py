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
