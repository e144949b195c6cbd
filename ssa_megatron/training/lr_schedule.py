"""Linear warmup from 0 to ``optim.lr``, then cosine (or linear, or constant) decay to ``optim.min_lr``.

``lr_at(step)`` is the learning rate used by optimizer step ``step`` (0-based): warmup reaches the peak at the
last warmup step and the decay reaches ``min_lr`` at the last step of the schedule; later steps stay there.

A checkpoint saves the position and the schedule's length (``total_steps``, ``warmup_steps``). Resuming with
another ``train.steps`` follows ``optim.on_steps_change``: ``keep`` the saved length (a longer run holds
``min_lr`` after the original end), or ``restretch`` the decay to end at the new ``train.steps``; ``note`` then
says in one line which applies.
"""

from __future__ import annotations

import math

from ssa_megatron.config import OptimConfig


class WarmupDecayLR:
    def __init__(self, optim: OptimConfig, total_steps: int):
        self.max_lr = optim.lr
        self.min_lr = optim.min_lr
        self.style = optim.decay_style
        self.on_steps_change = optim.on_steps_change
        self.total_steps = total_steps
        """Steps the schedule spans: train.steps, or the original run's under on_steps_change=keep."""
        warmup = optim.warmup_steps if optim.warmup_steps is not None else round(optim.warmup_fraction * total_steps)
        # A run shorter than its warmup (a quick `train.steps=5` try of a recipe) warms up over all but its last
        # step instead of failing.
        self.warmup_steps = min(warmup, total_steps - 1)
        self.step_count = 0
        """Optimizer steps taken so far (the next step uses lr_at(step_count))."""
        self.note: str | None = None
        """Set by load_state_dict when train.steps differs from the saved schedule's: how the schedule continues."""

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
        """Restores the position. The peak, the floor and the decay style come from the recipe (which may have been
        changed on purpose); when train.steps differs from the saved ``total_steps``, the length follows
        ``on_steps_change`` and ``note`` says so."""
        self.step_count = int(state["step_count"])
        saved_total = int(state.get("total_steps", self.total_steps))
        new_total = self.total_steps
        if saved_total == new_total:
            return
        # The warmup already ran (or is running) with the saved length; re-deriving it from warmup_fraction and the
        # new total could send a resumed run back into warmup.
        saved_warmup = int(state.get("warmup_steps", self.warmup_steps))
        self.total_steps, self.warmup_steps = saved_total, min(saved_warmup, saved_total - 1)
        at = self.step_count
        before = self.lr_at(at)
        change = f"LR schedule: train.steps {saved_total} -> {new_total} since the checkpoint (step {at})"
        if self.on_steps_change == "keep":
            if new_total > saved_total:
                self.note = (f"{change}; optim.on_steps_change=keep: the decay still ends at step {saved_total}, and "
                             f"steps {max(at, saved_total)}-{new_total} hold its final LR {self.lr_at(saved_total):.3g}"
                             f" (optim.on_steps_change=restretch re-stretches the decay to end at step {new_total})")
            else:
                self.note = (f"{change}; optim.on_steps_change=keep: the run stops at step {new_total}, before the "
                             f"decay ends at step {saved_total} (LR {self.lr_at(new_total - 1):.3g} at the last step, "
                             f"not min_lr; optim.on_steps_change=restretch compresses the decay to end there)")
            return
        self.total_steps, self.warmup_steps = new_total, min(saved_warmup, new_total - 1)
        self.note = (f"{change}; optim.on_steps_change=restretch: the decay is recomputed to end at step {new_total} "
                     f"(warmup stays {self.warmup_steps} steps); the LR at step {at} moves from {before:.3g} to "
                     f"{self.lr_at(at):.3g} (optim.on_steps_change=keep would keep the original schedule)")
