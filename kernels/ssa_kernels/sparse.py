"""Block-sparse attention from the index table: forward, dQ and dK/dV kernels (deterministic, no atomics).

Forward and dQ: one program per (query token, batch row · KV head); the G query heads of the group are the M
rows of the matmuls (padded to 16), and ``NBLK`` selected blocks are gathered into one KV tile of 64 keys
(16-token blocks → 4 per tile). Every selected block start ``s`` contributes keys ``s .. s+BS-1`` that are
``<= the query's position`` (the own block is thereby causal).

dK/dV: one program per (key block of the grid, batch row · KV head). A reverse index (CSR, built with a stable
sort so the order is fixed) lists the query tokens that selected the block; the program gathers ``TQ`` of them
× G heads as the M rows (64 rows), accumulates dK/dV in fp32 registers and stores once. It reads each row's LSE
and delta from a token-major buffer the dQ kernel writes (one cache line per token, not one per head).

Host work per call is kept to what the GPU needs: the kernels read each row's used-slot count from the table and
compute default query positions themselves, so the forward launches one kernel and nothing else.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import block_grid, check_qkv, last_dim_contiguous, next_pow2, q_positions_or_default

_LOG2E = 1.4426950408889634


@triton.jit
def _batch_kv_head(HKV):
    """Grid axis 1 of every sparse kernel is (batch row · KV head): returns it, the KV head, and both as int64."""
    pid_bh = tl.program_id(1)
    h = pid_bh % HKV
    return pid_bh, h, (pid_bh // HKV).to(tl.int64), h.to(tl.int64)


@triton.jit
def _token_program(IDX, QPOS, s_ib, s_ih, s_is, KK, q_off, HKV, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                   BD: tl.constexpr, KP: tl.constexpr, HAS_QPOS: tl.constexpr):
    """Forward and dQ prologue: the program's query token ``t``, batch row and KV head (all int64), the token's
    position, its index-table row and used slot count, and its ``GP`` query-head rows: head indices, which of them
    are real (``g_ok``), feature offsets ``d`` and which of them are real (``d_ok``)."""
    t = tl.program_id(0)
    _, h, b64, h64 = _batch_kv_head(HKV)
    t64 = t.to(tl.int64)
    if HAS_QPOS:
        pos = tl.load(QPOS + t)
    else:  # the last sq positions of the row: no position tensor to build or read
        pos = t + q_off
    idx_row = IDX + b64 * s_ib + h64 * s_ih + t64 * s_is
    nslot = _used_slots(idx_row, KK, KP)
    g = tl.arange(0, GP)
    d = tl.arange(0, BD)
    head = (h * G + g).to(tl.int64)
    return t64, b64, h64, pos, idx_row, nslot, head, g < G, d, d < D


@triton.jit
def _used_slots(idx_row, KK, KP: tl.constexpr):
    """One past the last used (>= 0) slot of the ``KK`` slots at ``idx_row`` (contiguous; ``KP`` = KK rounded up
    to a power of two). Read here rather than computed by torch ops before the launch: one row load per program
    instead of five launches per call."""
    j = tl.arange(0, KP)
    start = tl.load(idx_row + j, mask=j < KK, other=-1)
    return tl.max(tl.where(start >= 0, j + 1, 0), axis=0)


@triton.jit
def _selected_keys(idx_row, i, nslot, pos, skv, n_slot, n_off):
    """Gather step ``i``: the key positions (int64) of selection slots ``i + n_slot`` (``BS`` keys each, at
    offsets ``n_off``) and which of them the query attends (a used slot, causal, inside the sequence)."""
    slot = i + n_slot
    start = tl.load(idx_row + slot, mask=slot < nslot, other=-1)
    kpos = start + n_off
    k_ok = (start >= 0) & (kpos <= pos) & (kpos < skv)
    return kpos.to(tl.int64), k_ok


@triton.jit
def _load_rows(base, rows64, stride, d, mask):
    """The ``[len(rows64), BD]`` tile of rows ``rows64`` (row stride ``stride``, contiguous features ``d``)."""
    return tl.load(base + rows64[:, None] * stride + d[None, :], mask=mask, other=0.0)


@triton.jit
def _sparse_fwd_kernel(
    Q, K, V, IDX, QPOS, O, LSE,
    skv, q_off, KK,
    s_qs, s_qb, s_qh, s_ks, s_kb, s_kh, s_vs, s_vb, s_vh, s_os, s_ob, s_oh,
    s_ib, s_ih, s_is, s_lb, s_lh,
    HKV, scale_log2,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
    NBLK: tl.constexpr, KP: tl.constexpr, HAS_QPOS: tl.constexpr,
):
    t64, b64, h64, pos, idx_row, nslot, head, g_ok, d, d_ok = _token_program(
        IDX, QPOS, s_ib, s_ih, s_is, KK, q_off, HKV, G, GP, D, BD, KP, HAS_QPOS)
    rmask = g_ok[:, None] & d_ok[None, :]
    q = _load_rows(Q + t64 * s_qs + b64 * s_qb, head, s_qh, d, rmask)

    n = tl.arange(0, NBLK * BS)  # NBLK selected blocks per step, gathered into one key tile
    n_slot = n // BS
    n_off = n % BS
    k_base = K + b64 * s_kb + h64 * s_kh
    v_base = V + b64 * s_vb + h64 * s_vh
    m_i = tl.full([GP], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, BD], dtype=tl.float32)
    for i in range(0, nslot, NBLK):
        kpos64, k_ok = _selected_keys(idx_row, i, nslot, pos, skv, n_slot, n_off)
        kmask = k_ok[:, None] & d_ok[None, :]
        kt = _load_rows(k_base, kpos64, s_ks, d, kmask)
        s = tl.dot(q, tl.trans(kt)) * scale_log2
        s = tl.where(k_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = _load_rows(v_base, kpos64, s_vs, d, kmask)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(O + t64 * s_os + b64 * s_ob + head[:, None] * s_oh + d[None, :], out.to(O.dtype.element_ty),
             mask=rmask)
    lse = tl.where(l_i > 0, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(LSE + b64 * s_lb + head * s_lh + t64, lse, mask=g_ok)


@triton.jit
def _sparse_dq_kernel(
    Q, K, V, IDX, QPOS, O, DO, LSE, DLSE, DQ, STATS,
    skv, q_off, KK,
    s_qs, s_qb, s_qh, s_ks, s_kb, s_kh, s_vs, s_vb, s_vh, s_os, s_ob, s_oh, s_dos, s_dob, s_doh,
    s_ib, s_ih, s_is, s_lb, s_lh, s_tb, s_ts, s_dqs, s_dqb, s_dqh,
    HKV, scale_log2, scale,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
    NBLK: tl.constexpr, KP: tl.constexpr, HAS_QPOS: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    t64, b64, h64, pos, idx_row, nslot, head, g_ok, d, d_ok = _token_program(
        IDX, QPOS, s_ib, s_ih, s_is, KK, q_off, HKV, G, GP, D, BD, KP, HAS_QPOS)
    rmask = g_ok[:, None] & d_ok[None, :]
    q = _load_rows(Q + t64 * s_qs + b64 * s_qb, head, s_qh, d, rmask)
    do = _load_rows(DO + t64 * s_dos + b64 * s_dob, head, s_doh, d, rmask)
    o = _load_rows(O + t64 * s_os + b64 * s_ob, head, s_oh, d, rmask)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    if HAS_DLSE:
        delta = delta - tl.load(DLSE + b64 * s_lb + head * s_lh + t64, mask=g_ok, other=0.0)
    lse = tl.load(LSE + b64 * s_lb + head * s_lh + t64, mask=g_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    # the dK/dV kernel's per-row inputs, token-major ([b, sq, HQ, 2]: lse2, delta)
    stats = STATS + b64 * s_tb + t64 * s_ts + head * 2
    tl.store(stats, lse2, mask=g_ok)
    tl.store(stats + 1, delta, mask=g_ok)

    n = tl.arange(0, NBLK * BS)
    n_slot = n // BS
    n_off = n % BS
    k_base = K + b64 * s_kb + h64 * s_kh
    v_base = V + b64 * s_vb + h64 * s_vh
    dq = tl.zeros([GP, BD], dtype=tl.float32)
    for i in range(0, nslot, NBLK):
        kpos64, k_ok = _selected_keys(idx_row, i, nslot, pos, skv, n_slot, n_off)
        kmask = k_ok[:, None] & d_ok[None, :]
        kt = _load_rows(k_base, kpos64, s_ks, d, kmask)
        vt = _load_rows(v_base, kpos64, s_vs, d, kmask)
        s = tl.dot(q, tl.trans(kt)) * scale_log2
        p = tl.where(k_ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(vt))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), kt)
    dq = dq * scale
    tl.store(DQ + t64 * s_dqs + b64 * s_dqb + head[:, None] * s_dqh + d[None, :], dq.to(DQ.dtype.element_ty),
             mask=rmask)


@triton.jit
def _sparse_dkdv_kernel(
    Q, K, V, DO, STATS, QPOS, KST, KEN, RPTR, RIDX, DK, DV,
    skv, q_off,
    s_qs, s_qb, s_qh, s_ks, s_kb, s_kh, s_vs, s_vb, s_vh, s_dos, s_dob, s_doh,
    s_tb, s_ts, s_kst,
    s_dks, s_dkb, s_dkh,
    HKV, scale_log2, scale,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
    TQ: tl.constexpr, HAS_QPOS: tl.constexpr,
):
    blk = tl.program_id(0)
    pid_bh, h, b64, h64 = _batch_kv_head(HKV)
    kstart = tl.load(KST + b64 * s_kst + blk)
    kend = tl.load(KEN + b64 * s_kst + blk)
    if kstart < skv:
        r = tl.arange(0, BS)
        kpos = kstart + r
        k_ok = kpos < kend
        kpos64 = kpos.to(tl.int64)
        d = tl.arange(0, BD)
        d_ok = d < D
        kmask = k_ok[:, None] & d_ok[None, :]
        kt = tl.load(K + b64 * s_kb + h64 * s_kh + kpos64[:, None] * s_ks + d[None, :], mask=kmask, other=0.0)
        vt = tl.load(V + b64 * s_vb + h64 * s_vh + kpos64[:, None] * s_vs + d[None, :], mask=kmask, other=0.0)

        # CSR row of this (b, h, block start)
        row = pid_bh.to(tl.int64) * skv + kstart
        e_begin = tl.load(RPTR + row)
        e_end = tl.load(RPTR + row + 1)

        M: tl.constexpr = TQ * GP
        m = tl.arange(0, M)
        m_tq = m // GP
        m_g = m % GP
        head = (h * G + m_g).to(tl.int64)
        dk = tl.zeros([BS, BD], dtype=tl.float32)
        dv = tl.zeros([BS, BD], dtype=tl.float32)
        for e0 in range(e_begin, e_end, TQ):
            e = e0 + m_tq
            row_ok = (e < e_end) & (m_g < G)
            tok = tl.load(RIDX + e, mask=row_ok, other=0)
            tok64 = tok.to(tl.int64)
            if HAS_QPOS:
                qpos = tl.load(QPOS + tok, mask=row_ok, other=-1)
            else:
                qpos = tok + q_off
            rmask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(Q + tok64[:, None] * s_qs + b64 * s_qb + head[:, None] * s_qh + d[None, :],
                        mask=rmask, other=0.0)
            do = tl.load(DO + tok64[:, None] * s_dos + b64 * s_dob + head[:, None] * s_doh + d[None, :],
                         mask=rmask, other=0.0)
            stats = STATS + b64 * s_tb + tok64 * s_ts + head * 2  # a token's G heads share one cache line
            lse2 = tl.load(stats, mask=row_ok, other=0.0)
            delta = tl.load(stats + 1, mask=row_ok, other=0.0)
            s = tl.dot(q, tl.trans(kt)) * scale_log2  # [M, BS]
            ok = row_ok[:, None] & k_ok[None, :] & (kpos[None, :] <= qpos[:, None])
            p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            dp = tl.dot(do, tl.trans(vt))
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        dk = dk * scale
        out_off = b64 * s_dkb + h64 * s_dkh + kpos64[:, None] * s_dks + d[None, :]
        tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=kmask)
        tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kmask)


_INDEX_ROWS: dict = {}


def _index_rows(b: int, hkv: int, skv: int, device) -> tuple[Tensor, Tensor]:
    """The reverse index's per-(b, h) key offsets ``[b, HKV, 1, 1]`` and its row numbers ``0 .. b·HKV·skv``, in the
    key dtype (int32 while the keys fit). The same for every layer of a step, so they are made once, not per call
    (two launches fewer per backward)."""
    key = (b, hkv, skv, str(device))
    if key not in _INDEX_ROWS:
        nrows = b * hkv * skv
        dtype = torch.int32 if nrows < 2 ** 31 - 1 else torch.int64
        off = (torch.arange(b * hkv, device=device, dtype=dtype) * skv).view(b, hkv, 1, 1)
        _INDEX_ROWS.clear()
        _INDEX_ROWS[key] = (off, torch.arange(nrows + 1, device=device, dtype=dtype))
    return _INDEX_ROWS[key]


def build_reverse_index(block_idx: Tensor, skv: int) -> tuple[Tensor, Tensor]:
    """CSR of the index table by key block: for (b, h, start), the query rows that selected it, ascending.

    Returns ``(rptr [b·HKV·skv + 1] int64, ridx [b·HKV·sq·K] int64)``; entries of (b, h, start p) are
    ``ridx[rptr[(b·HKV + h)·skv + p] : rptr[... + 1]]``. Deterministic (stable sort, integer counts).
    """
    b, hkv, sq, kk = block_idx.shape
    off, rows = _index_rows(b, hkv, skv, block_idx.device)
    key = torch.where(block_idx >= 0, block_idx.to(off.dtype) + off, rows.shape[0] - 1).reshape(-1)
    sorted_key, order = torch.sort(key, stable=True)
    ridx = order.div_(kk, rounding_mode="floor").remainder_(sq)  # flat table index -> query row, in place
    # rptr[r] = entries with key < r. searchsorted on the sorted keys, not bincount: bincount sizes its output
    # from the data and so waits for the GPU.
    rptr = torch.searchsorted(sorted_key, rows)
    return rptr, ridx


def _gather_config(g: int, bs: int, d: int, keys: int) -> dict:
    gp = max(16, next_pow2(g))  # tl.dot needs at least 16 rows
    # Two pipeline stages, not Triton's default three: each gathered K/V tile is consumed once, so a third buffer
    # only costs shared memory and occupancy.
    return dict(GP=gp, NBLK=max(1, keys // bs), BD=max(16, next_pow2(d)), num_warps=4 if gp * d <= 64 * 64 else 8,
                num_stages=2)


def fwd_config(g: int, bs: int, d: int) -> dict:
    """Launch parameters of the forward kernel: 128 keys per gathered tile at D <= 64 (more loads in flight per
    step; measurements in docs/kernels_notes.md, "Launch tuning history"), 64 at larger D. Blocks of 16 keys (the
    paper's 16 x 16): two blocks per step in one warp, 0.66x the 128-key tile's time at 32/2/64 and 0.71x at
    32/8/128 on an H200 (kernels/tools/tune_launch.py, docs/benchmarks.md "Session 6")."""
    if bs <= 16 and d <= 128:
        return {**_gather_config(g, bs, d, 2 * bs), "num_warps": 1, "num_stages": 2}
    return _gather_config(g, bs, d, 128 if d <= 64 else 64)


def dq_config(g: int, bs: int, d: int) -> dict:
    """Launch parameters of the dQ kernel: 128 keys per gathered tile for blocks of 64+ keys at D <= 64, else 64
    (the fastest settings kernels/tools/tune_launch.py measured; docs/kernels_notes.md, "Launch tuning history").
    Blocks of 16 keys: one block per step in one warp (0.82x at 32/2/64, 0.79x at 32/8/128, measured as for the
    forward)."""
    if bs <= 16 and d <= 128:
        return {**_gather_config(g, bs, d, bs), "num_warps": 1, "num_stages": 2}
    return _gather_config(g, bs, d, 128 if d <= 64 and bs >= 64 else 64)


DKDV_ROWS = {16: 256, 32: 256, 64: 256, 128: 64}
"""Query rows (tokens × heads) per dK/dV step, by head dim: more rows, fewer trips over long reverse-index
lists."""


def dkdv_config(g: int, bs: int, d: int) -> dict:
    """Launch parameters of the dK/dV kernel."""
    gp = next_pow2(g)
    # rows x BS score tiles above 256 x 64 run out of shared memory (BS 128 with 256 rows failed on an H200)
    rows = min(DKDV_ROWS.get(next_pow2(d), 64), max(64, 16384 // bs))
    if bs <= 16 and next_pow2(d) == 128:
        rows = 128  # 7B shape (32/8/128, G 4 per GPU), 16-key blocks: 0.44x the 64-row setting's time on an H200
    tq = max(1, rows // gp)
    # Blocks of at most 32 keys: 4 warps and 2 stages measured faster (D 64 and, at 16 keys, D 128); larger blocks
    # keep 8 warps.
    small = bs <= 32 and (d <= 64 or bs <= 16)
    # A third stage at 256 rows x 64 keys needs 244 KB of shared memory with the token-major statistics tile,
    # above the 227 KB an H100/H200 block may use (kernels/tools/aot_check.py checks every launched config).
    stages = 2 if small or rows * bs * d > 128 * 64 * 64 else 3
    return dict(GP=gp, TQ=tq, BD=max(16, next_pow2(d)),
                num_warps=4 if small or tq * gp * d <= 64 * 64 else 8, num_stages=stages)


def _positions(q_pos: Tensor | None, block_idx: Tensor, sq: int, skv: int) -> tuple[Tensor, int, bool]:
    """The kernels' query-position arguments (pointer, offset, HAS_QPOS). Without ``q_pos`` the queries are the
    last ``sq`` keys and the kernels compute ``t + skv - sq`` (the pointer is then a placeholder, never read)."""
    return (block_idx, skv - sq, False) if q_pos is None else (q_pos, 0, True)


def _table_args(block_idx: Tensor) -> dict:
    """The index table's width as the kernels take it (runtime ``KK`` and its power of two ``KP``, a constexpr)."""
    kk = block_idx.shape[-1]
    return dict(KK=kk, KP=next_pow2(kk))


def sparse_forward(q, k, v, block_idx, q_pos, block_size, scale, config: dict) -> tuple[Tensor, Tensor]:
    """Forward kernel with launch parameters ``config`` (``fwd_config``'s keys). ``block_idx`` int32, contiguous;
    ``q_pos`` int32 ``[sq]`` or None (the last sq keys). Returns (out ``[sq, b, HQ, D]``, lse ``[b, HQ, sq]``)."""
    sq, b, hq, d = q.shape
    skv, _, hkv, _ = k.shape
    o = torch.empty(sq, b, hq, d, device=q.device, dtype=q.dtype)
    lse = torch.empty(b, hq, sq, device=q.device, dtype=torch.float32)
    if sq == 0:
        return o, lse
    qp, q_off, has_qpos = _positions(q_pos, block_idx, sq, skv)
    table = _table_args(block_idx)
    _sparse_fwd_kernel[(sq, b * hkv)](
        q, k, v, block_idx, qp, o, lse,
        skv, q_off, table["KK"],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        block_idx.stride(0), block_idx.stride(1), block_idx.stride(2), lse.stride(0), lse.stride(1),
        hkv, scale * _LOG2E,
        G=hq // hkv, D=d, BS=block_size, KP=table["KP"], HAS_QPOS=has_qpos, **config,
    )
    return o, lse


def launch_dq(q, k, v, o, lse, do, dlse, block_idx, q_pos, block_size, scale, config: dict
              ) -> tuple[Tensor, Tensor]:
    """dQ kernel with launch parameters ``config`` (``dq_config``'s keys). Returns (dq, stats): ``stats
    [b, sq, HQ, 2]`` float32 holds, per query row, the LSE in log2 units (+inf for a row with no keys) and
    delta = rowsum(O·dO) − dLSE, token-major, for the dK/dV kernel."""
    sq, b, hq, d = q.shape
    skv, _, hkv, _ = k.shape
    dq = torch.empty(sq, b, hq, d, device=q.device, dtype=q.dtype)
    stats = torch.empty(b, sq, hq, 2, device=q.device, dtype=torch.float32)
    if sq == 0:
        return dq, stats
    has_dlse = dlse is not None
    dl = dlse.contiguous() if has_dlse else lse
    qp, q_off, has_qpos = _positions(q_pos, block_idx, sq, skv)
    table = _table_args(block_idx)
    _sparse_dq_kernel[(sq, b * hkv)](
        q, k, v, block_idx, qp, o, do, lse, dl, dq, stats,
        skv, q_off, table["KK"],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        block_idx.stride(0), block_idx.stride(1), block_idx.stride(2), lse.stride(0), lse.stride(1),
        stats.stride(0), stats.stride(1), dq.stride(0), dq.stride(1), dq.stride(2),
        hkv, scale * _LOG2E, scale,
        G=hq // hkv, D=d, BS=block_size, KP=table["KP"], HAS_QPOS=has_qpos, HAS_DLSE=has_dlse, **config,
    )
    return dq, stats


def launch_dkdv(q, k, v, do, stats, q_pos, kst, ken, rptr, ridx, block_size, scale, config: dict
                ) -> tuple[Tensor, Tensor]:
    """dK/dV kernel over the key ranges ``kst``/``ken`` with launch parameters ``config`` (``dkdv_config``'s
    keys); ``stats`` is ``launch_dq``'s. Returns (dk, dv)."""
    sq, b, hq, d = q.shape
    skv, _, hkv, _ = k.shape
    dk = torch.empty(skv, b, hkv, d, device=q.device, dtype=k.dtype)
    dv = torch.empty(skv, b, hkv, d, device=q.device, dtype=v.dtype)
    qp, q_off, has_qpos = _positions(q_pos, kst, sq, skv)
    _sparse_dkdv_kernel[(kst.shape[1], b * hkv)](
        q, k, v, do, stats, qp, kst, ken, rptr, ridx, dk, dv,
        skv, q_off,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        stats.stride(0), stats.stride(1), kst.stride(0),
        dk.stride(0), dk.stride(1), dk.stride(2),
        hkv, scale * _LOG2E, scale,
        G=hq // hkv, D=d, BS=block_size, HAS_QPOS=has_qpos, **config,
    )
    return dk, dv


def sparse_backward(q, k, v, o, lse, do, dlse, block_idx, q_pos, block_size, scale, starts_on_grid=None):
    g, d = q.shape[2] // k.shape[2], q.shape[3]
    do = last_dim_contiguous(do)
    dq, stats = launch_dq(q, k, v, o, lse, do, dlse, block_idx, q_pos, block_size, scale,
                          dq_config(g, block_size, d))
    # dK/dV over the key-block grid. Any start used in the table is a grid start (own block or a complete
    # block), so the grid of the whole row covers every key exactly once.
    kst, ken = _grid_for_table(block_idx, k.shape[0], block_size, q.device, starts_on_grid)
    rptr, ridx = build_reverse_index(block_idx, k.shape[0])
    dk, dv = launch_dkdv(q, k, v, do, stats, q_pos, kst, ken, rptr, ridx, block_size, scale,
                         dkdv_config(g, block_size, d))
    return dq, dk, dv


_GRID_CACHE: dict = {}


def _grid_for_table(block_idx: Tensor, skv: int, block_size: int, device, starts_on_grid: bool | None = None
                    ) -> tuple[Tensor, Tensor]:
    """Key ranges for the dK/dV programs: every key of the row exactly once, split at every block start
    that appears in the table (so each program's range is one selectable block) and every BS keys.

    ``starts_on_grid``: True, the caller knows every start is a multiple of BS (no documents): the regular grid;
    False, the caller knows they may not be (documents): the general grid, also right for on-grid starts; None,
    unknown: checked here, which waits for the GPU."""
    b = block_idx.shape[0]
    # Fast path: all starts on the global grid (no documents) -> the regular grid.
    if starts_on_grid is None:
        starts_on_grid = bool(((block_idx % block_size) == 0).logical_or_(block_idx < 0).all())
    if starts_on_grid:
        key = (b, skv, block_size, str(device))
        if key not in _GRID_CACHE:
            st, en, _ = block_grid(None, b, skv, block_size, device)
            _GRID_CACHE.clear()
            _GRID_CACHE[key] = (st.contiguous(), en.contiguous())
        return _GRID_CACHE[key]
    # General: boundaries = table starts (per row) ∪ {0}; a program per boundary, range up to the next one
    # or BS keys, whichever comes first; gaps longer than BS get extra programs at multiples of BS.
    is_b = torch.zeros(b, skv + 1, dtype=torch.bool, device=device)
    # empty slots (-1) mark column skv, which is dropped below (no boolean indexing: it would wait for the GPU)
    marks = torch.where(block_idx >= 0, block_idx, skv).long().reshape(b, -1)
    is_b.scatter_(1, marks, torch.ones_like(marks, dtype=torch.bool))
    is_b[:, 0] = True
    pos = torch.arange(skv + 1, device=device).expand(b, skv + 1)
    last_b = torch.cummax(torch.where(is_b, pos, torch.zeros_like(pos)), dim=1).values
    is_start = (is_b | ((pos - last_b) % block_size == 0))[:, :skv]
    cnt = is_start.sum(1)
    # n = skv programs per row (a bound: every range holds at least one key), not cnt.max(), which would make
    # every layer's backward wait for the GPU; the extra programs find an empty range and return.
    n = skv
    order = torch.sort((~is_start).to(torch.int8), dim=1, stable=True).indices[:, :n]
    valid = torch.arange(n, device=device)[None, :] < cnt[:, None]
    st = torch.where(valid, order, torch.full_like(order, skv))
    nxt = torch.cat([st[:, 1:], torch.full_like(st[:, :1], skv)], dim=1)
    en = torch.where(valid, torch.minimum(nxt, st + block_size), torch.full_like(st, skv))
    return st.to(torch.int32).contiguous(), en.to(torch.int32).contiguous()


class SparseAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_idx, q_pos, block_size, scale, starts_on_grid):
        o, lse = sparse_forward(q, k, v, block_idx, q_pos, block_size, scale,
                                fwd_config(q.shape[2] // k.shape[2], block_size, q.shape[3]))
        ctx.save_for_backward(q, k, v, o, lse, block_idx, q_pos)
        ctx.block_size = block_size
        ctx.scale = scale
        ctx.starts_on_grid = starts_on_grid
        # An unused output's gradient arrives as None, not as a zero tensor autograd would fill: callers that
        # drop the LSE (most) cost no fill and no dLSE reads in the dQ kernel.
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, block_idx, q_pos = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        dq, dk, dv = sparse_backward(q, k, v, o, lse, do, dlse, block_idx, q_pos, ctx.block_size, ctx.scale,
                                     ctx.starts_on_grid)
        return dq, dk, dv, None, None, None, None, None


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, block_idx: Tensor, block_size: int,
                     q_positions: Tensor | None = None, softmax_scale: float | None = None,
                     starts_on_grid: bool | None = None) -> tuple[Tensor, Tensor]:
    """Attention over the selected blocks only (own block causal); same contract as the reference.

    ``starts_on_grid``: True promises every block start is a multiple of ``block_size`` (no documents), False
    that they may not be (documents); either way the backward skips a check of the table that waits for the GPU
    (None: checked).

    Returns ``(out [sq, b, HQ, D], lse [b, HQ, sq] float32)``; differentiable in q, k, v (and through lse).
    The index table must hold distinct block starts per row (as ``select_blocks`` returns).
    """
    hkv, g = check_qkv(q, k, v)
    sq, b, hq, d = q.shape
    skv = k.shape[0]
    if block_idx.shape[:3] != (b, hkv, sq):
        raise ValueError(f"block_idx must have shape [b, HKV, sq, K] = [{b}, {hkv}, {sq}, K], "
                         f"got {tuple(block_idx.shape)}")
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    block_idx = block_idx.to(torch.int32).contiguous()
    # None: the kernels compute the default positions (the last sq keys) themselves
    q_pos = None if q_positions is None else q_positions_or_default(q_positions, sq, skv, q.device)
    return SparseAttentionFn.apply(q, k, v, block_idx, q_pos, block_size, scale, starts_on_grid)
