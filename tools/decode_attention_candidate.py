#!/usr/bin/env python
"""A candidate Triton kernel for the attention of a sparse decode step, not yet used by the package: it is tested
on CPU but has not run on a GPU, so ``decoding.sparse_decode`` still attends with torch operations (a gather, a
scoring GEMM, a softmax and a value GEMM: 4 kernels per layer, about 12.8 us at batch 32 and 32k on an H200,
docs/benchmarks.md session 8). Adopt it in ``ssa_megatron/hf/decode_select.py`` (then a file of all decode
kernels) once this script shows it faster on a GPU and ``tests/gpu/test_decode_gpu.py`` passes with it.

The kernel (:func:`attend`): one program per row (a batch entry's KV head) gathers the ``top_k · block_size``
selected keys and values at once and attends the group's query heads to them, causal inside the own block, with the
sparse training kernel's precision: float32 scores and softmax, the probabilities rounded to the values' dtype for
``tl.dot``. Expected: about 4 us per layer at batch 32 (one launch, 4 MB read), a 0.1-0.14 ms shorter step.

On a GPU (``--device cuda``, the default there) the script times, at the 1B shape on a static-cache-sized buffer,
``decoding.sparse_decode`` as the package runs it against the production selection followed by :func:`attend`, each
compiled (``fullgraph``, static shapes) and timed in a CUDA graph (``triton.testing.do_bench_cudagraph``, median),
and prints the largest difference of their outputs (bf16). On CPU it runs the kernel under Triton's interpreter in
float16, as ``tests/test_decode_attention_candidate.py`` does (set ``TRITON_INTERPRET=1``).

    python tools/decode_attention_candidate.py --batch 1 32 --context 32768                     # GPU
    TRITON_INTERPRET=1 python tools/decode_attention_candidate.py --batch 1 2 --context 500    # CPU check
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def attend(q: Tensor, keys: Tensor, values: Tensor, blocks: Tensor, length: Tensor, block_size: int,
           scale: float) -> Tensor:
    """The attention of ``q [b, HQ, 1, D]`` (at position ``length - 1``, a 0-d int64 tensor) to the selected
    ``blocks [b, HKV, K]`` (-1 padded) of ``keys``/``values [b, HKV, L, D]``; returns ``[b, HQ, 1, D]`` in ``q``'s
    dtype."""
    b, hq, _, d = q.shape
    hkv, top_k = keys.shape[1], blocks.shape[-1]
    g = hq // hkv
    q = q[:, :, 0]
    if q.stride(-1) != 1:
        q = q.contiguous()
    keys, values, blocks = (x if x.stride(-1) == 1 else x.contiguous() for x in (keys, values, blocks))
    out = torch.empty(b, hq, d, device=q.device, dtype=q.dtype)
    _attention_kernel[(b * hkv,)](
        q, keys, values, blocks, length, out, q.stride(0), q.stride(1), keys.stride(0), keys.stride(1),
        keys.stride(2), values.stride(0), values.stride(1), values.stride(2), blocks.stride(0), blocks.stride(1),
        SCALE=scale, HKV=hkv, G=g, D=d, BS=block_size, TOP_K=top_k, GROUP_P=max(16, triton.next_power_of_2(g)),
        DIM_P=max(16, triton.next_power_of_2(d)), KEYS_P=max(16, triton.next_power_of_2(top_k * block_size)),
        num_warps=8)
    return out[:, :, None]


if triton is not None:

    @triton.jit
    def _attention_kernel(q_ptr, k_ptr, v_ptr, blocks_ptr, length_ptr, out_ptr, q_sb, q_sh, k_sb, k_sh, k_sn,
                          v_sb, v_sh, v_sn, i_sb, i_sh, SCALE: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr,
                          D: tl.constexpr, BS: tl.constexpr, TOP_K: tl.constexpr, GROUP_P: tl.constexpr,
                          DIM_P: tl.constexpr, KEYS_P: tl.constexpr):
        row = tl.program_id(0)
        bi, h = row // HKV, row % HKV
        g = tl.arange(0, GROUP_P)
        d = tl.arange(0, DIM_P)
        t = tl.arange(0, KEYS_P)  # the t-th gathered key: token t % BS of selected block t // BS
        block = tl.load(blocks_ptr + bi * i_sb + h * i_sh + t // BS, mask=t < TOP_K * BS, other=-1)
        pos = block * BS + t % BS
        valid = (block >= 0) & (pos < tl.load(length_ptr))  # causal inside the own block
        pos = tl.where(valid, pos, 0)
        dim = (d < D)[None, :]
        q = tl.load(q_ptr + bi * q_sb + (h * G + g)[:, None] * q_sh + d[None, :], mask=(g < G)[:, None] & dim,
                    other=0.0)
        k = tl.load(k_ptr + bi * k_sb + h * k_sh + pos[:, None] * k_sn + d[None, :], mask=valid[:, None] & dim,
                    other=0.0)
        v = tl.load(v_ptr + bi * v_sb + h * v_sh + pos[:, None] * v_sn + d[None, :], mask=valid[:, None] & dim,
                    other=0.0)
        s = tl.where(valid[None, :], tl.dot(q, tl.trans(k)) * SCALE, -float("inf"))  # [GROUP_P, KEYS_P] float32
        p = tl.exp(s - tl.max(s, 1)[:, None])  # the own block's new token is always valid: a finite max
        p = p / tl.sum(p, 1)[:, None]
        out = tl.dot(p.to(v.dtype), v)
        tl.store(out_ptr + (bi * HKV * G + h * G + g)[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=(g < G)[:, None] & dim)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--context", type=int, default=32768, help="cached tokens before the new one")
    p.add_argument("--heads", type=int, default=32, help="query heads")
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--rep", type=int, default=20, help="milliseconds of calls per CUDA graph")
    args = p.parse_args(argv)
    if args.heads % args.kv_heads:
        p.error(f"--heads {args.heads}: must be a multiple of --kv-heads {args.kv_heads}")
    for name in ("context", "top_k", "block_size", "rep"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if triton is None:
        print("decode_attention_candidate: needs triton")
        return 1
    from ssa_megatron.hf import decoding

    cuda = args.device.startswith("cuda")
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        print(f"decode_attention_candidate: --device {args.device} needs TRITON_INTERPRET=1 (Triton's interpreter); "
              "a GPU is what the timing is for")
        return 1
    dtype = torch.bfloat16 if cuda else torch.float16  # the interpreter's bf16 tl.dot is wrong
    bs = args.block_size
    capacity = -(-(args.context + 1) // 128) * 128  # as SSAStaticLayer rounds its buffers
    config = SimpleNamespace(ssa_block_size=bs, ssa_top_k=args.top_k, ssa_sink_blocks=1, ssa_local_blocks=2,
                             ssa_score="group_softmax")
    scale = args.head_dim ** -0.5
    print(f"decode_attention_candidate: {torch.cuda.get_device_name() if cuda else 'CPU (interpreter)'}, batch "
          f"{args.batch}, {args.context} cached tokens, {args.heads}/{args.kv_heads} heads, head dim "
          f"{args.head_dim}, top_k {args.top_k} x block {bs}, {dtype}", flush=True)
    for batch in args.batch:
        gen = torch.Generator(device=args.device).manual_seed(batch)
        shape = (batch, args.kv_heads, capacity, args.head_dim)
        keys = torch.randn(shape, generator=gen, device=args.device).to(dtype)
        values = torch.randn(shape, generator=gen, device=args.device).to(dtype)
        pooled = decoding.pool_blocks(keys, bs)
        q = torch.randn(batch, args.heads, 1, args.head_dim, generator=gen, device=args.device).to(dtype)
        length = torch.tensor(args.context + 1, device=args.device)

        def package(q=q, keys=keys, values=values, pooled=pooled):
            return decoding.sparse_decode(q, keys, values, pooled, length, config, scale)

        def candidate(q=q, keys=keys, values=values, pooled=pooled):
            blocks = decoding.select_decode_blocks(q, pooled, length, config, scale)
            return attend(q, keys, values, blocks, length, bs, scale)

        if cuda:
            package = torch.compile(package, fullgraph=True, dynamic=False)
            candidate = torch.compile(candidate, fullgraph=True, dynamic=False)
        diff = float((package().float() - candidate().float()).abs().max())
        line = f"  batch {batch:>3}: largest |package - candidate| {diff:.2e}"
        if cuda:
            from triton.testing import do_bench_cudagraph

            package_us, candidate_us = (1e3 * do_bench_cudagraph(fn, rep=args.rep, return_mode="median")
                                        for fn in (package, candidate))
            line += (f"; selection + attention per layer: package {package_us:.2f} us, candidate "
                     f"{candidate_us:.2f} us ({package_us / candidate_us:.2f}x)")
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
