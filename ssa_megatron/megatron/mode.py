"""Which SSA branch a micro-batch trains on (docs/ssa.md rule 6).

The mode is a pure function of ``(seed, iteration, micro-batch index)``, so every TP/CP/PP/DP rank computes the
same value without communication. Inputs:

- ``seed`` and the iteration: the process-wide :data:`MODE_SAMPLER`; the training loop calls
  ``MODE_SAMPLER.set_iteration(it)`` once per optimizer step on every rank (``build_gpt_model`` sets the seed).
- the micro-batch index: Megatron's schedules set ``TransformerLayer.current_microbatch`` on every layer before
  each micro-batch forward (``set_current_microbatch``); loops that drive the model without a schedule set it
  themselves. :class:`~ssa_megatron.megatron.attention.SSATransformerLayer` hands it to its core attention.

Activation recompute reruns the forward of micro-batch i during its backward, when the layers' micro-batch index
already points at a later micro-batch (1F1B). Each layer therefore remembers the mode of each checkpointed
forward and replays it on recompute (:class:`RecomputeReplay`), instead of sampling again. :class:`LayerMode`
puts these rules together for one layer.

``ssa.mode_sampling: per_layer`` (the paper's "Random each layer" ablation) adds the global layer number to the
triple, so every layer draws its own mode; still the same on every rank and replayed under recompute. The tracker's
micro-batch mode counts and ``last_mode`` (the LM loss's full/sparse split) then report the last layer's mode.
"""

from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass, field

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mode_uniform(seed: int, iteration: int, microbatch: int, layer: int | None = None) -> float:
    """A uniform number in [0, 1) determined by the triple, or with ``layer`` the quadruple (no torch RNG: rank- and
    recompute-independent)."""
    h = _splitmix64(seed & _MASK64)
    h = _splitmix64(h ^ (iteration & _MASK64))
    h = _splitmix64(h ^ (microbatch & _MASK64))
    if layer is not None:
        h = _splitmix64(h ^ (layer & _MASK64))
    return (h >> 11) / float(1 << 53)


def sample_mode(seed: int, iteration: int, microbatch: int, p_full: float, layer: int | None = None) -> str:
    """'full' with probability ``p_full``, else 'sparse'; ``p_full`` 1 and 0 give a fixed mode. ``layer``: a draw of
    its own for that layer (``ssa.mode_sampling: per_layer``)."""
    return "full" if mode_uniform(seed, iteration, microbatch, layer) < p_full else "sparse"


@dataclass
class ModeSampler:
    """Process-wide sampling state: the seed and the current iteration, plus an optional forced mode."""

    seed: int = 1234
    iteration: int = 0
    forced: str | None = None
    """A mode that overrides sampling (and the inference mode), e.g. for evaluation under full and sparse."""
    last_mode: str | None = None
    """The mode the most recent SSA layer forward on this rank ran."""
    modes_this_iteration: dict[int, str] = field(default_factory=dict)
    """micro-batch index → mode, for the iteration in progress (training forwards only)."""

    def configure(self, seed: int) -> None:
        self.seed = int(seed)

    def set_iteration(self, iteration: int) -> None:
        """Call once per optimizer step, on every rank, before the forward-backward of that step."""
        self.iteration = int(iteration)
        self.modes_this_iteration = {}

    def mode_for(self, microbatch: int, p_full: float, layer: int | None = None) -> str:
        """The mode micro-batch ``microbatch`` of the current iteration trains on (in ``layer`` alone, when given)."""
        return sample_mode(self.seed, self.iteration, microbatch, p_full, layer)


MODE_SAMPLER = ModeSampler()


def last_mode() -> str | None:
    """The mode of the most recent SSA layer forward on this rank (on the last pipeline stage: the micro-batch whose
    LM loss is being computed)."""
    return MODE_SAMPLER.last_mode


@contextlib.contextmanager
def force_mode(mode: str | None):
    """Runs every SSA layer in ``mode`` ('full' | 'sparse'; None restores sampling) inside the block."""
    if mode not in (None, "full", "sparse"):
        raise ValueError(f"force_mode(mode={mode!r}): must be 'full', 'sparse' or None")
    previous = MODE_SAMPLER.forced
    MODE_SAMPLER.forced = mode
    try:
        yield
    finally:
        MODE_SAMPLER.forced = previous


def is_recomputing() -> bool:
    """True inside Megatron's activation-recompute pass (a checkpointed region re-run under grad in backward)."""
    from megatron.core.tensor_parallel.random import is_checkpointing

    return is_checkpointing() and torch.is_grad_enabled()


def in_checkpointed_forward() -> bool:
    """True in the first (no-grad) forward of a checkpointed region, whose backward will recompute it."""
    from megatron.core.tensor_parallel.random import is_checkpointing

    return is_checkpointing() and not torch.is_grad_enabled()


class RecomputeReplay:
    """Per-layer FIFO of what checkpointed forwards decided (their mode, their selection), replayed in order by
    their recompute, so that the recompute redoes the same computation without deciding again.

    Megatron's schedules run the backwards of a model chunk's micro-batches in the order of their forwards, so a
    FIFO pairs each recompute with its forward. It is cleared when a new iteration starts.
    """

    def __init__(self, what: str = "mode") -> None:
        self.what = what
        self._queue: collections.deque = collections.deque()
        self._iteration = None

    def push(self, value, iteration: int) -> None:
        if iteration != self._iteration:
            self._queue.clear()
            self._iteration = iteration
        self._queue.append(value)

    def pop(self):
        if not self._queue:
            raise RuntimeError(
                f"SSA: activation recompute found no recorded {self.what} for this layer; the checkpointed forward "
                "and its recompute must run in the same iteration"
            )
        return self._queue.popleft()


class LayerMode:
    """The mode of one SSA layer's forwards, in order of precedence: a forced mode (:func:`force_mode`), the
    inference mode when not training, the replayed mode under recompute, else the sampled one. ``layer`` (the global
    layer number, with ``ssa.mode_sampling: per_layer``) makes the sampled mode this layer's own draw."""

    def __init__(self, p_full: float, inference_mode: str, sampler: ModeSampler = MODE_SAMPLER,
                 layer: int | None = None) -> None:
        self.p_full = p_full
        self.inference_mode = inference_mode
        self.sampler = sampler
        self.layer = layer
        self._recompute_modes = RecomputeReplay("mode")

    def choose(self, training: bool, microbatch: int) -> str:
        """The mode of this forward of micro-batch ``microbatch``."""
        if self.sampler.forced is not None:
            return self.sampler.forced
        if not training:
            return self.inference_mode
        if is_recomputing():
            return self._recompute_modes.pop()
        mode = self.sampler.mode_for(microbatch, self.p_full, self.layer)
        if in_checkpointed_forward():
            self._recompute_modes.push(mode, self.sampler.iteration)
        return mode

    def record(self, mode: str, microbatch: int, training_forward: bool) -> None:
        """Publishes the mode a forward ran (``last_mode``; with ``training_forward`` — a training forward that is
        not a recompute — also ``modes_this_iteration``)."""
        self.sampler.last_mode = mode
        if training_forward:
            self.sampler.modes_this_iteration[microbatch] = mode
