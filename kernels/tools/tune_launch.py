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

import torch
import triton

import ssa_kernels as K
from ssa_kernels import select as SEL
from ssa_kernels import sparse as S


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def select_candidates(g: int, top_k: int) -> list[dict]:
    """Top-k variants (bucket size, or the streaming top-k with and without the threshold filter), pass-1 chunking
    and pipelining, and warps, as changes to ``select_config``."""
    _, kp, bn, _ = SEL.select_tiles(g, top_k)
    topk = [dict(BUCKET_R=r) for r in (8, 16) if kp <= 32] + [dict(BUCKET_R=0, FILTER=f) for f in (False, True)]
    return [dict(**v, BN1=bn1, P1_STAGES=st, num_warps=w)
            for v, bn1, st, w in itertools.product(topk, sorted({bn, max(bn, 64)}), (1, 2), (2, 4))]


def tune_shape(t: int, hq: int, hkv: int, d: int, bs: int, top_k: int, kernels: set[str]) -> list[dict]:
    torch.manual_seed(0)
    q = torch.randn(t, 1, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(t, 1, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(t, 1, hkv, d, device="cuda", dtype=torch.bfloat16)
    do = torch.randn_like(q)
    idx, _ = K.select_blocks(q, k, bs, top_k)
    idx = idx.to(torch.int32).contiguous()
    nslot = S._slot_bound(idx)
    qpos = torch.arange(t, device="cuda", dtype=torch.int32)
    scale = d ** -0.5
    kst, ken = S._grid_for_table(idx, t, bs, q.device, True)
    rptr, ridx = S.build_reverse_index(idx, t)

    g = hq // hkv

    # Each kernel runs with its production launch parameters updated by a candidate's (None: production's).
    def select(cand):  # end to end, as select_blocks: input preparation + launch
        sel = SEL.prepare_selection(q, k, bs, top_k)
        return SEL.launch_selection(sel, {**SEL.select_config(g, top_k), **cand})

    def fwd(cand):
        return S.sparse_forward(q, k, v, idx, nslot, qpos, bs, scale, {**S.fwd_config(g, bs, d), **cand})

    o, lse = fwd({})

    def dq(cand):
        return S.launch_dq(q, k, v, o, lse, do, None, idx, nslot, qpos, bs, scale, {**S.dq_config(g, bs, d), **cand})

    _, delta = dq({})

    def dkdv(cand):
        return S.launch_dkdv(q, k, v, do, lse, delta, qpos, kst, ken, rptr, ridx, bs, scale,
                             {**S.dkdv_config(g, bs, d), **cand})

    spaces = {
        "select": (select, select_candidates(g, top_k)),
        "fwd": (fwd, [dict(NBLK=nb // bs, num_warps=w, num_stages=st)
                      for nb, w, st in itertools.product((64, 128, 256), (4, 8), (2, 3)) if nb >= bs]),
        "dq": (dq, [dict(NBLK=nb // bs, num_warps=w, num_stages=st)
                    for nb, w, st in itertools.product((64, 128, 256), (4, 8), (2, 3)) if nb >= bs]),
        "dkdv": (dkdv, [dict(TQ=max(1, rows // triton.next_power_of_2(g)), num_warps=w, num_stages=st)
                        for rows, w, st in itertools.product((128, 256), (4, 8), (1, 2, 3))]),
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
