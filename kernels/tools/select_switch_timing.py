#!/usr/bin/env python3
"""Times ``select_blocks`` under each selection switch (``selection`` exact | authors_chunked, ``normaliser``
earlier_blocks | authors) on one GPU, random normal bf16 inputs, with ``triton.testing.do_bench`` (median ms).

    PYTHONPATH=$PWD/kernels python3 kernels/tools/select_switch_timing.py [--ts 8192,32768] [--shape 32/2/64]
"""

from __future__ import annotations

import argparse

import torch
import triton

import ssa_kernels as K

SWITCHES = [("exact", "earlier_blocks"), ("authors_chunked", "earlier_blocks"), ("exact", "authors"),
            ("authors_chunked", "authors")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ts", default="8192,32768", help="sequence lengths")
    ap.add_argument("--shape", default="32/2/64", help="HQ/HKV/D")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=16)
    args = ap.parse_args()
    hq, hkv, d = map(int, args.shape.split("/"))
    print(f"select_blocks, {hq}/{hkv} heads, head dim {d}, BS {args.block_size}, K {args.top_k}, bf16, "
          f"{torch.cuda.get_device_name()}")
    for t in map(int, args.ts.split(",")):
        torch.manual_seed(0)
        q = torch.randn(t, 1, hq, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(t, 1, hkv, d, device="cuda", dtype=torch.bfloat16)
        row = []
        for selection, normaliser in SWITCHES:
            ms = triton.testing.do_bench(lambda: K.select_blocks(q, k, args.block_size, args.top_k,
                                                                 selection=selection, normaliser=normaliser))
            row.append(f"{selection}/{normaliser} {ms:.3f}")
        print(f"T={t}: " + " | ".join(row) + " ms")


if __name__ == "__main__":
    main()
