"""Block selection: mean-pool the keys, score the complete earlier blocks, keep the exact top-k.

One program handles a tile of ``BQ`` query tokens of one (batch row, KV head): the ``BQ × G`` query rows
form the M dimension of the scoring matmul against chunks of pooled keys. Every candidate becomes one int64 key,
``(monotone float bits of the score) << 32 | block number``, so a plain integer maximum ranks by score and breaks
ties toward the later block, as the reference does; nothing of size ``T × T/BS`` ever reaches memory.
``group_softmax`` first runs a pass computing each head's log-sum-exp over the scored blocks (the softmax
normaliser), then the scoring pass, which keeps the top KP keys in registers in one of two ways:

- bucketed (the default for KP 16 and 32): the chunk's columns feed 16 buckets that each keep their best
  ``BUCKET_R`` keys (one small bitonic merge per chunk, no branches). A tile where a full bucket's smallest kept
  key ranks inside the top KP may have dropped a winner; it is flagged, and a second launch recomputes the flagged
  tiles with the streaming top-k below (exact; rare on any input where a bucket rarely holds 8 of the winners).
- streaming: a running top-KP list; per chunk only keys above its KP-th best can enter (threshold filter), a
  few of them inserted one by one, many of them via ``tl.topk`` of the chunk and a bitonic max-merge.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (block_grid, check_qkv, document_starts, interpreting, last_dim_contiguous, next_pow2,
                      patch_interpreter, q_positions_or_default)

_MIN_KEY = tl.constexpr(-(2 ** 63))
DEFAULT_CONFIG: dict = {}
"""Kernel options merged under every call's ``_config`` (benchmarks use it to time variants end to end)."""
patch_interpreter()


@triton.jit
def _select_kernel(
    Q, KB, CST, LO, HI, OWN, IDX, CNT,
    sq, nbc,
    s_qs, s_qb, s_qh,
    s_kbb, s_kbh, s_kbn,
    s_cb, s_lb,
    s_ib, s_ih, s_is,
    s_cnb, s_cnh,
    HKV, scale_log2, inv_g, OVF,
    G: tl.constexpr, GP: tl.constexpr, BQ: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    KP: tl.constexpr, BN: tl.constexpr, TOPK: tl.constexpr, KO: tl.constexpr,
    SINK: tl.constexpr, LOCAL: tl.constexpr, SCORE: tl.constexpr, NO_TOPK: tl.constexpr = False,
    FILTER: tl.constexpr = True, LIGHT: tl.constexpr = 8, SORT_ONCE: tl.constexpr = False,
    REVERSE: tl.constexpr = False, BN1: tl.constexpr = 32, P1_STAGES: tl.constexpr = 1,
    BUCKET_R: tl.constexpr = 0, FIXUP: tl.constexpr = False,
):
    pid_q = tl.program_id(0)
    if REVERSE:  # the last tiles have the most candidates (causal): start them first, keep the tail short
        pid_q = tl.num_programs(0) - 1 - pid_q
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
    n = tl.arange(0, BN)

    # Pass 1 (group_softmax): per-row log2-sum-exp2 over the candidate blocks.
    lse2 = tl.zeros([M], dtype=tl.float32)
    if SCORE == 0:
        m_i = tl.full([M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([M], dtype=tl.float32)
        n1 = tl.arange(0, BN1)
        for j0 in tl.range(j_begin, j_end, BN1, num_stages=P1_STAGES):
            jj = j0 + n1
            kb = tl.load(kb_base + jj.to(tl.int64)[None, :] * s_kbn + d[:, None],
                         mask=(jj[None, :] < nbc) & (d[:, None] < D), other=0.0)
            s = tl.dot(q, kb) * scale_log2
            cand = (jj[None, :] >= lo_r[:, None]) & (jj[None, :] < hi_r[:, None])
            s = tl.where(cand, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
            m_i = m_new
        lse2 = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), 0.0)

    # Pass 2: scores, running exact top-KP as int64 keys (ascending; unordered with FILTER). Empty slots hold
    # distinct sentinels _MIN_KEY + column, below every real key (non-candidates are exactly _MIN_KEY).
    c = tl.arange(0, KP)
    sentinel = c.to(tl.int64) + _MIN_KEY
    buf = tl.zeros([BQ, KP], dtype=tl.int64) + sentinel[None, :]
    thr = tl.min(buf, axis=1)
    unsorted = tl.full([], 0, dtype=tl.int32)
    NBK: tl.constexpr = BN // 2
    if BUCKET_R > 0:
        # Bucketed top-k: chunk column pairs (2i, 2i+1) feed bucket i; every bucket keeps its best BUCKET_R keys,
        # ascending along the last axis. With BUCKET_R >= KP the union of the buckets holds the exact top KP; with
        # fewer, the overflow check after the loop flags the tiles where it may not.
        r_ax = tl.arange(0, BUCKET_R)
        lists = tl.full([BQ, NBK, BUCKET_R], _MIN_KEY, dtype=tl.int64)
    for j0 in range(j_begin, j_end, BN):
        jj = j0 + n
        kb = tl.load(kb_base + jj.to(tl.int64)[None, :] * s_kbn + d[:, None],
                     mask=(jj[None, :] < nbc) & (d[:, None] < D), other=0.0)
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
        key = tl.where(cand, key, _MIN_KEY)
        if NO_TOPK:  # profiling only: scoring cost without the top-k (result is wrong)
            buf = tl.maximum(buf, tl.reshape(tl.max(tl.reshape(key, [BQ, BN // KP, KP]), axis=1), [BQ, KP]))
        elif BUCKET_R > 0:
            # Branch-free: the chunk's two keys per bucket, descending, padded with _MIN_KEY, against the ascending
            # list: the element-wise max holds the list's new top BUCKET_R as a bitonic sequence; one merge.
            ka, kb2 = tl.split(tl.reshape(key, [BQ, NBK, 2]))
            k_hi = tl.maximum(ka, kb2)
            k_lo = tl.minimum(ka, kb2)
            new_desc = tl.where(r_ax[None, None, :] == 0, k_hi[:, :, None],
                                tl.where(r_ax[None, None, :] == 1, k_lo[:, :, None], _MIN_KEY))
            lists = tl.bitonic_merge(tl.maximum(lists, new_desc), dim=2)
        elif FILTER:
            # Threshold filter: only keys above the running KP-th best can enter. Few of them (after the first
            # chunks, ~KP·BN/j of the j-th candidate on random data): insert them one by one, best first, each
            # replacing the buffer's minimum (keys are distinct, so `buf == thr` marks exactly one slot). Many
            # of them (early chunks): the sort-based merge below.
            above = key > thr[:, None]
            n_new = tl.max(tl.sum(above.to(tl.int32), axis=1))
            if n_new > LIGHT:
                if BN == KP:
                    top = tl.sort(key, dim=1, descending=True)
                else:
                    top = tl.topk(key, KP, dim=1)
                if SORT_ONCE:  # the buffer is unordered only after one-by-one insertions
                    if unsorted != 0:
                        buf = tl.sort(buf, dim=1)
                    buf = tl.bitonic_merge(tl.maximum(buf, top), dim=1)
                    unsorted = tl.full([], 0, dtype=tl.int32)
                else:
                    buf = tl.bitonic_merge(tl.maximum(tl.sort(buf, dim=1), top), dim=1)
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
        else:
            hit = tl.max(tl.where(key > thr[:, None], 1, 0))
            if hit > 0:
                if BN == KP:
                    top = tl.sort(key, dim=1, descending=True)
                else:
                    top = tl.topk(key, KP, dim=1)
                # ascending buf vs descending top: the element-wise max holds the top KP of both, as a
                # bitonic sequence; one bitonic merge sorts it again.
                buf = tl.bitonic_merge(tl.maximum(buf, top), dim=1)
                thr = tl.min(buf, axis=1)

    # The best TOPK-1 keys sit in the last columns of buf; map block numbers to start positions, sort.
    if BUCKET_R > 0 and not NO_TOPK:
        buf = tl.sort(tl.topk(tl.reshape(lists, [BQ, NBK * BUCKET_R]), KP, dim=1), dim=1)
        # Exact unless a bucket dropped a key that belongs to the top KP: dropped keys lie below their bucket's
        # kept minimum, so that can only happen when a full bucket's minimum is above the KP-th best kept key.
        # Such tiles are flagged; the FIXUP launch recomputes them with the exact streaming top-k.
        b_min = tl.min(lists, axis=2)
        over = (b_min > _MIN_KEY) & (b_min > tl.min(buf, axis=1)[:, None]) & t_ok[:, None]
        tl.store(ovf_ptr, tl.max(tl.max(over.to(tl.int32), axis=1), axis=0))
    elif FILTER:
        buf = tl.sort(buf, dim=1)
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
    """Launch geometry of the selection kernel: (GP padded group, KP top-k buffer, BN key-block chunk, BQ queries
    per program). Shared with kernels/tools/aot_check.py so the AOT check compiles what runs."""
    gp = next_pow2(g)
    kp = max(16, next_pow2(max(top_k - 1, 1)))
    # 32-block chunks (was 64): 0.91x at 16x16 and 0.97x at 64x32 on an H200 at 32k (kernels/tools/tune_launch.py)
    bn = max(kp, 32)
    bq = max(1, 64 // gp)
    while bq > 1 and bq * gp * bn > 16384:  # keeps the [BQ·GP, BN] score tile in registers
        bq //= 2
    if bq * gp < 16:  # tl.dot needs at least 16 rows
        bq = 16 // gp
    return gp, kp, bn, bq


def select_options(kp: int, bn: int, bq: int) -> dict:
    """Kernel flags and launch options of the selection (shared with kernels/tools/aot_check.py).

    BUCKET_R 8 for KP 16 and 32 (top-k up to 33) and tiles of at most 16 tokens (G >= 4): the bucketed top-k
    (branch-free, one small bitonic merge per chunk) plus the exact recomputation of the rare overflowing tiles;
    its pass 1 (no top-k) reads 64-block chunks (BN1) through a 2-stage pipeline. Without it: FILTER
    (threshold-filtered top-k) only for KP = 16, where it beat the unfiltered merge (-17 % at 32k 16x16, +43 % at
    64x32); SORT_ONCE re-sorts the filtered buffer only after one-by-one insertions. REVERSE starts the tiles with
    the most candidates first. One pipeline stage: the chunk loop is bound by the top-k, not by loads. (H200;
    docs/kernels_notes.md, v2-v4.)
    """
    # G = 1 (64-token tiles) holds 8192 int64 list entries per tile and ran 4.3x slower than the streaming top-k.
    bucketed = kp in (16, 32) and bq <= 16
    return {"BUCKET_R": 8 if bucketed else 0, "FILTER": kp <= 16, "SORT_ONCE": True, "REVERSE": True,
            "BN1": max(bn, 64) if bucketed else bn, "P1_STAGES": 2 if bucketed else 1,
            "num_warps": 4, "num_stages": 1}


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
    _config: dict | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact top-k block selection per query token and KV head; same contract as the reference.

    Returns ``block_idx [b, HKV, sq, top_k]`` int32 (row-relative block starts, ascending, -1 padded) and
    ``counts [b, HKV, sq]`` int32.
    """
    hkv, g = check_qkv(q, k)
    sq, b, hq, d = q.shape
    skv = k.shape[0]
    if top_k < 1:
        raise ValueError(f"top_k={top_k}: must be at least 1 block")
    if sink_blocks + local_blocks + 1 > top_k:
        raise ValueError(f"sink_blocks + local_blocks + 1 = {sink_blocks + local_blocks + 1} exceeds top_k={top_k}")
    if score not in ("group_softmax", "dot"):
        raise ValueError(f"score={score!r}: must be 'group_softmax' or 'dot'")
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    device = q.device
    q = last_dim_contiguous(q)
    q_pos = q_positions_or_default(q_positions, sq, skv, device).long()
    doc_start = document_starts(cu_seqlens, b, skv, device)
    dtype = q.dtype
    kbar, cstarts = pooled_keys(k, block_size, doc_start, dtype)
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
    own = own.to(torch.int32).contiguous()
    lo = lo.contiguous()
    hi = hi.contiguous()

    block_idx = torch.empty(b, hkv, sq, top_k, dtype=torch.int32, device=device)
    counts = torch.empty(b, hkv, sq, dtype=torch.int32, device=device)
    if sq == 0:
        return block_idx, counts
    gp, kp, bn, bq = select_tiles(g, top_k)
    bd = max(16, next_pow2(d))
    extra = {**select_options(kp, bn, bq), **DEFAULT_CONFIG, **(_config or {})}
    bq = extra.pop("BQ", bq)
    bn = extra.pop("BN", bn)
    bn1 = extra.pop("BN1")
    num_warps = extra.pop("num_warps")
    grid = (triton.cdiv(sq, bq), b * hkv)
    launch = functools.partial(
        _select_kernel[grid],
        q, kbar, cstarts, lo, hi, own, block_idx, counts,
        sq, nbc,
        q.stride(0), q.stride(1), q.stride(2),
        kbar.stride(0), kbar.stride(1), kbar.stride(2),
        cstarts.stride(0), lo.stride(0),
        block_idx.stride(0), block_idx.stride(1), block_idx.stride(2),
        counts.stride(0), counts.stride(1),
        hkv, scale * math.log2(math.e), 1.0 / g,
        G=g, GP=gp, BQ=bq, D=d, BD=bd, KP=kp, BN=bn, BN1=bn1, TOPK=top_k, KO=next_pow2(top_k),
        SINK=sink_blocks, LOCAL=local_blocks, SCORE=0 if score == "group_softmax" else 1,
        num_warps=num_warps,
    )
    skip_fixup = extra.pop("NO_FIXUP", False)  # tests and benchmarks: the bucketed pass alone
    if extra.get("BUCKET_R", 0) > 0 and not extra.get("NO_TOPK"):
        # Bucketed top-k, then the exact streaming top-k for the (rare) tiles whose buckets overflowed. The flags
        # stay on the GPU: the second launch reads them, so nothing waits for the host.
        overflow = torch.empty(grid[1], grid[0], dtype=torch.int32, device=device)
        launch(OVF=overflow, **extra)
        if not skip_fixup:
            launch(OVF=overflow, **{**extra, "BUCKET_R": 0, "FIXUP": True})
    else:
        launch(OVF=counts, **extra)  # OVF is unused without BUCKET_R
    return block_idx, counts
