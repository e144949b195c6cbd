#!/usr/bin/env python
"""Times the sparse and full decode kernels of ``ssa_megatron/hf/decode_triton.py`` alone, per launch setting, on
one GPU. ``triton.testing.do_bench_cudagraph`` gives each time: the calls captured in a CUDA graph (no launch
overhead), the median of its repeats. The 1B shape by default: 32 query heads, 2 KV heads, head dim 64, top_k 16 x
block 16, bf16.

- ``select``: the block selection (``select_by_kernels``), per ``TOP_K_WARPS`` x ``SCORE_WARPS`` x ``BLOCK_N``,
  where ``TOP_K_WARPS`` and ``SCORE_WARPS`` stand for ``TOP_K_WARPS_FEW`` and ``SCORE_WARPS_FEW`` at a batch whose
  grid is small (the constants that set the chunk top-k and scoring kernels' warps there). ``--context`` sets the
  pooled blocks: context + 1 tokens, rounded up to 128 as the static cache rounds, over the block size.
- ``sparse``: a sparse decode step's selection and attention (``sparse_attend_by_kernels``, whose attention kernel
  takes the selection's final top-k), per ``TOP_K_WARPS`` x ``SCORE_WARPS`` (or their ``_FEW``) x ``BLOCK_N`` x
  ``SPARSE_WARPS``.
- ``full``: full mode's split-KV attention (``full_attend_by_kernels``), per ``FULL_BLOCK_N`` x ``FULL_WARPS`` x
  ``FULL_PROGRAMS``, against FlexAttention's path (``decoding.full_decode`` with the kernels off, compiled as a
  decode step compiles it), with the largest difference of their outputs. A decode step reads each layer's cache
  once, from memory, so each call reads another of enough cache copies to outgrow the L2 cache.
- ``gemv``: the products of a decoder layer's projections and the LM head at a decode step's rows
  (``linear_by_kernel``, ``--gemv-rows``; the weights with what the layer fuses into them: q|k|v|g and gate|up after
  the RMSNorm, o before the residual addition, down between SwiGLU's activation and the residual addition;
  ``--gemv-weights`` picks them), per setting of the constants their launch reads: at one row the GEMV's
  (``GEMV_SETTING``, ``GEMV_SETTING_NORM`` or ``GEMV_SETTING_LONG``), output features per program x input features
  per step x stages x warps; at more rows the multi-row kernel's (``ROWS_SETTING``, ``_NORM``, ``_SWIGLU_OUT`` or
  ``_LONG``: the same four; settings that need more shared memory than the card has are skipped) x
  ``ROWS_PROGRAMS``. Against cuBLAS with the norm, the activation and the addition as separate kernels, each call
  reading another of enough weight copies to outgrow the L2 cache.

Prints one line per setting and the fastest per batch (per weight for ``gemv``), next to the module's defaults.

    python tools/tune_decode_kernels.py --batch 1 32 --context 32768
    python tools/tune_decode_kernels.py --kernels gemv
    python tools/tune_decode_kernels.py --kernels gemv --gemv-weights lm_head
    python tools/tune_decode_kernels.py --kernels gemv --gemv-rows 32
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from triton.runtime.errors import OutOfResources

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GEMV_WEIGHTS = ("q|k|v|g+norm", "o+residual", "gate|up+norm", "down+SwiGLU+residual", "lm_head")
"""The ``gemv`` mode's weights, each with what the model fuses into its product."""
L2_BYTES = 256 * 2 ** 20
"""Bytes of cache copies the ``full`` timing cycles through: several times an H100's or H200's L2 (50 MB)."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kernels", nargs="+", choices=["select", "sparse", "full", "gemv"],
                   default=["select", "sparse", "full", "gemv"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--context", type=int, default=32768, help="cached tokens before the new one")
    p.add_argument("--heads", type=int, default=32, help="query heads")
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--warps", type=int, nargs="+", default=[1, 2, 4], help="select: TOP_K_WARPS values")
    p.add_argument("--score-warps", type=int, nargs="+", default=[2, 4], help="select: SCORE_WARPS values")
    p.add_argument("--block-n", type=int, nargs="+", default=[64, 128, 256], help="select: BLOCK_N values")
    p.add_argument("--sparse-warps", type=int, nargs="+", default=[4, 8], help="sparse: SPARSE_WARPS values")
    p.add_argument("--full-block-n", type=int, nargs="+", default=[64, 128], help="full: FULL_BLOCK_N values")
    p.add_argument("--full-warps", type=int, nargs="+", default=[4, 8], help="full: FULL_WARPS values")
    p.add_argument("--full-programs", type=int, nargs="+", default=[264, 528, 1056],
                   help="full: FULL_PROGRAMS values")
    p.add_argument("--hidden", type=int, default=2048, help="gemv: hidden size")
    p.add_argument("--ffn", type=int, default=8192, help="gemv: MLP intermediate size")
    p.add_argument("--vocab", type=int, default=128256, help="gemv: the LM head's rows")
    p.add_argument("--gemv-weights", nargs="+", choices=GEMV_WEIGHTS, default=list(GEMV_WEIGHTS),
                   help="gemv: the weights timed")
    p.add_argument("--gemv-block-n", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="gemv: GEMV_BLOCK_N values")
    p.add_argument("--gemv-block-k", type=int, nargs="+", default=[256, 512, 1024], help="gemv: GEMV_BLOCK_K values")
    p.add_argument("--gemv-stages", type=int, nargs="+", default=[2, 3, 4], help="gemv: GEMV_STAGES values")
    p.add_argument("--gemv-warps", type=int, nargs="+", default=[2, 4, 8], help="gemv: GEMV_WARPS values")
    p.add_argument("--gemv-rows", type=int, nargs="+", default=[1],
                   help="gemv: rows of the product (a decode step's batch); 1 is the GEMV, more the multi-row kernel")
    p.add_argument("--rows-block-n", type=int, nargs="+", default=[64, 128, 256],
                   help="gemv, more than one row: ROWS_SETTING's output features per program")
    p.add_argument("--rows-block-k", type=int, nargs="+", default=[64, 128],
                   help="gemv, more than one row: ROWS_SETTING's input features per step")
    p.add_argument("--rows-stages", type=int, nargs="+", default=[3, 4], help="gemv, more than one row: its stages")
    p.add_argument("--rows-warps", type=int, nargs="+", default=[4, 8], help="gemv, more than one row: its warps")
    p.add_argument("--rows-programs", type=int, nargs="+", default=[132, 264],
                   help="gemv, more than one row: ROWS_PROGRAMS values")
    p.add_argument("--rep", type=int, default=20, help="milliseconds of calls per CUDA graph")
    args = p.parse_args(argv)
    if args.heads % args.kv_heads:
        p.error(f"--heads {args.heads}: must be a multiple of --kv-heads {args.kv_heads}")
    for name in ("batch", "warps", "block_n", "sparse_warps", "full_block_n", "full_warps", "full_programs",
                 "gemv_block_n", "gemv_block_k", "gemv_stages", "gemv_warps", "gemv_rows", "rows_block_n",
                 "rows_block_k", "rows_stages", "rows_warps", "rows_programs"):
        bad = [v for v in getattr(args, name) if v < 1]
        if bad:
            p.error(f"--{name.replace('_', '-')} {bad[0]}: must be >= 1")
    for name in ("context", "hidden", "ffn", "vocab"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)}: must be >= 1")
    if max(args.gemv_rows) > 32:
        p.error(f"--gemv-rows {max(args.gemv_rows)}: must be <= 32 (decode_triton.ROWS_MAX; more go to cuBLAS)")
    return args


def constant_read(module, names: tuple[str, ...], rule) -> str:
    """Which of the module constants ``names`` ``rule()`` returns: each holds its own name while the rule runs, so
    the sweep times the constant the launcher reads without restating the launcher's rule."""
    saved = {name: getattr(module, name) for name in names}
    try:
        for name in names:
            setattr(module, name, name)
        return rule()
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def sweep(module, names: tuple[str, ...], settings, time_one, label: str) -> None:
    """Times ``time_one()`` with each setting of the module constants ``names``, prints the lines and the fastest,
    and restores the defaults."""
    defaults = tuple(getattr(module, n) for n in names)
    times = {}
    try:
        for setting in settings:
            for name, value in zip(names, setting):
                setattr(module, name, value)
            line = f"  {label}  " + "  ".join(f"{n} {v!s:>4}" for n, v in zip(names, setting))
            try:
                times[setting] = time_one()
            except OutOfResources as e:  # too many stages of too large tiles for the card's shared memory
                print(f"{line}: skipped ({e})", flush=True)
                continue
            print(f"{line}: {times[setting]:8.2f} us", flush=True)
    finally:
        for name, value in zip(names, defaults):
            setattr(module, name, value)
    best = min(times, key=times.get)
    print(f"{label}: fastest {dict(zip(names, best))} ({times[best]:.2f} us); the defaults {defaults} take "
          f"{times.get(defaults, float('nan')):.2f} us", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_decode_kernels: needs a CUDA GPU (the kernels' launch settings are what it times)")
        return 1
    from triton.testing import do_bench_cudagraph

    from ssa_megatron.hf import decode_triton, decoding

    def bench(fn) -> float:
        return 1e3 * do_bench_cudagraph(fn, rep=args.rep, return_mode="median")

    capacity = -(-(args.context + 1) // 128) * 128  # as SSAStaticLayer rounds its buffers
    length = torch.tensor(args.context + 1, device="cuda")
    scale = args.head_dim ** -0.5
    print(f"tune_decode_kernels: {torch.cuda.get_device_name()}, batch {args.batch}, {args.context} cached tokens, "
          f"{args.heads}/{args.kv_heads} heads, head dim {args.head_dim}, bf16", flush=True)
    def warps_names(batch: int, blocks: int) -> tuple[str, str]:
        """The constants that set the chunk top-k and scoring kernels' warps at this batch (their grid: rows x
        chunks)."""
        programs = batch * args.kv_heads * -(-blocks // decode_triton.BLOCK_N)
        return (constant_read(decode_triton, ("TOP_K_WARPS", "TOP_K_WARPS_FEW"),
                              lambda: decode_triton._top_k_warps(programs)),
                constant_read(decode_triton, ("SCORE_WARPS", "SCORE_WARPS_FEW"),
                              lambda: decode_triton._score_warps(programs)))

    for batch in args.batch:
        q = torch.randn(batch, args.heads, 1, args.head_dim, device="cuda").bfloat16()
        config = SimpleNamespace(ssa_block_size=args.block_size, ssa_top_k=args.top_k, ssa_sink_blocks=0,
                                 ssa_local_blocks=0, ssa_score="group_softmax")
        if "select" in args.kernels:
            pooled = torch.randn(batch, args.kv_heads, capacity // args.block_size, args.head_dim,
                                 device="cuda").bfloat16()
            print(f"select, batch {batch}: {pooled.shape[2]} pooled blocks, top_k {args.top_k}", flush=True)
            sweep(decode_triton, (*warps_names(batch, pooled.shape[2]), "BLOCK_N"),
                  itertools.product(args.warps, args.score_warps, args.block_n),
                  lambda: bench(lambda: decode_triton.select_by_kernels(q, pooled, length, config, scale)),
                  f"batch {batch:>3}")
            del pooled
        if "sparse" in args.kernels:
            keys, values = (torch.randn(batch, args.kv_heads, capacity, args.head_dim, device="cuda").bfloat16()
                            for _ in range(2))
            pooled = decoding.pool_blocks(keys, args.block_size)
            print(f"sparse, batch {batch}: {pooled.shape[2]} pooled blocks, top_k {args.top_k}", flush=True)
            sweep(decode_triton, (*warps_names(batch, pooled.shape[2]), "BLOCK_N", "SPARSE_WARPS"),
                  itertools.product(args.warps, args.score_warps, args.block_n, args.sparse_warps),
                  lambda: bench(lambda: decode_triton.sparse_attend_by_kernels(q, keys, values, pooled, length, config,
                                                                               scale)), f"batch {batch:>3}")
            del keys, values, pooled
        if "full" in args.kernels:
            shape = (batch, args.kv_heads, capacity, args.head_dim)
            copies = max(1, -(-L2_BYTES // (2 * torch.Size(shape).numel() * 2)))
            caches = [(torch.randn(shape, device="cuda").bfloat16(), torch.randn(shape, device="cuda").bfloat16())
                      for _ in range(copies)]
            tiles = torch.arange(capacity // decoding.KV_TILE, dtype=torch.int32, device="cuda").view(1, 1, 1, -1)
            kernels = decoding.use_kernels
            decoding.use_kernels = lambda q, cached: False  # FlexAttention's path, as without the kernels
            try:
                flex = torch.compile(decoding.full_decode, fullgraph=True, dynamic=False)
                expected = flex(q, *caches[0], length, tiles, scale).float()
                flex_us = bench(lambda: [flex(q, k, v, length, tiles, scale) for k, v in caches]) / copies
            finally:
                decoding.use_kernels = kernels
            diff = float((decode_triton.full_attend_by_kernels(q, *caches[0], length, scale).float()
                          - expected).abs().max())
            print(f"full, batch {batch}: {copies} cache copies; FlexAttention {flex_us:.2f} us per call; largest "
                  f"|kernels - FlexAttention| {diff:.1e} (the defaults)", flush=True)
            sweep(decode_triton, ("FULL_BLOCK_N", "FULL_WARPS", "FULL_PROGRAMS"),
                  itertools.product(args.full_block_n, args.full_warps, args.full_programs),
                  lambda: bench(lambda: [decode_triton.full_attend_by_kernels(q, k, v, length, scale)
                                         for k, v in caches]) / copies, f"batch {batch:>3}")
            del caches
    if "gemv" in args.kernels:
        tune_gemv(args, decode_triton, bench)
    return 0


def tune_gemv(args, decode_triton, bench) -> None:
    """The ``gemv`` sweep: each decoder-layer weight at ``--gemv-rows`` rows with what the layer fuses into its
    product (the RMSNorm before q|k|v|g and gate|up, the residual after o and down, SwiGLU's activation before down:
    at more than one row, after gate|up instead, as the MLP launches them), and the LM head, against cuBLAS with the
    same operations around it as separate kernels; each sweeps the constants its launch reads (one row: the GEMV's
    setting; more: the multi-row kernel's and ``ROWS_PROGRAMS``)."""
    f = torch.nn.functional

    def silu_and_mul(x):  # SwiGLU's activation of x = [gate | up]
        gate, up = x.chunk(2, -1)
        return f.silu(gate) * up

    qkvg = args.heads * args.head_dim + 2 * args.kv_heads * args.head_dim + args.heads
    weights = {  # name: (N, K, fused norm, SwiGLU, fused residual)
        "q|k|v|g+norm": (qkvg, args.hidden, True, False, False),
        "o+residual": (args.hidden, args.heads * args.head_dim, False, False, True),
        "gate|up+norm": (2 * args.ffn, args.hidden, True, False, False),
        "down+SwiGLU+residual": (args.hidden, args.ffn, False, True, True),
        "lm_head": (args.vocab, args.hidden, False, False, False)}
    gemv_settings = [s for s in itertools.product(args.gemv_block_n, args.gemv_block_k, args.gemv_stages,
                                                  args.gemv_warps)
                     if s[0] * s[1] <= 8192]  # the float32 accumulator's elements per program
    rows_settings = list(itertools.product(
        itertools.product(args.rows_block_n, args.rows_block_k, args.rows_stages, args.rows_warps),
        args.rows_programs))
    # the split products' counters, as a fused module keeps them (the LM head has none)
    tickets = torch.zeros(decode_triton.SPLIT_TICKETS, dtype=torch.int32, device="cuda")
    for rows in args.gemv_rows:
        for name in args.gemv_weights:
            n, k, norm, swiglu, residual = weights[name]
            swiglu_out = rows > 1 and name.startswith("gate|up")  # the MLP's activation, where it runs at these rows
            swiglu = swiglu and rows == 1
            w = (torch.randn(n, k, device="cuda") / k ** 0.5).bfloat16()
            x = torch.randn(rows, 2 * k if swiglu else k, device="cuda").bfloat16()
            fused = dict(norm=(1 + 0.1 * torch.randn(k, device="cuda")).bfloat16() if norm else None, eps=1e-5,
                         residual=torch.randn(rows, n, device="cuda").bfloat16() if residual else None,
                         tickets=tickets if name != "lm_head" else None)

            def cublas(w, x=x, swiglu=swiglu, norm=fused["norm"], residual=fused["residual"], swiglu_out=swiglu_out):
                if norm is not None:
                    x = f.rms_norm(x, (k,), norm, 1e-5)
                out = f.linear(silu_and_mul(x) if swiglu else x, w)
                out = silu_and_mul(out) if swiglu_out else out
                return out if residual is None else residual + out

            copies = [w] + [w.clone() for _ in range(-(-L2_BYTES // w.nbytes) - 1)]
            expected = cublas(w).float()
            fused["swiglu_out"] = swiglu_out
            diff = float((decode_triton.linear_by_kernel(x, w, swiglu, **fused).float() - expected).abs().max()
                         / expected.abs().max())
            cublas_us = bench(lambda: [cublas(wi) for wi in copies]) / len(copies)
            what = " (SwiGLU after)" if swiglu_out else " (no SwiGLU)" if rows > 1 and "SwiGLU" in name else ""
            label = f"gemv {name}{what}, {rows} row{'s' * (rows > 1)}"
            print(f"{label} {n}x{k}: {len(copies)} weight copies; cuBLAS and separate kernels {cublas_us:.2f} us per "
                  f"call; largest |kernel - cuBLAS| / max |cuBLAS| {diff:.1e} (the defaults)", flush=True)
            if rows == 1:
                names = (constant_read(decode_triton, ("GEMV_SETTING", "GEMV_SETTING_NORM", "GEMV_SETTING_LONG"),
                                       lambda: decode_triton._gemv_setting(k, norm)),)
                settings = [(s,) for s in gemv_settings]
            else:
                names = (constant_read(decode_triton, ("ROWS_SETTING", "ROWS_SETTING_NORM", "ROWS_SETTING_SWIGLU_OUT",
                                                       "ROWS_SETTING_LONG"),
                                       lambda: decode_triton._rows_setting(k, norm, swiglu_out)), "ROWS_PROGRAMS")
                settings = rows_settings
            sweep(decode_triton, names, settings,
                  lambda: bench(lambda: [decode_triton.linear_by_kernel(x, wi, swiglu, **fused) for wi in copies])
                  / len(copies), label)
            del copies, w


if __name__ == "__main__":
    sys.exit(main())
