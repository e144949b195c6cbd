"""Triton kernels for SSA (Sparse Sparse Attention): selection, block-sparse attention, full attention.

Framework-free (torch + triton). The three entry points have exactly the signatures of
``ssa_megatron.ssa.reference`` (Megatron layout ``[s, b, h, d]``, strided inputs accepted)::

    select_blocks(q, k, block_size, top_k, score, sink_blocks, local_blocks, cu_seqlens, q_positions,
                  softmax_scale, selection='exact', normaliser='earlier_blocks')
        -> (block_idx [b, HKV, sq, K] int32, counts [b, HKV, sq] int32)
    sparse_attention(q, k, v, block_idx, block_size, q_positions, softmax_scale, starts_on_grid) -> (out, lse)
    full_attention(q, k, v, cu_seqlens, q_positions, softmax_scale) -> (out, lse)

plus ``full_attention_diagonal`` (the part of ``full_attention`` that needs only the queries' own keys, which
``ssa_attention`` runs while a context-parallel K/V all-gather is in flight; ``full_attention(..., diagonal=)``
finishes it), ``gate_and_align`` (fused sigmoid gate of both branches + alignment loss, used by
``ssa_attention``) and ``cross_entropy_loss`` (the vocabulary-parallel LM loss, used by the Megatron model on CUDA).
Inputs are float16, bfloat16 or float32 (``SUPPORTED_DTYPES``); float64 is the reference's.
"""

from ._common import SUPPORTED_DTYPES
from ._interpreter import patch_interpreter
from .cross_entropy import cross_entropy_loss
from .full import full_attention, full_attention_diagonal
from .gate import gate_and_align
from .select import select_blocks
from .sparse import build_reverse_index, sparse_attention

patch_interpreter()  # CPU runs under TRITON_INTERPRET=1 only; see _interpreter.py

__all__ = ["SUPPORTED_DTYPES", "select_blocks", "sparse_attention", "full_attention", "full_attention_diagonal",
           "build_reverse_index", "gate_and_align", "cross_entropy_loss"]
