"""Block selection: mean-pool the keys, score the complete earlier blocks, keep the exact top-k.

One program handles a tile of ``BQ`` query tokens of one (batch row, KV head): the ``BQ × G`` query rows
form the M dimension of the scoring matmul against chunks of pooled keys. Every candidate becomes one int64 key,
``(monotone float bits of the score) << 32 | block number``, so a plain integer maximum ranks by score and breaks
ties toward the later block, as the reference does; nothing of size ``T × T/BS`` ever reaches memory.
``group_softmax`` first runs a pass computing each head's log-sum-exp over the scored blocks (the softmax
normaliser), then the scoring pass, which keeps the top KP keys in registers in one of two ways:

- bucketed (KP 16 and 32, tiles of at most 16 tokens): the chunk's columns feed 16 buckets that each keep their
  best ``BUCKET_R`` keys (one small bitonic merge per chunk, no branches). A tile where a full bucket's smallest
  kept key ranks inside the top KP may have dropped a winner; it is flagged, and a second launch recomputes the
  flagged tiles with the streaming top-k below (exact; rare on any input where a bucket rarely holds 8 of the
  winners).
- streaming: a running top-KP list. With the threshold filter (``FILTER``, KP 16) only keys above its KP-th best
  can enter, a few of them inserted one by one, many of them via ``tl.topk`` of the chunk and a bitonic
  max-merge; without it every chunk that beats the list is merged.

Two switches of the reference are constexpr branches, so the default path compiles to the same code:

- ``selection='authors_chunked'`` (``CHUNKED``): the streaming top-k runs twice per tile, over the blocks of the
  older chunks and over the query's newest chunk, keeps the best ``block_size/2`` of the first and the best
  ``block_size/2 - 1`` (or all, in the first chunk) of the second, and merges them
  (``reference.authors_chunk_survivors``);
- ``normaliser='authors'`` (``NORM_OWN``): pass 1's log-sum-exp also covers the own block when the query is its
  last token.

``select_config`` is the launch table production uses; ``prepare_selection`` + ``launch_selection`` let
kernels/tools time other launch parameters on the same inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (block_grid, check_qkv, document_starts, last_dim_contiguous, next_pow2,
                      q_positions_or_default)

_MIN_KEY = tl.constexpr(-(2 ** 63))
# Filtered top-k: a chunk with at most this many keys above the threshold inserts them one by one (cheaper than
# the chunk's tl.topk + merge); with more, it takes the merge.
_INSERT_LIMIT = tl.constexpr(8)


# ----------------------------------------------------------------------------------------------------------
# Scoring


@triton.jit
def _load_pooled(kb_base, jj, s_kbn, d, nbc, D: tl.constexpr):
    """Pooled keys of blocks ``jj`` as the ``[BD, len(jj)]`` right operand of the scoring matmul."""
    return tl.load(kb_base + jj.to(tl.int64)[None, :] * s_kbn + d[:, None],
                   mask=(jj[None, :] < nbc) & (d[:, None] < D), other=0.0)


@triton.jit
def _group_lse2(q, kb_base, s_kbn, d, nbc, j_begin, j_end, lo_r, hi_r, scale_log2,
                M: tl.constexpr, D: tl.constexpr, BN1: tl.constexpr, P1_STAGES: tl.constexpr):
    """group_softmax pass 1: every query row's log2-sum-exp2 over its candidate blocks ``[lo_r, hi_r)``
    (0 for a row without candidates)."""
    m_i = tl.full([M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([M], dtype=tl.float32)
    n1 = tl.arange(0, BN1)
    for j0 in tl.range(j_begin, j_end, BN1, num_stages=P1_STAGES):
        jj = j0 + n1
        kb = _load_pooled(kb_base, jj, s_kbn, d, nbc, D)
        s = tl.dot(q, kb) * scale_log2
        cand = (jj[None, :] >= lo_r[:, None]) & (jj[None, :] < hi_r[:, None])
        s = tl.where(cand, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
        m_i = m_new
    return tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), 0.0)


@triton.jit
def _chunk_keys(q, kb_base, s_kbn, d, nbc, jj, lo_q, hi_q, lo_r, hi_r, r_ok, lse2, scale_log2, inv_g,
                BQ: tl.constexpr, GP: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
                SINK: tl.constexpr, LOCAL: tl.constexpr, SCORE: tl.constexpr):
    """Ranking keys ``[BQ, BN]`` of the tile's tokens for blocks ``jj``: the score summed over the group's heads
    (group_softmax: softmax probabilities; dot: logits / G), forced blocks at +inf, non-candidates at _MIN_KEY."""
    kb = _load_pooled(kb_base, jj, s_kbn, d, nbc, D)
    logits = tl.dot(q, kb)
    if SCORE == 0:
        cand_r = (jj[None, :] >= lo_r[:, None]) & (jj[None, :] < hi_r[:, None])
        p = tl.where(cand_r, tl.exp2(logits * scale_log2 - lse2[:, None]), 0.0)
    else:
        p = tl.where(r_ok[:, None], logits * inv_g, 0.0)
    score = tl.sum(tl.reshape(p, [BQ, GP, BN]), axis=1)  # [BQ, BN]
    cand = (jj[None, :] >= lo_q[:, None]) & (jj[None, :] < hi_q[:, None])
    forced = cand & ((jj[None, :] < lo_q[:, None] + SINK) | (jj[None, :] >= hi_q[:, None] - LOCAL))
    bits = score.to(tl.int32, bitcast=True)
    mono = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    mono = tl.where(forced, 0x7F800000, mono)
    key = (mono.to(tl.int64) << 32) | jj.to(tl.int64)[None, :]
    return tl.where(cand, key, _MIN_KEY)


# ----------------------------------------------------------------------------------------------------------
# Bucketed top-k


@triton.jit
def _bucketed_update(lists, key, BQ: tl.constexpr, NBK: tl.constexpr, BUCKET_R: tl.constexpr):
    """Chunk column pairs (2i, 2i+1) feed bucket i of ``lists [BQ, NBK, BUCKET_R]`` (ascending along the last
    axis). Branch-free: the chunk's two keys per bucket, descending, padded with _MIN_KEY, against the ascending
    list: the element-wise max holds the list's new top BUCKET_R as a bitonic sequence; one merge sorts it."""
    r_ax = tl.arange(0, BUCKET_R)
    ka, kb = tl.split(tl.reshape(key, [BQ, NBK, 2]))
    k_hi = tl.maximum(ka, kb)
    k_lo = tl.minimum(ka, kb)
    new_desc = tl.where(r_ax[None, None, :] == 0, k_hi[:, :, None],
                        tl.where(r_ax[None, None, :] == 1, k_lo[:, :, None], _MIN_KEY))
    return tl.bitonic_merge(tl.maximum(lists, new_desc), dim=2)


@triton.jit
def _bucketed_result(lists, t_ok, ovf_ptr, BQ: tl.constexpr, NBK: tl.constexpr, BUCKET_R: tl.constexpr,
                     KP: tl.constexpr):
    """The best KP keys of the union of the buckets, ascending; stores whether the tile may be inexact.

    Dropped keys lie below their bucket's kept minimum, so a winner can only be missing when a full bucket's minimum
    is above the KP-th best kept key. Such tiles are flagged for the exact recomputation (FIXUP launch)."""
    buf = tl.sort(tl.topk(tl.reshape(lists, [BQ, NBK * BUCKET_R]), KP, dim=1), dim=1)
    b_min = tl.min(lists, axis=2)
    over = (b_min > _MIN_KEY) & (b_min > tl.min(buf, axis=1)[:, None]) & t_ok[:, None]
    tl.store(ovf_ptr, tl.max(tl.max(over.to(tl.int32), axis=1), axis=0))
    return buf


# ----------------------------------------------------------------------------------------------------------
# Streaming top-k: buf [BQ, KP] holds the running best keys, thr their minimum per row


@triton.jit
def _chunk_top(key, KP: tl.constexpr, BN: tl.constexpr):
    """The chunk's best KP keys per row, descending."""
    if BN == KP:
        top = tl.sort(key, dim=1, descending=True)
    else:
        top = tl.topk(key, KP, dim=1)
    return top


@triton.jit
def _merged_update(buf, thr, key, KP: tl.constexpr, BN: tl.constexpr):
    """Unfiltered: a chunk with any key above the threshold is merged. Ascending buf vs descending top: the
    element-wise max holds the top KP of both as a bitonic sequence; one bitonic merge sorts it again."""
    hit = tl.max(tl.where(key > thr[:, None], 1, 0))
    if hit > 0:
        top = _chunk_top(key, KP, BN)
        buf = tl.bitonic_merge(tl.maximum(buf, top), dim=1)
        thr = tl.min(buf, axis=1)
    return buf, thr


@triton.jit
def _filtered_update(buf, thr, unsorted, key, KP: tl.constexpr, BN: tl.constexpr):
    """Threshold filter: only keys above the running KP-th best can enter. Few of them (after the first chunks,
    ~KP·BN/j of the j-th candidate on random data): inserted one by one, best first, each replacing the buffer's
    minimum (keys are distinct, so ``buf == thr`` marks exactly one slot); that leaves buf unordered, which
    ``unsorted`` records. Many of them (early chunks): the merge, after re-sorting buf if needed."""
    above = key > thr[:, None]
    n_new = tl.max(tl.sum(above.to(tl.int32), axis=1))
    if n_new > _INSERT_LIMIT:
        top = _chunk_top(key, KP, BN)
        if unsorted != 0:
            buf = tl.sort(buf, dim=1)
        buf = tl.bitonic_merge(tl.maximum(buf, top), dim=1)
        unsorted = tl.full([], 0, dtype=tl.int32)
        thr = tl.min(buf, axis=1)
    elif n_new > 0:
        unsorted = tl.full([], 1, dtype=tl.int32)
        pend = tl.where(above, key, _MIN_KEY)
        for _ in range(n_new):
            best = tl.max(pend, axis=1)
            ins = best > thr
            buf = tl.where(ins[:, None] & (buf == thr[:, None]), best[:, None], buf)
            pend = tl.where(pend == best[:, None], _MIN_KEY, pend)
            thr = tl.min(buf, axis=1)
    return buf, thr, unsorted


# ----------------------------------------------------------------------------------------------------------
# One scan over the blocks: the best KP keys per token


@triton.jit
def _scan_top_keys(q, kb_base, s_kbn, d, nbc, j_begin, j_end, lo_q, hi_q, lo_r, hi_r, r_ok, t_ok, lse2,
                   scale_log2, inv_g, ovf_ptr,
                   BQ: tl.constexpr, GP: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, KP: tl.constexpr,
                   SINK: tl.constexpr, LOCAL: tl.constexpr, SCORE: tl.constexpr, FILTER: tl.constexpr,
                   BUCKET_R: tl.constexpr):
    """The best KP ranking keys ``[BQ, KP]`` (ascending) of each token among its candidate blocks ``[lo_q, hi_q)``,
    scanning the chunks ``[j_begin, j_end)``. Empty slots hold distinct sentinels ``_MIN_KEY + column``, below every
    real key (non-candidates are exactly _MIN_KEY)."""
    sentinel = tl.arange(0, KP).to(tl.int64) + _MIN_KEY
    buf = tl.zeros([BQ, KP], dtype=tl.int64) + sentinel[None, :]
    thr = tl.min(buf, axis=1)
    unsorted = tl.full([], 0, dtype=tl.int32)
    NBK: tl.constexpr = BN // 2
    if BUCKET_R > 0:
        lists = tl.full([BQ, NBK, BUCKET_R], _MIN_KEY, dtype=tl.int64)
    n = tl.arange(0, BN)
    for j0 in range(j_begin, j_end, BN):
        key = _chunk_keys(q, kb_base, s_kbn, d, nbc, j0 + n, lo_q, hi_q, lo_r, hi_r, r_ok, lse2, scale_log2, inv_g,
                          BQ, GP, BN, D, SINK, LOCAL, SCORE)
        if BUCKET_R > 0:
            lists = _bucketed_update(lists, key, BQ, NBK, BUCKET_R)
        elif FILTER:
            buf, thr, unsorted = _filtered_update(buf, thr, unsorted, key, KP, BN)
        else:
            buf, thr = _merged_update(buf, thr, key, KP, BN)

    if BUCKET_R > 0:
        buf = _bucketed_result(lists, t_ok, ovf_ptr, BQ, NBK, BUCKET_R, KP)
    elif FILTER:
        buf = tl.sort(buf, dim=1)
    return buf


@triton.jit
def _chunk_union(old, new, cap_new, KP: tl.constexpr, HALF: tl.constexpr):
    """selection='authors_chunked': the best ``min(HALF, KP)`` keys of the older chunks (``old``) and the best
    ``cap_new`` of the newest chunk (``new``), both ``[BQ, KP]`` ascending, as one ascending ``[BQ, KP]`` list.
    Keeping fewer than HALF when KP < HALF changes nothing: only the best TOPK - 1 <= KP are stored."""
    c = tl.arange(0, KP)
    old = tl.where(c[None, :] >= KP - HALF, old, _MIN_KEY)
    new = tl.where(c[None, :] >= KP - cap_new[:, None], new, _MIN_KEY)
    # ascending vs descending: the element-wise max holds the best KP of both as a bitonic sequence
    return tl.bitonic_merge(tl.maximum(old, tl.sort(new, dim=1, descending=True)), dim=1)


# ----------------------------------------------------------------------------------------------------------
# The kernel


@triton.jit
def _store_selection(buf, CST, IDX, CNT, b, h, toks, t_ok, own_q, s_cb, s_ib, s_ih, s_is, s_cnb, s_cnh,
                     BQ: tl.constexpr, KP: tl.constexpr, TOPK: tl.constexpr, KO: tl.constexpr):
    """The best TOPK-1 keys (the last columns of the ascending buf) as sorted block starts, then the own block,
    then -1 padding; the count includes the own block."""
    c = tl.arange(0, KP)
    valid = (buf >= _MIN_KEY + KP) & (c[None, :] >= KP - (TOPK - 1))
    blk = (buf & 0xFFFFFFFF).to(tl.int32)
    start = tl.load(CST + b * s_cb + blk, mask=valid, other=0)
    start = tl.where(valid, start, 2147483647)
    start = tl.sort(start, dim=1)
    nsel = tl.sum(valid.to(tl.int32), axis=1)  # [BQ]

    out_base = IDX + b.to(tl.int64) * s_ib + h.to(tl.int64) * s_ih + toks.to(tl.int64) * s_is
    tl.store(out_base[:, None] + c[None, :], start, mask=t_ok[:, None] & (c[None, :] < nsel[:, None]))
    tl.store(out_base + nsel, own_q, mask=t_ok)
    co = tl.arange(0, KO)
    tl.store(out_base[:, None] + co[None, :], tl.full([BQ, KO], -1, dtype=tl.int32),
             mask=t_ok[:, None] & (co[None, :] > nsel[:, None]) & (co[None, :] < TOPK))
    tl.store(CNT + b * s_cnb + h * s_cnh + toks, nsel + 1, mask=t_ok)


@triton.jit
def _select_kernel(
    Q, KB, CST, LO, HI, OWN, IDX, CNT, NLO, NCAP, HN,
    sq, nbc,
    s_qs, s_qb, s_qh,
    s_kbb, s_kbh, s_kbn,
    s_cb, s_lb,
    s_ib, s_ih, s_is,
    s_cnb, s_cnh,
    HKV, scale_log2, inv_g, OVF,
    G: tl.constexpr, GP: tl.constexpr, BQ: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    KP: tl.constexpr, BN: tl.constexpr, TOPK: tl.constexpr, KO: tl.constexpr,
    SINK: tl.constexpr, LOCAL: tl.constexpr, SCORE: tl.constexpr,
    FILTER: tl.constexpr, BN1: tl.constexpr, P1_STAGES: tl.constexpr, BUCKET_R: tl.constexpr,
    FIXUP: tl.constexpr = False, CHUNKED: tl.constexpr = False, HALF: tl.constexpr = 0,
    NORM_OWN: tl.constexpr = False,
):
    # The last tiles have the most candidates (causal): started first, they keep the tail of the launch short.
    pid_q = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    M: tl.constexpr = BQ * GP

    rows = tl.arange(0, M)
    r_tok = pid_q * BQ + rows // GP
    r_g = rows % GP
    r_ok = (r_tok < sq) & (r_g < G)
    d = tl.arange(0, BD)
    q_ptr = (Q + r_tok.to(tl.int64)[:, None] * s_qs + b.to(tl.int64) * s_qb
             + (h * G + r_g).to(tl.int64)[:, None] * s_qh + d[None, :])
    ovf_ptr = OVF + pid_bh * tl.num_programs(0) + pid_q
    if FIXUP:  # second launch after a bucketed one: only the tiles it flagged are recomputed (exactly)
        if tl.load(ovf_ptr) == 0:
            return
    q = tl.load(q_ptr, mask=r_ok[:, None] & (d[None, :] < D), other=0.0)

    toks = pid_q * BQ + tl.arange(0, BQ)
    t_ok = toks < sq
    lo_q = tl.load(LO + b * s_lb + toks, mask=t_ok, other=0)
    hi_q = tl.load(HI + b * s_lb + toks, mask=t_ok, other=0)
    own_q = tl.load(OWN + b * s_lb + toks, mask=t_ok, other=0)
    lo_r = tl.load(LO + b * s_lb + r_tok, mask=r_ok, other=0)
    hi_r = tl.load(HI + b * s_lb + r_tok, mask=r_ok, other=0)
    j_begin = tl.min(tl.where(t_ok & (hi_q > lo_q), lo_q, nbc), axis=0)
    j_end = tl.max(tl.where(t_ok, hi_q, 0), axis=0)
    kb_base = KB + b.to(tl.int64) * s_kbb + h.to(tl.int64) * s_kbh

    lse2 = tl.zeros([M], dtype=tl.float32)
    if SCORE == 0:
        if NORM_OWN:  # the authors' normaliser: [lo, hn) is the candidates plus the own block when complete
            hn_r = tl.load(HN + b * s_lb + r_tok, mask=r_ok, other=0)
            lse2 = _group_lse2(q, kb_base, s_kbn, d, nbc, j_begin, j_end + 1, lo_r, hn_r, scale_log2, M, D, BN1,
                               P1_STAGES)
        else:
            lse2 = _group_lse2(q, kb_base, s_kbn, d, nbc, j_begin, j_end, lo_r, hi_r, scale_log2, M, D, BN1,
                               P1_STAGES)

    if CHUNKED:  # two scans: the older chunks [lo, nlo) and the query's newest chunk [nlo, hi)
        nlo_q = tl.load(NLO + b * s_lb + toks, mask=t_ok, other=0)
        cap_q = tl.load(NCAP + b * s_lb + toks, mask=t_ok, other=0)
        old_end = tl.max(tl.where(t_ok, nlo_q, 0), axis=0)
        new_begin = tl.min(tl.where(t_ok & (hi_q > nlo_q), nlo_q, nbc), axis=0)
        old = _scan_top_keys(q, kb_base, s_kbn, d, nbc, j_begin, old_end, lo_q, nlo_q, lo_r, hi_r, r_ok, t_ok,
                             lse2, scale_log2, inv_g, ovf_ptr, BQ, GP, BN, D, KP, SINK, LOCAL, SCORE, FILTER,
                             BUCKET_R)
        new = _scan_top_keys(q, kb_base, s_kbn, d, nbc, new_begin, j_end, nlo_q, hi_q, lo_r, hi_r, r_ok, t_ok,
                             lse2, scale_log2, inv_g, ovf_ptr, BQ, GP, BN, D, KP, SINK, LOCAL, SCORE, FILTER,
                             BUCKET_R)
        buf = _chunk_union(old, new, cap_q, KP, HALF)
    else:
        buf = _scan_top_keys(q, kb_base, s_kbn, d, nbc, j_begin, j_end, lo_q, hi_q, lo_r, hi_r, r_ok, t_ok, lse2,
                             scale_log2, inv_g, ovf_ptr, BQ, GP, BN, D, KP, SINK, LOCAL, SCORE, FILTER, BUCKET_R)
    _store_selection(buf, CST, IDX, CNT, b, h, toks, t_ok, own_q, s_cb, s_ib, s_ih, s_is, s_cnb, s_cnh,
                     BQ, KP, TOPK, KO)


# ----------------------------------------------------------------------------------------------------------
# Host side


def pooled_keys(k: Tensor, block_size: int, doc_start: Tensor | None, dtype: torch.dtype
                ) -> tuple[Tensor, Tensor]:
    """Mean-pooled keys of the complete blocks: ``(k_bar [b, HKV, NB, D], starts [b, NB] int32)``.

    Without documents block j covers keys ``j·BS .. j·BS+BS-1``; with documents the complete blocks of every
    document's grid, in ascending order, padded with start = skv (and zero keys).
    """
    skv, b, hkv, d = k.shape
    if doc_start is None:
        nb = skv // block_size
        kb = k[: nb * block_size].unflatten(0, (nb, block_size)).sum(1, dtype=torch.float32) / block_size
        kbar = kb.permute(1, 2, 0, 3).to(dtype).contiguous()
        starts = torch.arange(0, nb * block_size, block_size, device=k.device, dtype=torch.int32)
        return kbar, starts.expand(b, nb).contiguous()
    st, _, complete = block_grid(doc_start, b, skv, block_size, k.device)
    cnt = complete.sum(1)
    nb = max(skv // block_size, 1)  # a bound on any row's complete blocks; cnt.max() would wait for the GPU
    order = torch.sort((~complete).to(torch.int8), dim=1, stable=True).indices[:, :nb]
    valid = torch.arange(nb, device=k.device)[None, :] < cnt[:, None]
    starts = torch.where(valid, torch.gather(st.long(), 1, order), torch.full_like(order, skv))
    r = torch.arange(block_size, device=k.device)
    kbar = torch.zeros(b, hkv, nb, d, device=k.device, dtype=dtype)
    for bi in range(b):
        pos = (starts[bi, :, None] + r[None, :]).clamp(max=skv - 1).reshape(-1)
        kg = k[pos, bi].unflatten(0, (nb, block_size)).sum(1, dtype=torch.float32) / block_size  # [nb, hkv, d]
        kg = kg * valid[bi, :, None, None]
        kbar[bi] = kg.permute(1, 0, 2).to(dtype)
    return kbar, starts.to(torch.int32).contiguous()


def select_tiles(g: int, top_k: int) -> tuple[int, int, int, int]:
    """Tile geometry of the selection kernel: (GP padded group, KP top-k buffer, BN key-block chunk, BQ queries
    per program)."""
    gp = next_pow2(g)
    kp = max(16, next_pow2(max(top_k - 1, 1)))
    bn = max(kp, 32)  # 32-block chunks: faster than 64 (docs/kernels_notes.md, "Launch tuning history")
    bq = max(1, 64 // gp)
    while bq > 1 and bq * gp * bn > 16384:  # keeps the [BQ·GP, BN] score tile in registers
        bq //= 2
    if bq * gp < 16:  # tl.dot needs at least 16 rows
        bq = 16 // gp
    return gp, kp, bn, bq


def select_config(g: int, top_k: int, chunked: bool = False) -> dict:
    """The launch parameters ``select_blocks`` uses for a group of ``g`` query heads and budget ``top_k``.

    Keys: ``BQ``, ``BN`` (tiles), ``BUCKET_R`` (bucket size of the bucketed top-k; 0 = streaming only),
    ``FILTER`` (threshold-filtered streaming top-k), ``BN1`` and ``P1_STAGES`` (group_softmax pass-1 chunk and
    pipeline depth), ``num_warps``, ``num_stages``. Why these values (measurements: docs/kernels_notes.md,
    "Launch tuning history"):

    - the bucketed top-k only for KP 16 and 32 and tiles of at most 16 tokens (G >= 4): larger tiles hold too many
      bucket entries per program; its pass 1 then reads 64-block chunks through a 2-stage pipeline;
    - the threshold filter only at KP 16: at KP 32 almost every chunk takes the merge anyway and the filter costs;
    - one pipeline stage for the chunk loop: it is bound by the top-k, not by loads;
    - ``chunked`` (selection='authors_chunked'): streaming only, since its two scans would share one overflow flag.
    """
    _, kp, bn, bq = select_tiles(g, top_k)
    bucketed = kp in (16, 32) and bq <= 16 and not chunked
    return {"BQ": bq, "BN": bn, "BUCKET_R": 8 if bucketed else 0, "FILTER": kp <= 16,
            "BN1": max(bn, 64) if bucketed else bn, "P1_STAGES": 2 if bucketed else 1,
            "num_warps": 4, "num_stages": 1}


@dataclass
class SelectionInputs:
    """What the selection kernel reads, prepared on the device: queries, pooled keys and their block starts,
    and per query token the candidate range ``[lo, hi)`` into the pooled blocks and its own block's start."""

    q: Tensor  # [sq, b, HQ, D], last dim contiguous
    kbar: Tensor  # [b, HKV, NB, D]
    cstarts: Tensor  # [b, NB] int32
    lo: Tensor  # [b, sq] int32
    hi: Tensor  # [b, sq] int32
    own: Tensor  # [b, sq] int32
    newest_lo: Tensor | None  # selection='authors_chunked': [b, sq] int32, first pooled block of the newest chunk
    newest_cap: Tensor | None  # and [b, sq] int32, how many of its earlier blocks it keeps
    norm_hi: Tensor | None  # normaliser='authors': [b, sq] int32, end of the softmax normaliser's blocks
    hkv: int
    g: int
    top_k: int
    sink_blocks: int
    local_blocks: int
    score: str
    scale: float
    block_size: int = 0
    selection: str = "exact"
    normaliser: str = "earlier_blocks"


def prepare_selection(q: Tensor, k: Tensor, block_size: int, top_k: int, score: str = "group_softmax",
                      sink_blocks: int = 0, local_blocks: int = 0, cu_seqlens: Tensor | None = None,
                      q_positions: Tensor | None = None, softmax_scale: float | None = None,
                      selection: str = "exact", normaliser: str = "earlier_blocks") -> SelectionInputs:
    """Checks the arguments of ``select_blocks`` and prepares the kernel's inputs."""
    hkv, g = check_qkv(q, k)
    sq, b, hq, d = q.shape
    skv = k.shape[0]
    if top_k < 1:
        raise ValueError(f"top_k={top_k}: must be at least 1 block")
    if sink_blocks + local_blocks + 1 > top_k:
        raise ValueError(f"sink_blocks + local_blocks + 1 = {sink_blocks + local_blocks + 1} exceeds top_k={top_k}")
    if score not in ("group_softmax", "dot"):
        raise ValueError(f"score={score!r}: must be 'group_softmax' or 'dot'")
    check_switches(selection, normaliser, block_size, top_k, sink_blocks, local_blocks)
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    device = q.device
    q = last_dim_contiguous(q)
    q_pos = q_positions_or_default(q_positions, sq, skv, device).long()
    doc_start = document_starts(cu_seqlens, b, skv, device)
    kbar, cstarts = pooled_keys(k, block_size, doc_start, q.dtype)
    nbc = kbar.shape[2]

    if doc_start is None:
        own = (q_pos // block_size * block_size).expand(b, sq)
        lo = torch.zeros(b, sq, dtype=torch.int32, device=device)
        hi = torch.clamp(q_pos // block_size, max=nbc).to(torch.int32).expand(b, sq)
    else:
        q_doc = doc_start[:, q_pos]  # [b, sq]
        own = q_doc + (q_pos - q_doc) // block_size * block_size
        cs = cstarts.long().contiguous()
        lo = torch.searchsorted(cs, q_doc.contiguous()).to(torch.int32)
        hi = torch.searchsorted(cs, own.contiguous()).to(torch.int32)
    newest_lo = newest_cap = norm_hi = None
    if selection == "authors_chunked":  # chunks of block_size blocks from the document start (reference rule)
        q_doc = torch.zeros_like(own) if doc_start is None else doc_start[:, q_pos]
        chunk_blocks = (own - q_doc) // block_size // block_size * block_size
        newest = q_doc + chunk_blocks * block_size  # start position of the newest chunk's first block
        if doc_start is None:
            newest_lo = torch.clamp(newest // block_size, max=nbc)
        else:
            newest_lo = torch.searchsorted(cstarts.long().contiguous(), newest.contiguous())
        newest_lo = newest_lo.to(torch.int32).expand(b, sq).contiguous()
        newest_cap = torch.where(chunk_blocks == 0, block_size - 1, block_size // 2 - 1)
        newest_cap = newest_cap.to(torch.int32).expand(b, sq).contiguous()
    if normaliser == "authors":  # the own block (pooled index hi) joins when the query is its last token
        norm_hi = (hi + (q_pos + 1 == own + block_size).to(torch.int32)).to(torch.int32).expand(b, sq).contiguous()
    return SelectionInputs(q, kbar, cstarts, lo.contiguous(), hi.contiguous(), own.to(torch.int32).contiguous(),
                           newest_lo, newest_cap, norm_hi, hkv, g, top_k, sink_blocks, local_blocks, score, scale,
                           block_size, selection, normaliser)


def check_switches(selection: str, normaliser: str, block_size: int, top_k: int, sink_blocks: int,
                   local_blocks: int) -> None:
    """The reference's one-line errors for the selection rule and the normaliser (``reference.check_selection``;
    the kernels do not import the package)."""
    selections, normalisers = ("exact", "authors_chunked"), ("earlier_blocks", "authors")
    if selection not in selections:
        raise ValueError(f"selection={selection!r}: must be one of {', '.join(map(repr, selections))}")
    if normaliser not in normalisers:
        raise ValueError(f"normaliser={normaliser!r}: must be one of {', '.join(map(repr, normalisers))}")
    if selection == "authors_chunked":
        if sink_blocks or local_blocks:
            raise ValueError(f"selection='authors_chunked' forces no blocks: sink_blocks={sink_blocks} and "
                             f"local_blocks={local_blocks} must be 0")
        if top_k > block_size:
            raise ValueError(f"selection='authors_chunked' keeps at most block_size blocks: top_k={top_k} exceeds "
                             f"block_size={block_size}")


def _launch_select_kernel(sel: SelectionInputs, config: dict, block_idx: Tensor, counts: Tensor, overflow: Tensor,
                          fixup: bool = False) -> None:
    """One launch of ``_select_kernel``. ``overflow [b·HKV, tiles]`` int32: the bucketed launch writes the tiles'
    flags, the ``fixup`` launch reads them (unused by a streaming launch)."""
    q, kbar, cstarts, lo = sel.q, sel.kbar, sel.cstarts, sel.lo
    sq, b, _, d = q.shape
    gp, kp, _, _ = select_tiles(sel.g, sel.top_k)
    cfg = dict(config)
    bq, num_warps = cfg.pop("BQ"), cfg.pop("num_warps")
    if fixup:
        cfg["BUCKET_R"] = 0
    chunked = sel.selection == "authors_chunked"
    if chunked and cfg["BUCKET_R"] > 0:
        raise ValueError(f"selection='authors_chunked' runs the streaming top-k only: BUCKET_R={cfg['BUCKET_R']} "
                         "must be 0")
    _select_kernel[(triton.cdiv(sq, bq), b * sel.hkv)](
        q, kbar, cstarts, lo, sel.hi, sel.own, block_idx, counts,
        sel.newest_lo if chunked else lo, sel.newest_cap if chunked else lo,
        sel.norm_hi if sel.norm_hi is not None else lo,
        sq, kbar.shape[2],
        q.stride(0), q.stride(1), q.stride(2),
        kbar.stride(0), kbar.stride(1), kbar.stride(2),
        cstarts.stride(0), lo.stride(0),
        block_idx.stride(0), block_idx.stride(1), block_idx.stride(2),
        counts.stride(0), counts.stride(1),
        sel.hkv, sel.scale * math.log2(math.e), 1.0 / sel.g, overflow,
        G=sel.g, GP=gp, BQ=bq, D=d, BD=max(16, next_pow2(d)), KP=kp, TOPK=sel.top_k, KO=next_pow2(sel.top_k),
        SINK=sel.sink_blocks, LOCAL=sel.local_blocks, SCORE=0 if sel.score == "group_softmax" else 1,
        FIXUP=fixup, CHUNKED=chunked, HALF=sel.block_size // 2 if chunked else 0,
        NORM_OWN=sel.norm_hi is not None and sel.score == "group_softmax", num_warps=num_warps, **cfg,
    )


def launch_selection(sel: SelectionInputs, config: dict) -> tuple[Tensor, Tensor]:
    """The selection on prepared inputs with launch parameters ``config`` (the keys of ``select_config``).

    Returns ``(block_idx [b, HKV, sq, top_k] int32, counts [b, HKV, sq] int32)``.
    """
    sq, b = sel.q.shape[:2]
    device = sel.q.device
    block_idx = torch.empty(b, sel.hkv, sq, sel.top_k, dtype=torch.int32, device=device)
    counts = torch.empty(b, sel.hkv, sq, dtype=torch.int32, device=device)
    if sq == 0:
        return block_idx, counts
    if config["BUCKET_R"] > 0:
        # Bucketed top-k, then the exact streaming top-k for the (rare) tiles whose buckets overflowed. The flags
        # stay on the GPU: the second launch reads them, so nothing waits for the host.
        overflow = torch.empty(b * sel.hkv, triton.cdiv(sq, config["BQ"]), dtype=torch.int32, device=device)
        _launch_select_kernel(sel, config, block_idx, counts, overflow)
        _launch_select_kernel(sel, config, block_idx, counts, overflow, fixup=True)
    else:
        _launch_select_kernel(sel, config, block_idx, counts, counts)  # no flags without buckets
    return block_idx, counts


@torch.no_grad()
def select_blocks(
    q: Tensor,
    k: Tensor,
    block_size: int,
    top_k: int,
    score: str = "group_softmax",
    sink_blocks: int = 0,
    local_blocks: int = 0,
    cu_seqlens: Tensor | None = None,
    q_positions: Tensor | None = None,
    softmax_scale: float | None = None,
    selection: str = "exact",
    normaliser: str = "earlier_blocks",
) -> tuple[Tensor, Tensor]:
    """Top-k block selection per query token and KV head; same contract (and switches ``selection``,
    ``normaliser``) as the reference.

    Returns ``block_idx [b, HKV, sq, top_k]`` int32 (row-relative block starts, ascending, -1 padded) and
    ``counts [b, HKV, sq]`` int32.
    """
    sel = prepare_selection(q, k, block_size, top_k, score, sink_blocks, local_blocks, cu_seqlens, q_positions,
                            softmax_scale, selection, normaliser)
    return launch_selection(sel, select_config(sel.g, top_k, chunked=selection == "authors_chunked"))
