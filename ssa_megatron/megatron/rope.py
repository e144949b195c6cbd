"""The compiled unfused RoPE (``train.fused_ops`` on CUDA), in effect only inside SSA attention layers.

Megatron's fused RoPE needs Transformer Engine, and SSA's per-document positions need the unfused one anyway
(``SSAGPTModel``). Eager, ``rope_utils._apply_rotary_pos_emb_bshd`` is chunk, neg, cat, two multiplies, an add and
a final cat: about seven passes over q and k in each direction. ``torch.compile`` makes the same math one kernel
each way.

Megatron has no hook for the RoPE function: ``Attention.forward`` calls ``rope_utils.apply_rotary_pos_emb``, which
looks ``_apply_rotary_pos_emb_bshd`` up in its module at every call. So :func:`compiled_rope` puts the compiled
function there for the duration of a block (one ``SSASelfAttention.forward``) and puts the previous one back after:
other models in the process keep Megatron's own RoPE. ``tests/test_megatron_model.py`` fails if Megatron stops
looking the function up this way.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator

import torch
from megatron.core.models.common.embeddings import rope_utils

_EAGER = rope_utils._apply_rotary_pos_emb_bshd


@functools.cache
def compiled_rope_function() -> Callable:
    """Megatron's unfused RoPE, compiled once per process (on its first call, for each input shape)."""
    return torch.compile(_EAGER, dynamic=False)


@contextlib.contextmanager
def compiled_rope() -> Iterator[None]:
    """Megatron's unfused RoPE is the compiled one inside the block."""
    previous = rope_utils._apply_rotary_pos_emb_bshd
    rope_utils._apply_rotary_pos_emb_bshd = compiled_rope_function()
    try:
        yield
    finally:
        rope_utils._apply_rotary_pos_emb_bshd = previous
