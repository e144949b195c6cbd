"""Full causal attention (the SSA full branch): torch's fused kernels, flash-attn when installed.

Dispatch (CUDA):
- flash-attn installed: ``flash_attn_varlen_func`` (documents and query subsets as varlen sequences).
- no documents, queries = all keys (the training case): torch's cuDNN attention op
  ``aten._scaled_dot_product_cudnn_attention`` (the kernel ``F.scaled_dot_product_attention`` picks on an
  H100/H200, faster than FA2 there: docs/kernels_notes.md) on the Megatron tensors viewed as ``[b, h, s, d]``
  (no copy, native GQA, returns the log-sum-exp); FA2 (``aten._scaled_dot_product_flash_attention``) when cuDNN
  declines the inputs.
- no documents, query subsets made of a few long runs of consecutive positions (context parallelism's zigzag
  chunks, or the last sq of skv keys): each run of queries [a, e) is attended as two cuDNN pieces, the prefix
  (keys [0, a), no mask; none when a = 0) and the diagonal (keys [a, e), causal, square), merged by their
  log-sum-exps (``_split_attention``). The backward gives each piece the merged output and log-sum-exp, which
  makes each piece's gradient its exact share (as ring attention does). cuDNN's kernels are about 1.5× faster
  than FA2's at D 64 on an H200 (docs/kernels_notes.md, v1 and v7). FA2 varlen (below) when cuDNN declines.
  The diagonal pieces and the prefix + merge are two autograd nodes, because a run's diagonal needs only its own
  keys: under context parallelism ``full_attention_diagonal`` computes them from the rank's own K/V while the
  all-gather is in flight, and ``full_attention(..., diagonal=)`` adds the prefix pieces once it has landed.
- documents, and query subsets of many or short runs: the query rows are cut into runs of consecutive
  positions inside one document; every run becomes one varlen sequence whose keys are its document's keys up
  to the run's last position, attended with bottom-right-aligned causal masking by
  ``aten._flash_attention_forward`` (varlen FlashAttention-2). Packing is one gather of q/k/v rows: cheaper
  than a block-diagonal dense mask (O(T²) memory, no flash backend) or a Python loop over documents (one
  launch per document), and exact.
Elsewhere (CPU, float32, head dim above 256) a plain masked softmax in torch.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ._common import check_qkv, document_starts, q_positions_or_default

try:  # optional
    from flash_attn import flash_attn_varlen_func as _fa_varlen  # type: ignore
except Exception:  # ImportError, or a broken CUDA extension
    _fa_varlen = None

_SDPA_GQA_NATIVE: bool | None = None  # whether the aten flash op accepts fewer KV heads (probed once)


def _torch_masked(q, k, v, cu_seqlens, q_pos, scale):
    """Causal (and document-masked) attention in float32 torch: the path where no flash kernel applies. Kernels
    sit below ``ssa_megatron.ssa`` in the layering, so this cannot call ``reference.full_attention``."""
    sq, b, hq, d = q.shape
    skv, _, hkv, _ = k.shape
    g = hq // hkv
    doc = document_starts(cu_seqlens, b, skv, q.device)
    j = torch.arange(skv, device=q.device)
    mask = (j[None, :] <= q_pos.long()[:, None])[None]  # [1, sq, skv]
    if doc is not None:
        mask = mask & (doc[:, q_pos.long()][:, :, None] == doc[:, None, :])
    qh = q.permute(1, 2, 0, 3).float()
    kh = k.repeat_interleave(g, dim=2).permute(1, 2, 0, 3).float()
    vh = v.repeat_interleave(g, dim=2).permute(1, 2, 0, 3).float()
    logits = (scale * qh @ kh.transpose(-1, -2)).masked_fill(~mask[:, None], -math.inf)
    lse = torch.logsumexp(logits, dim=-1)
    # Masked probabilities are 0, and 0 · NaN is NaN: a non-finite value in one document's v would reach every
    # row. Zero such values before the matmul; a row is NaN only where its mask allows the key (in that column).
    bad = ~torch.isfinite(vh)
    out = torch.exp(logits - lse[..., None]) @ torch.where(bad, torch.zeros_like(vh), vh)
    out = out.masked_fill((mask[:, None].float() @ bad.float()) > 0, math.nan)
    return out.permute(2, 0, 1, 3).to(q.dtype), lse


_CUDNN_OK: bool | None = None  # whether the cuDNN op accepted our inputs (probed once)


def _cudnn_dense(q, k, v, scale):
    """cuDNN SDPA op with the log-sum-exp; native GQA when cuDNN takes it, else None (caller falls back)."""
    global _CUDNN_OK
    if _CUDNN_OK is False:
        return None
    qh, kh, vh = q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)
    try:
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(qh, kh, vh, None, True, 0.0, True, False,
                                                                 scale=scale)
    except torch.OutOfMemoryError:  # a RuntimeError too, but not cuDNN declining the inputs
        raise
    except RuntimeError:
        _CUDNN_OK = False
        return None
    _CUDNN_OK = True
    b, hq, sq = qh.shape[:3]
    return res[0].permute(2, 0, 1, 3), res[1].reshape(b, hq, sq)


def _flash_dense(q, k, v, scale):
    """No documents, sq == skv: cuDNN or FA2 through torch on [b, h, s, d] views."""
    global _SDPA_GQA_NATIVE
    res = _cudnn_dense(q, k, v, scale)
    if res is not None:
        return res
    qh, kh, vh = q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)
    g = q.shape[2] // k.shape[2]
    if g > 1 and _SDPA_GQA_NATIVE is not False:
        try:
            res = torch.ops.aten._scaled_dot_product_flash_attention(qh, kh, vh, 0.0, True, False, scale=scale)
            _SDPA_GQA_NATIVE = True
            return res[0].permute(2, 0, 1, 3), res[1]
        except RuntimeError:
            _SDPA_GQA_NATIVE = False
    if g > 1:
        kh, vh = kh.repeat_interleave(g, dim=1), vh.repeat_interleave(g, dim=1)
    res = torch.ops.aten._scaled_dot_product_flash_attention(qh, kh, vh, 0.0, True, False, scale=scale)
    return res[0].permute(2, 0, 1, 3), res[1]


def _runs(cu_seqlens, q_pos, b, skv):
    """Host-side: varlen sequences (b, q row start, length, key start, key end) covering all queries.

    A sequence is a maximal run of consecutive query positions inside one document; its keys run from the document
    start to the run's last position. Vectorised with numpy: this runs at every layer (CP, documents), where a
    Python loop over the positions cost milliseconds of host time per call.
    """
    pos = q_pos.long().cpu().numpy()
    n = len(pos)
    if cu_seqlens is None:
        doc_bounds = [np.zeros(1, dtype=np.int64)] * b
    else:
        cu = cu_seqlens.long().cpu().numpy()
        doc_bounds = [cu[(cu >= r * skv) & (cu < (r + 1) * skv)] - r * skv for r in range(b)]
    runs = []
    for r, bounds in enumerate(doc_bounds):
        if n == 0:
            continue
        doc = np.searchsorted(bounds, pos, side="right") - 1  # document of each query
        starts = np.flatnonzero(np.concatenate([[True], (pos[1:] != pos[:-1] + 1) | (doc[1:] != doc[:-1])]))
        ends = np.append(starts[1:], n)
        runs += [(r, int(i), int(j - i), int(bounds[doc[i]]), int(pos[j - 1]) + 1) for i, j in zip(starts, ends)]
    return runs


_SPLIT_MAX_RUNS = 4
"""At most this many runs take the cuDNN split path (context parallelism has 1 or 2); more would cost two
launches and a merge each, where varlen FA2 takes one launch for all."""
_SPLIT_MIN_RUN = 128
"""Shortest run the split path takes: one cuDNN query tile. Shorter runs (decoding-like calls) stay on FA2."""


class _VarlenPlan:
    """The varlen packing of one (documents, query positions) layout: gather rows, cu_seqlens, max lengths; and,
    without documents, the runs ``(row start, length, key end)`` of the cuDNN split path (None where it does not
    apply)."""

    def __init__(self, cu_seqlens, q_pos, b, skv, device):
        self.runs = _runs(cu_seqlens, q_pos, b, skv)
        runs = self.runs
        first_row = [(i, n, ke) for (r, i, n, _, ke) in runs if r == 0]
        self.split_runs = (tuple(first_row) if cu_seqlens is None and 0 < len(first_row) <= _SPLIT_MAX_RUNS
                           and min(n for _, n, _ in first_row) >= _SPLIT_MIN_RUN else None)
        self.q_rows = torch.cat([torch.arange(i, i + n, device=device) * b + r for (r, i, n, _, _) in runs])
        self.k_rows = torch.cat([torch.arange(ks, ke, device=device) * b + r for (r, _, _, ks, ke) in runs])
        lens_q = [n for (_, _, n, _, _) in runs]
        lens_k = [ke - ks for (_, _, _, ks, ke) in runs]
        self.cu_q = torch.tensor([0] + lens_q, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
        self.cu_k = torch.tensor([0] + lens_k, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
        self.max_q, self.max_k = max(lens_q), max(lens_k)


def _identity(tensors, shape) -> tuple:
    return tuple((id(t), getattr(t, "_version", None)) for t in tensors) + tuple(shape)


_PLANS: list[tuple[tuple, tuple, _VarlenPlan]] = []  # (identity key, the key tensors kept alive, plan)
_PLANS_KEPT = 4


def _varlen_plan(cu_seqlens, q_positions, q_pos, b, skv, device) -> _VarlenPlan:
    """The plan for the caller's ``cu_seqlens`` / ``q_positions`` tensors, made once per micro-batch rather than
    at every layer.

    Making a plan reads positions and document bounds on the host, which waits for the GPU. Every layer of a
    micro-batch passes the same tensor objects (the CP positions are memoised), so the last few plans are kept,
    matched by tensor identity and in-place version (the key tensors are held, so their ids cannot be reused).
    """
    key = _identity((cu_seqlens, q_positions), (q_pos.shape[0], b, skv, str(device)))
    for k, _, plan in _PLANS:
        if k == key:
            return plan
    plan = _VarlenPlan(cu_seqlens, q_pos, b, skv, device)
    _PLANS.insert(0, (key, (cu_seqlens, q_positions), plan))
    del _PLANS[_PLANS_KEPT:]
    return plan


def _flash_varlen(q, k, v, cu_seqlens, q_pos, scale, q_positions=None, cached=False):
    """Causal attention over runs of consecutive positions (documents, CP query subsets) as varlen sequences.

    ``cached``: reuse the plan of the caller's ``cu_seqlens`` / ``q_positions`` objects (None = the default
    positions; ``q_pos`` is their int32 copy on the device).
    """
    sq, b, hq, d = q.shape
    skv, _, hkv, _ = k.shape
    dev = q.device
    plan = (_varlen_plan(cu_seqlens, q_positions, q_pos, b, skv, dev) if cached
            else _VarlenPlan(cu_seqlens, q_pos, b, skv, dev))
    runs, q_rows, k_rows = plan.runs, plan.q_rows, plan.k_rows
    cu_q, cu_k, max_q, max_k = plan.cu_q, plan.cu_k, plan.max_q, plan.max_k
    qf = q.reshape(sq * b, hq, d).index_select(0, q_rows)
    kf = k.reshape(skv * b, hkv, d).index_select(0, k_rows)
    vf = v.reshape(skv * b, hkv, d).index_select(0, k_rows)
    if _fa_varlen is not None:
        out, lse, _ = _fa_varlen(qf, kf, vf, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=True,
                                 return_attn_probs=True)
    else:
        res = torch.ops.aten._flash_attention_forward(qf, kf, vf, cu_q, cu_k, max_q, max_k, 0.0, True, False,
                                                      scale=scale)
        out, lse = res[0], res[1]
    o = torch.zeros(sq * b, hq, d, device=dev, dtype=out.dtype).index_copy(0, q_rows, out)
    if lse.dim() == 3:  # padded [n_seq, h, max_q] layout
        lse = torch.cat([lse[s, :, :n] for s, (_, _, n, _, _) in enumerate(runs)], dim=1)
    lse_full = torch.empty(hq, sq * b, device=dev, dtype=torch.float32)
    lse_full[:, q_rows] = lse.float()
    return o.view(sq, b, hq, d), lse_full.view(hq, sq, b).permute(2, 0, 1)


class PieceKernel(NamedTuple):
    """Attention of a block of queries over a block of keys, on ``[b, h, s, d]`` views (GQA: fewer KV heads).

    ``forward(q, k, v, causal, scale) -> (out, lse [b, HQ, L], saved)``; ``causal`` only for square pieces.
    ``backward(grad_out, q, k, v, out, lse, saved, causal, scale) -> (dq, dk, dv)``: ``out`` / ``lse`` may be
    those of a larger softmax the piece is part of; the gradients are then the piece's share of it.
    ``saved`` is what the forward hands its backward. The split path runs on cuDNN; tests substitute an exact
    float64 implementation (tests/test_full_cp.py).
    """

    forward: Callable
    backward: Callable


def _cudnn_piece_forward(q, k, v, causal, scale):
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    b, h, n = q.shape[:3]
    # The backward gets the log-sum-exp in the forward's own shape, as autograd would pass it, and the forward's
    # RNG state (unused without dropout, passed for the same reason).
    return res[0], res[1].reshape(b, h, n), (res[1].shape, res[6], res[7])


def _cudnn_piece_backward(grad_out, q, k, v, out, lse, saved, causal, scale):
    lse_shape, seed, offset = saved
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        grad_out, q, k, v, out, lse.contiguous().view(lse_shape), seed, offset, None, None, None, q.shape[2],
        k.shape[2], 0.0, causal, scale=scale)


CUDNN_PIECES = PieceKernel(_cudnn_piece_forward, _cudnn_piece_backward)


class _MergedRuns:
    """The merged ``out [sq, b, HQ, D]`` and ``lse [b, HQ, sq]`` of one split call: ``_PrefixAndMerge``'s forward
    sets them and ``_DiagonalPieces``' backward reads them (the tensors the merge saves; no copy)."""

    __slots__ = ("out", "lse")

    def __init__(self) -> None:
        self.out = self.lse = None


class _DiagonalPieces(torch.autograd.Function):
    """The causal diagonal piece of each query run: q rows ``[i, i+n)`` over k/v rows ``[ks, ks+n)``.

    Returns ``(out [sq, b, HQ, D], lse [b, HQ, sq])``, which only ``_PrefixAndMerge`` may consume: its backward
    hands down the gradient of the *merged* output in ``out``'s slot, and this backward reads the merged output
    and log-sum-exp from ``merged``, so each piece's gradient is its exact share. It is a node of its own so that
    under context parallelism it runs on the rank's own keys while the K/V all-gather is in flight, and its
    backward runs after the node that issues the reduce-scatter (ssa_megatron/megatron/context_parallel.py).
    """

    @staticmethod
    def forward(ctx, q, k, v, pieces, scale, kernel, merged):
        sq, b, hq, d = q.shape
        out = q.new_empty(sq, b, hq, d)
        lse = torch.empty(b, hq, sq, dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
        qh, kh, vh, oh = (x.permute(1, 2, 0, 3) for x in (q, k, v, out))
        states = []
        for i, n, ks in pieces:
            o, l, s = kernel.forward(qh[:, :, i:i + n], kh[:, :, ks:ks + n], vh[:, :, ks:ks + n], True, scale)
            oh[:, :, i:i + n].copy_(o)
            lse[:, :, i:i + n].copy_(l)
            states.append(s)
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v)
        ctx.pieces, ctx.scale, ctx.kernel, ctx.states, ctx.merged = pieces, scale, kernel, states, merged
        return out, lse

    @staticmethod
    def backward(ctx, grad_merged, _grad_lse):
        q, k, v = ctx.saved_tensors
        out, lse = ctx.merged.out, ctx.merged.lse
        acc = torch.promote_types(q.dtype, torch.float32)
        grad_merged = grad_merged.contiguous()  # the strides of out (cuDNN reads out and grad_out alike)
        dq = q.new_empty(q.shape)
        # Pieces may share keys (repeated positions): sum their dK/dV in float32 (small with GQA).
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        qh, kh, vh, oh, gh, dqh = (x.permute(1, 2, 0, 3) for x in (q, k, v, out, grad_merged, dq))
        dkh, dvh = dk.permute(1, 2, 0, 3), dv.permute(1, 2, 0, 3)
        for (i, n, ks), state in zip(ctx.pieces, ctx.states):
            dq_d, dk_d, dv_d = ctx.kernel.backward(gh[:, :, i:i + n], qh[:, :, i:i + n], kh[:, :, ks:ks + n],
                                                   vh[:, :, ks:ks + n], oh[:, :, i:i + n], lse[:, :, i:i + n],
                                                   state, True, ctx.scale)
            dqh[:, :, i:i + n].copy_(dq_d)
            dkh[:, :, ks:ks + n] += dk_d
            dvh[:, :, ks:ks + n] += dv_d
        ctx.merged = None
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


class _PrefixAndMerge(torch.autograd.Function):
    """Each query run's prefix piece (keys ``[0, a)``, no mask; none where ``a = 0``) merged with its diagonal
    piece by log-sum-exp. Returns ``(out, lse)``; its backward returns the prefix pieces' gradients and hands
    ``grad_out`` to ``_DiagonalPieces`` (see there)."""

    @staticmethod
    def forward(ctx, q, k, v, o_diag, lse_diag, runs, scale, kernel, merged):
        sq, b, hq, d = q.shape
        acc = torch.promote_types(q.dtype, torch.float32)
        out = q.new_empty(sq, b, hq, d)  # contiguous: every run's slice has the strides of grad_out's
        lse = lse_diag.clone()
        qh, kh, vh, oh, odh = (x.permute(1, 2, 0, 3) for x in (q, k, v, out, o_diag))
        states = []
        for i, n, e in runs:
            a = e - n
            if a == 0:
                oh[:, :, i:i + n].copy_(odh[:, :, i:i + n])
                states.append(None)
                continue
            o_pre, l_pre, s_pre = kernel.forward(qh[:, :, i:i + n], kh[:, :, :a], vh[:, :, :a], False, scale)
            l_pre, l_diag = l_pre.to(acc), lse_diag[:, :, i:i + n]
            # out = o_pre·exp(l_pre − lse) + o_diag·exp(l_diag − lse); the prefix's weight is a sigmoid
            w_pre = torch.sigmoid(l_pre - l_diag).unsqueeze(-1)
            oh[:, :, i:i + n].copy_(torch.lerp(odh[:, :, i:i + n].to(acc), o_pre.to(acc), w_pre))
            lse[:, :, i:i + n] = torch.logaddexp(l_pre, l_diag)
            states.append(s_pre)
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.runs, ctx.scale, ctx.kernel, ctx.states = runs, scale, kernel, states
        merged.out, merged.lse = out, lse
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        acc = torch.promote_types(q.dtype, torch.float32)
        grad_out = grad_out.contiguous()
        dq = torch.zeros_like(q)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)  # runs share prefix keys: summed in float32
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        qh, kh, vh, oh, gh, dqh = (x.permute(1, 2, 0, 3) for x in (q, k, v, out, grad_out, dq))
        dkh, dvh = dk.permute(1, 2, 0, 3), dv.permute(1, 2, 0, 3)
        for (i, n, e), state in zip(ctx.runs, ctx.states):
            a = e - n
            if a == 0:
                continue
            dq_p, dk_p, dv_p = ctx.kernel.backward(gh[:, :, i:i + n], qh[:, :, i:i + n], kh[:, :, :a],
                                                   vh[:, :, :a], oh[:, :, i:i + n], lse[:, :, i:i + n], state,
                                                   False, ctx.scale)
            dqh[:, :, i:i + n].copy_(dq_p)
            dkh[:, :, :a] += dk_p
            dvh[:, :, :a] += dv_p
        return dq, dk.to(k.dtype), dv.to(v.dtype), grad_out, None, None, None, None, None


def _split_attention(q, k, v, runs, scale, kernel: PieceKernel = CUDNN_PIECES):
    """Causal attention of the query ``runs`` ``(row start, length, key end)`` (no documents; together they
    cover the rows of ``q`` in order): the diagonal and prefix pieces of each run on ``kernel``, merged.
    Returns ``(out [sq, b, HQ, D], lse [b, HQ, sq])``, the full path's contract (lse not differentiable)."""
    merged = _MergedRuns()
    o_diag, lse_diag = _DiagonalPieces.apply(q, k, v, tuple((i, n, e - n) for i, n, e in runs), scale, kernel,
                                             merged)
    return _PrefixAndMerge.apply(q, k, v, o_diag, lse_diag, runs, scale, kernel, merged)


_CUDNN_SPLIT_OK: bool | None = None  # whether cuDNN took the split path's pieces (None: not tried yet)


def _piece_kernel(q: Tensor) -> PieceKernel | None:
    """The split path's kernel for ``q``: cuDNN on CUDA in float16/bfloat16 (D <= 256) unless flash-attn is
    installed (its varlen kernel takes query subsets) or cuDNN declined before; None elsewhere."""
    if (q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
            and _fa_varlen is None and _CUDNN_SPLIT_OK is not False):
        return CUDNN_PIECES
    return None


def _split_step(step: Callable):
    """``step()`` (a call of the split path), or None (and varlen FA2 from then on) when the kernel declines."""
    global _CUDNN_SPLIT_OK
    try:
        res = step()
    except torch.OutOfMemoryError:  # a RuntimeError too, but not cuDNN declining the inputs
        raise
    except RuntimeError as err:
        _CUDNN_SPLIT_OK = False
        first_line = (str(err).strip().splitlines() or [""])[0]
        warnings.warn(f"ssa_kernels.full_attention: cuDNN declined the query-run pieces ({first_line}); "
                      f"using varlen FlashAttention-2 for query subsets from now on", stacklevel=3)
        return None
    _CUDNN_SPLIT_OK = True
    return res


class FullDiagonal(NamedTuple):
    """``full_attention_diagonal``'s result, for ``full_attention(..., diagonal=)``: the diagonal pieces' output
    and log-sum-exp (autograd-tracked), the query runs ``(row start, length, key end)``, their kernel, and the
    slot through which the merge hands its result to the pieces' backward."""

    out: Tensor
    lse: Tensor
    runs: tuple
    kernel: PieceKernel
    merged: _MergedRuns


def full_attention_diagonal(q: Tensor, k_own: Tensor, v_own: Tensor, cu_seqlens: Tensor | None = None,
                            q_positions: Tensor | None = None, softmax_scale: float | None = None
                            ) -> FullDiagonal | None:
    """The part of causal attention that needs only the queries' own keys: every run of consecutive query
    positions over the keys of that run (causal, square).

    ``k_own`` / ``v_own`` ``[sq, b, HKV, D]`` hold the keys and values *at the query positions* (row i at
    ``q_positions[i]``: a context-parallel rank's own chunks), so this can run before the whole sequence's keys
    arrive; ``full_attention(q, k, v, ..., diagonal=)`` then adds the prefix pieces. None where the split path
    does not apply (documents, default positions, CPU, float32, flash-attn installed, runs too many or short):
    ``full_attention`` then does everything.
    """
    check_qkv(q, k_own, v_own)
    sq, b, hq, d = q.shape
    kernel = _piece_kernel(q)
    if kernel is None or cu_seqlens is not None or q_positions is None or k_own.shape[0] != sq:
        return None
    q_pos = q_positions_or_default(q_positions, sq, sq, q.device)
    runs = _varlen_plan(None, q_positions, q_pos, b, sq, q.device).split_runs
    if runs is None:
        return None
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    merged = _MergedRuns()
    pieces = tuple((i, n, i) for i, n, _ in runs)  # a run's own keys are its own rows
    res = _split_step(lambda: _DiagonalPieces.apply(q, k_own, v_own, pieces, scale, kernel, merged))
    return None if res is None else FullDiagonal(res[0], res[1], runs, kernel, merged)


def full_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor | None = None,
                   q_positions: Tensor | None = None, softmax_scale: float | None = None,
                   diagonal: FullDiagonal | None = None) -> tuple[Tensor, Tensor]:
    """Causal attention (documents kept apart when ``cu_seqlens`` is given). Returns ``(out, lse)``.

    Same contract as the reference: ``out [sq, b, HQ, D]``, ``lse [b, HQ, sq]`` float32 (natural log; not
    differentiable on the CUDA paths). ``diagonal``: ``full_attention_diagonal``'s result for these queries
    (computed from their own keys earlier); only the prefix pieces and the merge are left.
    """
    check_qkv(q, k, v)
    sq, b, hq, d = q.shape
    skv = k.shape[0]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    if diagonal is not None:
        res = _split_step(lambda: _PrefixAndMerge.apply(q, k, v, diagonal.out, diagonal.lse, diagonal.runs, scale,
                                                        diagonal.kernel, diagonal.merged))
        if res is not None:
            return res
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16) or d > 256:
        q_pos = q_positions_or_default(q_positions, sq, skv, q.device)
        return _torch_masked(q, k, v, cu_seqlens, q_pos, scale)
    default_pos = q_positions is None and sq == skv
    if cu_seqlens is None and default_pos and _fa_varlen is None:
        return _flash_dense(q, k, v, scale)
    q_pos = q_positions_or_default(q_positions, sq, skv, q.device)
    kernel = _piece_kernel(q)
    if cu_seqlens is None and kernel is not None:
        runs = _varlen_plan(None, q_positions, q_pos, b, skv, q.device).split_runs
        res = _split_step(lambda: _split_attention(q, k, v, runs, scale, kernel)) if runs is not None else None
        if res is not None:
            return res
    return _flash_varlen(q, k, v, cu_seqlens, q_pos, scale, q_positions=q_positions, cached=True)
