"""``ssa_attention``: the one entry point of the SSA layer math, used by Megatron, the HF model and evaluation.

It runs the sampled mode, and when training with ``alpha > 0`` also the counterpart branch and the alignment
loss. The arithmetic comes from a backend: the Triton kernels (``ssa_kernels``) on CUDA, or the readable
reference (``ssa_megatron.ssa.reference``) elsewhere. Both expose the same three functions::

    select_blocks(q, k, block_size, top_k, score, sink_blocks, local_blocks, cu_seqlens, q_positions,
                  softmax_scale, selection='exact', normaliser='earlier_blocks')
        -> (block_idx [b, HKV, sq, K] int32, counts [b, HKV, sq] int32)
    sparse_attention(q, k, v, block_idx, block_size, q_positions, softmax_scale, starts_on_grid) -> (out, lse)
    full_attention(q, k, v, cu_seqlens, q_positions, softmax_scale) -> (out, lse)

The kernels also split the full branch for context parallelism (``full_attention_diagonal``, then
``full_attention(..., diagonal=)``), so that its part on the rank's own keys runs while K/V are being gathered.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import types
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor

from ssa_megatron.config import SSAConfig
from ssa_megatron.ssa import reference

Mode = Literal["full", "sparse"]


@dataclass
class SSAStats:
    """What one call computed, for logging. Losses are detached float32 scalars (None when not computed)."""

    mode: str
    sparsity_loss: Tensor | None = None
    commitment_loss: Tensor | None = None
    metrics: dict[str, Tensor] | None = None
    """Per-head attention statistics (``reference.attention_metrics``) when asked for."""
    block_idx: Tensor | None = None
    """The selection this call used (``select_blocks``'s table), None when it ran no sparse branch."""


@functools.cache
def _triton_backend() -> types.ModuleType | None:
    try:
        return importlib.import_module("ssa_kernels")
    except ImportError:
        return None


def get_backend(name: str, device: torch.device, dtype: torch.dtype | None = None) -> types.ModuleType:
    """The module that provides select_blocks / sparse_attention / full_attention for ``device`` (and inputs of
    ``dtype``: the kernels take float16/bfloat16/float32; 'auto' sends float64 to the reference)."""
    if name == "reference":
        return reference
    kernels = _triton_backend()
    if name == "triton":
        if kernels is None or not hasattr(kernels, "sparse_attention"):
            raise ValueError("ssa.backend='triton' but the ssa_kernels package is not importable")
        if device.type != "cuda" and not _interpreting():
            raise ValueError(f"ssa.backend='triton' needs a CUDA device (or TRITON_INTERPRET=1), got {device}")
        if dtype is not None and dtype not in kernels.SUPPORTED_DTYPES:
            raise ValueError(f"ssa.backend='triton' takes float16, bfloat16 or float32 inputs, got {dtype}; "
                             f"use 'auto' or 'reference' for {dtype}")
        return kernels
    if name == "auto":
        usable = (kernels is not None and hasattr(kernels, "sparse_attention") and device.type == "cuda"
                  and (dtype is None or dtype in kernels.SUPPORTED_DTYPES))
        return kernels if usable else reference
    raise ValueError(f"ssa.backend={name!r}: must be 'auto', 'reference' or 'triton'")


def _fused_gate_loss(backend: types.ModuleType, o: Tensor) -> bool:
    """Whether both gates and the alignment loss run as the backend's one fused kernel (``gate_and_align``): the
    kernels do (on CUDA), the reference does not."""
    return backend is not reference and hasattr(backend, "gate_and_align") and o.dtype in backend.SUPPORTED_DTYPES


def _overlap_branches(cfg: SSAConfig, backend: types.ModuleType, q: Tensor) -> bool:
    """``cfg.overlap_branches`` where it applies: the kernels on CUDA. Autograd runs each backward on its forward's
    stream, so the two branches' backward passes overlap as well."""
    return cfg.overlap_branches and backend is not reference and q.is_cuda


@functools.cache
def _side_stream(device_index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=device_index)


def _run_concurrently(sparse_side, full_side, inputs: tuple[Tensor | None, ...]):
    """``sparse_side()`` on the side stream, ``full_side()`` on the current one; returns when the current stream
    has both results ``(block_idx, o_sparse, o_full)``. Tensors are protected for the caching allocator: the
    ``inputs`` (q, k, v, positions, document bounds; allocated on the current stream) are read by the side stream
    now and, through the sparse branch's saved tensors, in its backward; the side's outputs are read on the
    current stream."""
    device = inputs[0].device
    main = torch.cuda.current_stream(device)
    side = _side_stream(device.index if device.index is not None else torch.cuda.current_device())
    side.wait_stream(main)
    with torch.cuda.stream(side):
        block_idx, o_sparse = sparse_side()
    o_full = full_side()
    main.wait_stream(side)
    for t in inputs:
        if t is not None and t.is_cuda:
            t.record_stream(side)
    for t in (block_idx, o_sparse):
        if t is not None:
            t.record_stream(main)
    return block_idx, o_sparse, o_full


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""q/k/v dtypes ``ssa_attention`` takes (float64 runs on the reference only)."""


def _names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_inputs(q: Tensor, k: Tensor, v: Tensor, gate: Tensor | None, cfg: SSAConfig,
                 cu_seqlens: Tensor | None, q_positions: Tensor | None, softmax_scale: float | None) -> None:
    """Rejects bad arguments with one line naming the input, its value and what is allowed.

    Only shapes, dtypes and Python values are read: nothing here waits for the GPU (docs/architecture.md), so
    tensor contents (NaN/Inf in q/k/v, the values of cu_seqlens) are not checked here; the training loop checks
    the losses and gradients (training/health.py), the reference checks cu_seqlens values.
    """
    dtypes = (q.dtype, k.dtype, v.dtype)
    if any(d not in INPUT_DTYPES for d in dtypes) or len(set(dtypes)) > 1:
        raise ValueError(f"q/k/v dtype {_names(dtypes)}: must be one dtype, one of {_names(INPUT_DTYPES)}")
    reference.check_qkv(q, k, v)
    for name, t in (("q", q), ("k", k)):
        if 0 in t.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} [s, b, heads, head_dim]: every dimension must be >= 1 "
                             "(an empty sequence or batch has no attention)")
    if gate is not None and not gate.dtype.is_floating_point:
        raise ValueError(f"gate dtype {_names([gate.dtype])}: must be a floating-point tensor of logits")
    reference.check_index_tensor("cu_seqlens", cu_seqlens)
    reference.check_index_tensor("q_positions", q_positions)
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))
                                      or not math.isfinite(softmax_scale) or softmax_scale <= 0):
        raise ValueError(f"softmax_scale={softmax_scale!r}: must be None (head_dim ** -0.5) or a finite number > 0")
    cfg.validate("ssa")


def ssa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gate: Tensor | None,
    cfg: SSAConfig,
    mode: Mode,
    training: bool,
    *,
    cu_seqlens: Tensor | None = None,
    q_positions: Tensor | None = None,
    softmax_scale: float | None = None,
    with_metrics: bool = False,
    block_idx: Tensor | None = None,
    gathered_kv: Callable[[], tuple[Tensor, Tensor]] | None = None,
) -> tuple[Tensor, Tensor, SSAStats]:
    """SSA attention for one layer.

    Args:
        q: ``[sq, b, HQ, D]`` queries (RoPE applied). k, v: ``[skv, b, HKV, D]`` (GQA not expanded).
        gate: ``[sq, b, HQ]`` gate logits (sigmoid applied here), or None for no gate.
        cfg: the SSA semantics; when not training, its inference overrides (budget, block size) apply.
        mode: the branch whose output is returned ('full' or 'sparse').
        training: with ``cfg.alpha > 0`` the counterpart branch and the alignment loss are computed too.
        cu_seqlens: document boundaries over the flattened ``b·skv`` stream; used when ``cfg.document_mask``.
        q_positions: ``[sq]`` global query positions (context parallelism); default the last sq keys.
        with_metrics: also return attention statistics (O(sq·skv) memory; for periodic logging only).
        block_idx: the selection an earlier call made for these same q, k and settings (``stats.block_idx`` of
            the first forward of an activation-recomputed region): used instead of selecting again.
        gathered_kv: context parallelism with an exchange in flight: ``k``/``v`` ``[sq, b, HKV, D]`` are then the
            keys and values at the query positions (the rank's own), and ``gathered_kv()`` returns the whole
            sequence's ``[skv, b, HKV, D]`` once they have arrived. What needs only the own keys (the full
            branch's diagonal pieces, where the backend splits it) runs before that call.

    Returns:
        ``(out [sq, b, HQ, D], alignment_loss, stats)``; the loss is a scalar tensor, zero when not computed.
    """
    if mode not in ("full", "sparse"):
        raise ValueError(f"mode={mode!r}: must be 'full' or 'sparse'")
    check_inputs(q, k, v, gate, cfg, cu_seqlens, q_positions, softmax_scale)
    if gathered_kv is not None and q_positions is None:
        raise ValueError("q_positions=None with gathered_kv: must be the queries' global positions")
    if gathered_kv is not None and k.shape[0] != q.shape[0]:
        raise ValueError(f"k rows {k.shape[0]} with gathered_kv: must equal q's {q.shape[0]} (the keys at the query "
                         "positions)")
    if not training:
        cfg = cfg.for_inference()
    docs = cu_seqlens if cfg.document_mask else None
    backend = get_backend(cfg.backend, q.device, q.dtype)
    compute_both = training and cfg.alpha > 0
    need_sparse = mode == "sparse" or compute_both or with_metrics
    need_full = mode == "full" or compute_both
    diagonal = None
    if gathered_kv is not None:
        if need_full and hasattr(backend, "full_attention_diagonal"):
            diagonal = backend.full_attention_diagonal(q, k, v, docs, q_positions, softmax_scale)
        k, v = gathered_kv()

    def sparse_side() -> tuple[Tensor | None, Tensor | None]:
        """The selection and (when needed) the sparse branch: ``(block_idx, ungated sparse output)``."""
        if not need_sparse:
            return None, None
        idx = block_idx
        if idx is None:
            idx, _ = backend.select_blocks(
                q.detach(), k.detach(), cfg.block_size, cfg.top_k, cfg.score, cfg.sink_blocks, cfg.local_blocks,
                docs, q_positions, softmax_scale, selection=cfg.selection, normaliser=cfg.normaliser,
            )
        if mode != "sparse" and not compute_both:
            return idx, None
        o_sparse, _ = backend.sparse_attention(q, k, v, idx, cfg.block_size, q_positions, softmax_scale,
                                               starts_on_grid=docs is None)
        return idx, o_sparse

    def full_side() -> Tensor | None:
        if not need_full:
            return None
        if diagonal is not None:
            return backend.full_attention(q, k, v, docs, q_positions, softmax_scale, diagonal=diagonal)[0]
        return backend.full_attention(q, k, v, docs, q_positions, softmax_scale)[0]

    if compute_both and _overlap_branches(cfg, backend, q):
        block_idx, o_sparse, o_full = _run_concurrently(sparse_side, full_side, (q, k, v, q_positions, docs))
    else:
        block_idx, o_sparse = sparse_side()
        o_full = full_side()
    ungated = {name: o for name, o in (("full", o_full), ("sparse", o_sparse)) if o is not None}

    stats = SSAStats(mode=mode, block_idx=block_idx)
    # The fused kernel computes both alignment terms; the one-term ablations (ssa.alignment) take the reference.
    if compute_both and cfg.alignment == "bidirectional" and _fused_gate_loss(backend, ungated["full"]):
        # One kernel: both gates + the alignment loss (same semantics as apply_gate + alignment_loss).
        out, loss, term = backend.gate_and_align(ungated["full"], ungated["sparse"], gate, cfg.smooth_l1_beta,
                                                 mode)
        stats.sparsity_loss, stats.commitment_loss = term, term.clone()
    else:
        outputs = {name: reference.apply_gate(o, gate) for name, o in ungated.items()}
        out = outputs[mode]
        if compute_both:
            loss, stats.sparsity_loss, stats.commitment_loss = reference.alignment_loss(
                outputs["full"], outputs["sparse"], cfg.smooth_l1_beta, cfg.alignment
            )
        else:
            loss = q.new_zeros((), dtype=torch.float32)
    if with_metrics:
        stats.metrics = reference.attention_metrics(
            q.detach(), k.detach(), block_idx, cfg.block_size, docs, q_positions, softmax_scale
        )
    return out, loss, stats
