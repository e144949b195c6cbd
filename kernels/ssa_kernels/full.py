"""Full causal attention (the SSA full branch): torch's fused kernels, flash-attn when installed.

Dispatch (CUDA):
- flash-attn installed: ``flash_attn_varlen_func`` (documents and query subsets as varlen sequences).
- no documents, queries = all keys (the training case): torch's cuDNN attention op
  ``aten._scaled_dot_product_cudnn_attention`` (the kernel ``F.scaled_dot_product_attention`` picks on an
  H100/H200, faster than FA2 there: docs/kernels_notes.md) on the Megatron tensors viewed as ``[b, h, s, d]``
  (no copy, native GQA, returns the log-sum-exp); FA2 (``aten._scaled_dot_product_flash_attention``) when cuDNN
  declines the inputs.
- documents and/or query subsets (context parallelism): the query rows are cut into runs of consecutive
  positions inside one document; every run becomes one varlen sequence whose keys are its document's keys up
  to the run's last position, attended with bottom-right-aligned causal masking by
  ``aten._flash_attention_forward`` (varlen FlashAttention-2). Packing is one gather of q/k/v rows: cheaper
  than a block-diagonal dense mask (O(T²) memory, no flash backend) or a Python loop over documents (one
  launch per document), and exact.
Elsewhere (CPU, float32, head dim above 256) a plain masked softmax in torch.
"""

from __future__ import annotations

import math

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


class _VarlenPlan:
    """The varlen packing of one (documents, query positions) layout: gather rows, cu_seqlens, max lengths."""

    def __init__(self, cu_seqlens, q_pos, b, skv, device):
        self.runs = _runs(cu_seqlens, q_pos, b, skv)
        runs = self.runs
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


def full_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor | None = None,
                   q_positions: Tensor | None = None, softmax_scale: float | None = None
                   ) -> tuple[Tensor, Tensor]:
    """Causal attention (documents kept apart when ``cu_seqlens`` is given). Returns ``(out, lse)``.

    Same contract as the reference: ``out [sq, b, HQ, D]``, ``lse [b, HQ, sq]`` float32 (natural log; not
    differentiable on the CUDA paths).
    """
    check_qkv(q, k, v)
    sq, b, hq, d = q.shape
    skv = k.shape[0]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16) or d > 256:
        q_pos = q_positions_or_default(q_positions, sq, skv, q.device)
        return _torch_masked(q, k, v, cu_seqlens, q_pos, scale)
    default_pos = q_positions is None and sq == skv
    if cu_seqlens is None and default_pos and _fa_varlen is None:
        return _flash_dense(q, k, v, scale)
    q_pos = q_positions_or_default(q_positions, sq, skv, q.device)
    return _flash_varlen(q, k, v, cu_seqlens, q_pos, scale, q_positions=q_positions, cached=True)
