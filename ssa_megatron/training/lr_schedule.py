"""Linear warmup from 0 to ``optim.lr``, then cosine (or linear, or constant) decay to ``optim.min_lr``.

``lr_at(step)`` is the learning rate used by optimizer step ``step`` (0-based): warmup reaches the peak at the
last warmup step and the decay reaches ``min_lr`` at the last step of the run.
"""

from __future__ import annotations

import math

from ssa_megatron.config import OptimConfig


class WarmupDecayLR:
    def __init__(self, optim: OptimConfig, total_steps: int):
        self.max_lr = optim.lr
        self.min_lr = optim.min_lr
        self.style = optim.decay_style
        self.total_steps = total_steps
        warmup = optim.warmup_steps if optim.warmup_steps is not None else round(optim.warmup_fraction * total_steps)
        # A run shorter than its warmup (a quick `train.steps=5` try of a recipe) warms up over all but its last
        # step instead of failing.
        self.warmup_steps = min(warmup, total_steps - 1)
        self.step_count = 0
        """Optimizer steps taken so far (the next step uses lr_at(step_count))."""

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.max_lr * (step + 1) / self.warmup_steps
        decay_steps = self.total_steps - self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, decay_steps - 1))
        if self.style == "constant":
            factor = 1.0
        elif self.style == "linear":
            factor = 1.0 - progress
        else:
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr + (self.max_lr - self.min_lr) * factor

    def apply(self, optimizer) -> float:
        """Sets the learning rate of the next step on every parameter group and returns it."""
        lr = self.lr_at(self.step_count)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        return lr

    def step(self) -> None:
        self.step_count += 1

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                "max_lr": self.max_lr, "min_lr": self.min_lr, "style": self.style}

    def load_state_dict(self, state: dict) -> None:
        # The schedule's shape comes from the recipe (which may have been changed on purpose); only the
        # position is restored.
        self.step_count = int(state["step_count"])
