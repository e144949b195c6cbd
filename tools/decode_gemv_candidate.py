#!/usr/bin/env python
"""A candidate Triton kernel for the weight GEMMs of a decode step (a few rows against a large weight), not used by
the package: it times the kernel against ``torch.nn.functional.linear`` (cuBLAS) on the 1B shape's weights, to
decide whether decoding should use it.

Why: at batch 1 the weight GEMMs take about 0.88 ms of a 1.36 ms step against the weights' 0.505 ms bound, and the
q|k|v|g and o GEMMs (8.4-9.6 MB each) reach about 1.5 TB/s on an H200 (docs/benchmarks.md, session 8). A GEMM of a
few rows is a pass over the weight; what matters is how many bytes are in flight, so the kernel splits the output
columns into many narrow tiles (``BLOCK_N``) and pipelines its loads along K (``STAGES``). Expected: about 3 TB/s
on the 8-10 MB weights (3-3.5 us instead of 5.8), 70-80 us per batch-1 step.

The kernel (:func:`linear`): ``y [M, N] = x [M, K] @ w [N, K]^T``, ``w`` in ``nn.Linear``'s layout, ``M`` at most 32
(padded to 16 rows for ``tl.dot``), float32 sums, one program per ``BLOCK_N`` output columns.

    python tools/decode_gemv_candidate.py                          # GPU: every 1B weight, 1 and 32 rows
    TRITON_INTERPRET=1 python tools/decode_gemv_candidate.py --shape tiny --device cpu   # CPU check
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

SHAPES = {  # weight (N, K) of one 1B decoder layer and the LM head, fused as from_pretrained loads them
    "1b": {"q|k|v|g": (2336, 2048), "o": (2048, 2048), "gate|up": (16384, 2048), "down": (2048, 8192),
           "lm_head": (128256, 2048)},
    "tiny": {"q|k|v|g": (72, 64), "down": (64, 128)},
}
CONFIGS = [dict(BLOCK_N=n, BLOCK_K=k, STAGES=s) for n, k, s in itertools.product((16, 32, 64), (128, 256), (3, 4))]
"""Launch settings tried per weight (``--configs all``); the first is :func:`linear`'s default."""


def linear(x: Tensor, w: Tensor, BLOCK_N: int = 16, BLOCK_K: int = 128, STAGES: int = 3) -> Tensor:
    """``x [M, K] @ w [N, K]^T`` in ``x``'s dtype with float32 sums, ``M <= 32``."""
    m, k = x.shape
    n = w.shape[0]
    if m > 32:
        raise ValueError(f"linear: x has {m} rows; this kernel is for at most 32")
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    _linear_kernel[(triton.cdiv(n, BLOCK_N),)](
        x, w, out, m, n, k, x.stride(0), w.stride(0), out.stride(0), M_P=max(16, triton.next_power_of_2(m)),
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, STAGES=STAGES, num_warps=4)
    return out


if triton is not None:

    @triton.jit
    def _linear_kernel(x_ptr, w_ptr, out_ptr, m, n, k, x_sm, w_sn, out_sm, M_P: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
        rows = tl.arange(0, M_P)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((M_P, BLOCK_N), dtype=tl.float32)
        for start in tl.range(0, k, BLOCK_K, num_stages=STAGES):
            kk = start + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None] * x_sm + kk[None, :], mask=(rows < m)[:, None] & (kk < k)[None, :],
                        other=0.0)
            w = tl.load(w_ptr + cols[:, None] * w_sn + kk[None, :], mask=(cols < n)[:, None] & (kk < k)[None, :],
                        other=0.0, eviction_policy="evict_first")  # read once: keep x and the cache's lines
            acc = tl.dot(x, tl.trans(w), acc)
        tl.store(out_ptr + rows[:, None] * out_sm + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(rows < m)[:, None] & (cols < n)[None, :])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 32], help="rows of x (the batch of a decode step)")
    p.add_argument("--configs", choices=["default", "all"], default="all", help="launch settings to time")
    p.add_argument("--hbm-tbps", type=float, default=4.8, help="memory bandwidth for the bound (H200: 4.8 TB/s)")
    args = p.parse_args(argv)
    bad = [r for r in args.rows if not 1 <= r <= 32]
    if bad:
        p.error(f"--rows {bad[0]}: must be from 1 to 32")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if triton is None:
        print("decode_gemv_candidate: needs triton")
        return 1
    cuda = args.device.startswith("cuda")
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        print(f"decode_gemv_candidate: --device {args.device} needs TRITON_INTERPRET=1 (Triton's interpreter); "
              "a GPU is what the timing is for")
        return 1
    dtype = torch.bfloat16 if cuda else torch.float16  # the interpreter's bf16 tl.dot is wrong
    configs = CONFIGS if cuda and args.configs == "all" else CONFIGS[:1]
    print(f"decode_gemv_candidate: {torch.cuda.get_device_name() if cuda else 'CPU (interpreter)'}, {args.shape} "
          f"weights, rows {args.rows}, {len(configs)} launch settings, {dtype}", flush=True)
    gen = torch.Generator(device=args.device).manual_seed(0)
    for (name, (n, k)), m in itertools.product(SHAPES[args.shape].items(), args.rows):
        w = (torch.randn(n, k, generator=gen, device=args.device) / k ** 0.5).to(dtype)
        x = torch.randn(m, k, generator=gen, device=args.device).to(dtype)
        expected = torch.nn.functional.linear(x.float(), w.float())
        err = float((linear(x, w, **configs[0]).float() - expected).abs().max() / expected.abs().max())
        line = f"  {name:>8} {n:>6}x{k:<5} rows {m:>2}: relative error {err:.1e}"
        if cuda:
            from triton.testing import do_bench_cudagraph

            bound_us = (n * k + m * (n + k)) * x.element_size() / (args.hbm_tbps * 1e12) * 1e6
            # A decode step reads each weight once, from memory: time passes over enough copies to outgrow L2
            # (50 MB on an H200), or a weight of a few MB would be read from L2 in every repeat.
            ws = [w] + [w.clone() for _ in range(-(-256 * 2 ** 20 // w.nbytes) - 1)]

            def per_weight(fn):
                return 1e3 * do_bench_cudagraph(lambda: [fn(wi) for wi in ws], return_mode="median") / len(ws)

            cublas = per_weight(lambda wi: torch.nn.functional.linear(x, wi))
            times = {i: per_weight(lambda wi, c=c: linear(x, wi, **c)) for i, c in enumerate(configs)}
            best = min(times, key=times.get)
            line += (f"; bound {bound_us:.2f} us, cuBLAS {cublas:.2f} us, candidate {times[best]:.2f} us "
                     f"({cublas / times[best]:.2f}x) with {configs[best]}")
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
