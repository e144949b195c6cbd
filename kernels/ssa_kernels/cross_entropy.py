"""Cross entropy of vocabulary-parallel logits (the LM loss): one read of the logits forward, one read and one
write backward, no fp32 copy of them.

Same semantics as Megatron's ``vocab_parallel_cross_entropy`` (megatron/core/tensor_parallel/cross_entropy.py)
without label smoothing, which is how GPTModel calls it: rank ``r`` of ``tp`` holds the columns
``[r·V/tp, (r+1)·V/tp)`` of the logits, and the loss of a row is ``logsumexp(all columns) − logit[target]``
(fp32). A target outside ``[0, V)`` counts as the row's maximum logit (loss = log-sum-exp − maximum, gradient =
softmax), as there: Megatron zeroes the target logit after subtracting the maximum.

- Forward, one program per row, the columns ``BV`` at a time: the running maximum and the sum of exponentials
  relative to it (online), and the target logit when this rank holds the target. Across the tensor-parallel
  group: all-reduce MAX of the maxima, each rank rescales its sum to the global maximum, one all-reduce SUM of
  (sum, target logit). Kept for backward: the log-sum-exp, one fp32 number per row.
- Backward, one program per row: ``grad = (exp(x − lse) − onehot(target)) · grad_loss``, written in the logits'
  dtype, optionally over the logits themselves (``overwrite_logits``: the caller's logits are needed by nothing
  else, as GPTModel's are; saves a logits-sized buffer).

Megatron's path (``.float()`` copy, max, exp/sum, normalise, gather, then index_put and scale in backward, most of
them fp32 passes over ``[tokens, V]``) keeps an fp32 softmax for backward. Each row is reduced by one program in a
fixed order: deterministic, no atomics.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl
from torch import Tensor

from ._common import SUPPORTED_DTYPES, next_pow2


@triton.jit
def _row_stats_kernel(X, TARGET, STATS, n_rows, n_cols, stride_x, vocab_start, BV: tl.constexpr):
    """STATS [3, n_rows] fp32: this rank's row maximum, sum of exp(x − maximum), target logit (0 when the target
    is another rank's)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    cols = tl.arange(0, BV)
    m = float("-inf")
    s = 0.0
    for start in range(0, n_cols, BV):
        c = start + cols
        x = tl.load(x_row + c, mask=c < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # exp(−inf) = 0 rescales the empty sum of the first block; the masked columns add exp(−inf) = 0
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    t = tl.load(TARGET + row) - vocab_start
    mine = (t >= 0) & (t < n_cols)
    x_t = tl.load(x_row + tl.where(mine, t, 0), mask=mine, other=0.0).to(tl.float32)
    tl.store(STATS + row, m)
    tl.store(STATS + n_rows + row, s)
    tl.store(STATS + 2 * n_rows + row, x_t)


@triton.jit
def _grad_kernel(X, G, TARGET, LSE, GRAD_LOSS, n_cols, stride_x, stride_g, stride_gl, vocab_start,
                 BV: tl.constexpr):
    """G[row] = (exp(X[row] − lse) − onehot(target − vocab_start)) · grad_loss[row]; G may be X (in place: each
    element is read before it is written, by the same program)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    g_row = G + row * stride_g
    lse = tl.load(LSE + row)
    gl = tl.load(GRAD_LOSS + row * stride_gl).to(tl.float32)
    t = tl.load(TARGET + row) - vocab_start  # another rank's target matches no column of this rank
    cols = tl.arange(0, BV)
    for start in range(0, n_cols, BV):
        c = start + cols
        ok = c < n_cols
        x = tl.load(x_row + c, mask=ok, other=0.0).to(tl.float32)
        p = tl.exp(x - lse)
        g = (p - tl.where(c == t, 1.0, 0.0)) * gl
        tl.store(g_row + c, g.to(G.dtype.element_ty), mask=ok)


def _launch(n_cols: int) -> dict:
    # 4096 columns a step: 16 elements per thread at 8 warps (two 16-byte loads of bf16), 32 steps at V 128256
    bv = min(4096, max(16, next_pow2(n_cols)))
    return dict(BV=bv, num_warps=8 if bv >= 2048 else 4)


def _tp(group) -> tuple[int, int]:
    """(rank, size) in the tensor-parallel group; (0, 1) without one."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _check(logits: Tensor, target: Tensor) -> None:
    if logits.dim() != 2 or logits.stride(-1) != 1:
        raise ValueError(f"logits must be 2-D [tokens, V/tp] with contiguous columns, got shape "
                         f"{tuple(logits.shape)} strides {logits.stride()}")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"logits.dtype={logits.dtype}: cross_entropy supports float16, bfloat16 and float32")
    if target.shape != logits.shape[:1] or target.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"target must be int32/int64 of shape ({logits.shape[0]},), got {target.dtype} "
                         f"{tuple(target.shape)}")


def cross_entropy_forward(logits: Tensor, target: Tensor, tp_group=None) -> tuple[Tensor, Tensor]:
    """``(loss, lse)``, both ``[tokens]`` fp32, of ``logits`` ``[tokens, V/tp]`` (this rank's columns, contiguous
    rows not required) and ``target`` ``[tokens]`` (global vocabulary ids). Issues the group's all-reduces."""
    _check(logits, target)
    target = target.contiguous()
    n, v = logits.shape
    rank, world = _tp(tp_group)
    stats = torch.empty(3, n, device=logits.device, dtype=torch.float32)
    if n:
        _row_stats_kernel[(n,)](logits, target, stats, n, v, logits.stride(0), rank * v, **_launch(v))
    row_max, sum_exp, target_logit = stats
    if world > 1:
        local_max = row_max.clone()
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
        sum_exp.mul_(torch.exp(local_max - row_max))
        dist.all_reduce(stats[1:], op=dist.ReduceOp.SUM, group=tp_group)  # (sum, target logit): one call
    lse = row_max + torch.log(sum_exp)
    outside = (target < 0) | (target >= v * world)
    return lse - torch.where(outside, row_max, target_logit), lse


def cross_entropy_backward(logits: Tensor, target: Tensor, lse: Tensor, grad_loss: Tensor,
                           out: Tensor | None = None, tp_group=None) -> Tensor:
    """d loss / d logits ``[tokens, V/tp]`` in the logits' dtype, from :func:`cross_entropy_forward`'s ``lse``;
    ``grad_loss`` ``[tokens]``. ``out`` (may be ``logits`` itself) receives it; a new tensor without."""
    _check(logits, target)
    n, v = logits.shape
    rank, _ = _tp(tp_group)
    if out is None:
        out = torch.empty_like(logits)
    elif out.shape != logits.shape or out.dtype != logits.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {logits.dtype} {tuple(logits.shape)} with contiguous columns, got "
                         f"{out.dtype} {tuple(out.shape)} strides {out.stride()}")
    grad_loss = grad_loss.reshape(n)
    if n:
        _grad_kernel[(n,)](logits, out, target.contiguous(), lse.contiguous(), grad_loss, v, logits.stride(0),
                           out.stride(0), grad_loss.stride(0), rank * v, **_launch(v))
    return out


class CrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, tp_group, overwrite_logits):
        loss, lse = cross_entropy_forward(logits, target, tp_group)
        ctx.save_for_backward(logits, target, lse)
        ctx.tp_group, ctx.overwrite = tp_group, overwrite_logits
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        logits, target, lse = ctx.saved_tensors
        out = logits if ctx.overwrite else None
        grad = cross_entropy_backward(logits, target, lse, grad_loss, out=out, tp_group=ctx.tp_group)
        return grad, None, None, None


def cross_entropy_loss(logits: Tensor, target: Tensor, tp_group=None, overwrite_logits: bool = False) -> Tensor:
    """Per-token cross entropy (fp32, ``target``'s shape) of vocabulary-parallel ``logits`` ``[..., V/tp]``.

    Args:
        logits: this rank's vocabulary columns, float16 / bfloat16 / float32, e.g. ``[s, b, V/tp]``.
        target: int64 / int32 global vocabulary ids, ``logits.shape[:-1]``.
        tp_group: the tensor-parallel process group over which the vocabulary is split (None: not split).
        overwrite_logits: backward writes the gradient over ``logits`` (their values are lost); only when
            nothing else reads them after this loss.
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"target shape {tuple(target.shape)} must be logits' {tuple(logits.shape)} without the "
                         f"last (vocabulary) dimension")
    flat = logits.reshape(-1, logits.shape[-1])  # a view for contiguous logits (so overwriting reaches them)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    loss = CrossEntropyFn.apply(flat, target.reshape(-1), tp_group, overwrite_logits)
    return loss.view(target.shape)
