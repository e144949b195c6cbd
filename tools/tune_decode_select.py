#!/usr/bin/env python
"""Times the decode-time block selection kernels (``ssa_megatron/hf/decode_triton.py``) alone, for each launch
setting (``TOP_K_WARPS`` x ``BLOCK_N``), on one GPU: ``triton.testing.do_bench_cudagraph`` (the calls captured in a
CUDA graph, so no launch overhead; the median of its repeats) gives the time per selection. The 1B shape by default
(32 query heads, 2 KV heads, head dim 64, top_k 16 x block 16); ``--context`` sets the pooled blocks (context + 1
tokens rounded up to 128, as the static cache rounds, over the block size). Prints one line per setting and the
fastest per batch.

    python tools/tune_decode_select.py --batch 1 32 --context 32768
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--context", type=int, default=32768, help="cached tokens")
    p.add_argument("--heads", type=int, default=32, help="query heads")
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--warps", type=int, nargs="+", default=[1, 2, 4], help="TOP_K_WARPS values")
    p.add_argument("--block-n", type=int, nargs="+", default=[64, 128, 256], help="BLOCK_N values")
    p.add_argument("--rep", type=int, default=20, help="milliseconds of calls per CUDA graph")
    args = p.parse_args(argv)
    if args.heads % args.kv_heads:
        p.error(f"--heads {args.heads}: must be a multiple of --kv-heads {args.kv_heads}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_decode_select: needs a CUDA GPU (the kernels' launch settings are what it times)")
        return 1
    from triton.testing import do_bench_cudagraph

    from ssa_megatron.hf import decode_triton

    blocks = -(-(args.context + 1) // 128) * 128 // args.block_size  # room for the new token's block
    config = SimpleNamespace(ssa_block_size=args.block_size, ssa_top_k=args.top_k, ssa_sink_blocks=0,
                             ssa_local_blocks=0, ssa_score="group_softmax")
    settings = list(itertools.product(args.warps, args.block_n))
    print(f"tune_decode_select: {torch.cuda.get_device_name()}, batch {args.batch}, {blocks} pooled blocks "
          f"({args.context} tokens), {args.heads}/{args.kv_heads} heads, head dim {args.head_dim}, top_k "
          f"{args.top_k}; {len(settings)} settings", flush=True)
    defaults = decode_triton.TOP_K_WARPS, decode_triton.BLOCK_N
    try:
        for batch in args.batch:
            q = torch.randn(batch, args.heads, 1, args.head_dim, device="cuda").bfloat16()
            pooled = torch.randn(batch, args.kv_heads, blocks, args.head_dim, device="cuda").bfloat16()
            length = torch.tensor(args.context + 1, device="cuda")
            times = {}
            for warps, block_n in settings:
                decode_triton.TOP_K_WARPS, decode_triton.BLOCK_N = warps, block_n
                times[warps, block_n] = 1e3 * do_bench_cudagraph(
                    lambda: decode_triton.select_by_kernels(q, pooled, length, config, args.head_dim ** -0.5),
                    rep=args.rep, return_mode="median")
                print(f"  batch {batch:>3}  TOP_K_WARPS {warps}  BLOCK_N {block_n:>4}: "
                      f"{times[warps, block_n]:7.2f} us per selection", flush=True)
            best = min(times, key=times.get)
            print(f"batch {batch}: fastest TOP_K_WARPS {best[0]}, BLOCK_N {best[1]} ({times[best]:.2f} us); "
                  f"the defaults {defaults} take {times.get(defaults, float('nan')):.2f} us")
    finally:
        decode_triton.TOP_K_WARPS, decode_triton.BLOCK_N = defaults
    return 0


if __name__ == "__main__":
    sys.exit(main())
