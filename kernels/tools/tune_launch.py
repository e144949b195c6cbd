#!/usr/bin/env python3
"""Times launch settings of the selection and block-sparse kernels (forward, dQ, dK/dV) against the defaults.

One GPU, one run: for each shape the index table comes from ``select_blocks`` on random normal bf16 inputs, every
candidate's outputs are compared with the default's (the selection must be identical; attention outputs agree to
bf16 rounding), and each kernel is timed alone with ``triton.testing.do_bench`` (median). Prints one table per
kernel and shape, best first.

    PYTHONPATH=$PWD/kernels python3 kernels/tools/tune_launch.py [--ts 8192,32768] [--kernels select,fwd] [--json f]
"""

from __future__ import annotations

import argparse
import itertools
import json

import contextlib

import torch
import triton
import triton.language as tl

import ssa_kernels as K
from ssa_kernels import select as SEL
from ssa_kernels import sparse as S
from ssa_kernels.sparse import _batch_kv_head


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def select_candidates(g: int, top_k: int) -> list[dict]:
    """Top-k variants (bucket size, or the streaming top-k with and without the threshold filter), pass-1 chunking
    and pipelining, and warps, as changes to ``select_config``."""
    _, kp, bn, _ = SEL.select_tiles(g, top_k)
    topk = [dict(BUCKET_R=r) for r in (8, 16) if kp <= 32] + [dict(BUCKET_R=0, FILTER=f) for f in (False, True)]
    return [dict(**v, BN1=bn1, P1_STAGES=st, num_warps=w)
            for v, bn1, st, w in itertools.product(topk, sorted({bn, max(bn, 64)}), (1, 2), (2, 4))]


@triton.jit
def _dkdv_keys_major_kernel(
    Q, K, V, DO, STATS, QPOS, KST, KEN, RPTR, RIDX, DK, DV,
    skv, q_off,
    s_qs, s_qb, s_qh, s_ks, s_kb, s_kh, s_vs, s_vb, s_vh, s_dos, s_dob, s_doh,
    s_tb, s_ts, s_kst,
    s_dks, s_dkb, s_dkh,
    HKV, scale_log2, scale,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
    TQ: tl.constexpr, HAS_QPOS: tl.constexpr,
):
    """Candidate: production's dK/dV kernel (``sparse._sparse_dkdv_kernel``, same arguments and result) with the
    score tile keys-major, [BS, rows] as fla's NSA dK/dV kernel has it, instead of [rows, BS]. Compiled for sm_90
    at 256 rows it needs 102 KB of shared memory instead of 136 KB (2 programs per SM instead of 1) but uses
    mma.sync with M = BS instead of wgmma with M = rows; which wins is for the GPU to say."""
    blk = tl.program_id(0)
    pid_bh, h, b64, h64 = _batch_kv_head(HKV)
    kstart = tl.load(KST + b64 * s_kst + blk)
    kend = tl.load(KEN + b64 * s_kst + blk)
    if kstart < skv:
        kpos = kstart + tl.arange(0, BS)
        k_ok = kpos < kend
        kpos64 = kpos.to(tl.int64)
        d = tl.arange(0, BD)
        kmask = k_ok[:, None] & (d < D)[None, :]
        kt = tl.load(K + b64 * s_kb + h64 * s_kh + kpos64[:, None] * s_ks + d[None, :], mask=kmask, other=0.0)
        vt = tl.load(V + b64 * s_vb + h64 * s_vh + kpos64[:, None] * s_vs + d[None, :], mask=kmask, other=0.0)
        row = pid_bh.to(tl.int64) * skv + kstart
        e_begin = tl.load(RPTR + row)
        e_end = tl.load(RPTR + row + 1)
        m = tl.arange(0, TQ * GP)
        m_tq = m // GP
        m_g = m % GP
        head = (h * G + m_g).to(tl.int64)
        dk = tl.zeros([BS, BD], dtype=tl.float32)
        dv = tl.zeros([BS, BD], dtype=tl.float32)
        for e0 in range(e_begin, e_end, TQ):
            e = e0 + m_tq
            row_ok = (e < e_end) & (m_g < G)
            tok64 = tl.load(RIDX + e, mask=row_ok, other=0).to(tl.int64)
            if HAS_QPOS:
                qpos = tl.load(QPOS + tok64, mask=row_ok, other=-1)
            else:
                qpos = tok64 + q_off
            rmask = row_ok[:, None] & (d < D)[None, :]
            q = tl.load(Q + tok64[:, None] * s_qs + b64 * s_qb + head[:, None] * s_qh + d[None, :], mask=rmask,
                        other=0.0)
            do = tl.load(DO + tok64[:, None] * s_dos + b64 * s_dob + head[:, None] * s_doh + d[None, :],
                         mask=rmask, other=0.0)
            stats = STATS + b64 * s_tb + tok64 * s_ts + head * 2
            lse2 = tl.load(stats, mask=row_ok, other=0.0)
            delta = tl.load(stats + 1, mask=row_ok, other=0.0)
            s = tl.dot(kt, tl.trans(q)) * scale_log2  # [BS, rows]
            ok = row_ok[None, :] & k_ok[:, None] & (kpos[:, None] <= qpos[None, :])
            p = tl.where(ok, tl.exp2(s - lse2[None, :]), 0.0)
            dv += tl.dot(p.to(do.dtype), do)
            ds = p * (tl.dot(vt, tl.trans(do)) - delta[None, :])
            dk += tl.dot(ds.to(q.dtype), q)
        out_off = b64 * s_dkb + h64 * s_dkh + kpos64[:, None] * s_dks + d[None, :]
        tl.store(DK + out_off, (dk * scale).to(DK.dtype.element_ty), mask=kmask)
        tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kmask)


@contextlib.contextmanager
def dkdv_kernel(kernel):
    """``sparse.launch_dkdv`` launching ``kernel`` (same arguments) instead of production's, inside the block."""
    production = S._sparse_dkdv_kernel
    S._sparse_dkdv_kernel = kernel
    try:
        yield
    finally:
        S._sparse_dkdv_kernel = production


def gather_candidates(bs: int, top_k: int) -> list[dict]:
    """Keys per gathered step, warps and stages of the forward and dQ kernels. Steps of one or two blocks (at most
    the table's top_k blocks) run with 1-4 warps: the per-block loop of fla's NSA kernels, for small tables
    (16 x 16: 256 keys per token); tiles of 64+ keys keep 4-8 warps."""
    keys = sorted(k for k in {bs, 2 * bs, 64, 128} if bs <= k <= bs * top_k)
    return [dict(NBLK=nk // bs, num_warps=w, num_stages=st)
            for nk in keys for w in ((1, 2, 4) if nk <= 32 else (4, 8)) for st in (1, 2)]


def tune_shape(t: int, hq: int, hkv: int, d: int, bs: int, top_k: int, kernels: set[str]) -> list[dict]:
    torch.manual_seed(0)
    q = torch.randn(t, 1, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(t, 1, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(t, 1, hkv, d, device="cuda", dtype=torch.bfloat16)
    do = torch.randn_like(q)
    idx, _ = K.select_blocks(q, k, bs, top_k)
    idx = idx.to(torch.int32).contiguous()
    scale = d ** -0.5
    kst, ken = S._grid_for_table(idx, t, bs, q.device, True)
    rptr, ridx = S.build_reverse_index(idx, t)

    g = hq // hkv

    # Each kernel runs with its production launch parameters updated by a candidate's (None: production's).
    def select(cand):  # end to end, as select_blocks: input preparation + launch
        sel = SEL.prepare_selection(q, k, bs, top_k)
        return SEL.launch_selection(sel, {**SEL.select_config(g, top_k), **cand})

    def fwd(cand):
        return S.sparse_forward(q, k, v, idx, None, bs, scale, {**S.fwd_config(g, bs, d), **cand})

    o, lse = fwd({})

    def dq(cand):
        return S.launch_dq(q, k, v, o, lse, do, None, idx, None, bs, scale, {**S.dq_config(g, bs, d), **cand})

    _, stats = dq({})

    def dkdv(cand):
        cand = dict(cand)
        kernel = _dkdv_keys_major_kernel if cand.pop("keys_major", False) else S._sparse_dkdv_kernel
        with dkdv_kernel(kernel):
            return S.launch_dkdv(q, k, v, do, stats, None, kst, ken, rptr, ridx, bs, scale,
                                 {**S.dkdv_config(g, bs, d), **cand})

    spaces = {
        "select": (select, select_candidates(g, top_k)),
        "fwd": (fwd, gather_candidates(bs, top_k)),
        "dq": (dq, gather_candidates(bs, top_k)),
        "dkdv": (dkdv, [dict(TQ=max(1, rows // triton.next_power_of_2(g)), num_warps=w, num_stages=st, **major)
                        for rows, w, st, major in itertools.product((64, 128, 256), (4, 8), (1, 2),
                                                                    ({}, {"keys_major": True}))]),
    }
    shape = f"T={t} {hq}/{hkv}/{d} {bs}x{top_k}"
    table = []
    for kernel, (run, candidates) in spaces.items():
        if kernel not in kernels:
            continue
        if kernel == "select":
            def err_of(out, ref):  # fraction of index-table entries that differ (near-ties may flip)
                return (out[0] != ref[0]).float().mean().item()
        else:
            def err_of(out, ref):  # relative error of every output
                return max(_rel(a, b) for a, b in zip(out, ref))
        ref = run({})
        base = triton.testing.do_bench(lambda: run({}), return_mode="median")
        results = [{"kernel": kernel, "shape": shape, "config": "default", "ms": base, "err": 0.0}]
        for cand in candidates:
            try:
                err = err_of(run(cand), ref)
                ms = triton.testing.do_bench(lambda: run(cand), return_mode="median")
            except Exception as exc:  # e.g. out of shared memory: report, go on
                results.append({"kernel": kernel, "shape": shape, "config": cand,
                                "error": str(exc).splitlines()[0][:100]})
                continue
            results.append({"kernel": kernel, "shape": shape, "config": cand, "ms": ms, "err": err})
        print(f"\n{kernel} at {shape} (default {base:.3f} ms; err = "
              f"{'fraction of differing entries' if kernel == 'select' else 'relative error'} vs default)")
        for r in sorted(results, key=lambda r: r.get("ms", 1e9))[:8]:
            ms = f"{r['ms']:.3f} ms ({r['ms'] / base:.2f}x)" if "ms" in r else r["error"]
            print(f"  {str(r['config']):55s} {ms}  err {r.get('err', float('nan')):.1e}")
        table += results
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ts", default="8192,32768")
    p.add_argument("--shapes", default="32/2/64")
    p.add_argument("--blocks", default="16x16,64x32")
    p.add_argument("--kernels", default="select,fwd,dq,dkdv")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    print(f"tune_launch on {torch.cuda.get_device_name()}")
    table = []
    for t in map(int, a.ts.split(",")):
        for shape in a.shapes.split(","):
            hq, hkv, d = map(int, shape.split("/"))
            for blk in a.blocks.split(","):
                bs, kk = map(int, blk.split("x"))
                table += tune_shape(t, hq, hkv, d, bs, kk, set(a.kernels.split(",")))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "rows": table}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
