#!/usr/bin/env python3
"""How often the kernels' bf16 block selection equals an fp32 exact top-k, and how close the rest are to ties.

The selection kernel reads bf16 q and k, pools each block's keys with a float32 sum rounded back to bf16, and scores
with float32 accumulation (docs/ssa.md, "Precision of the selection"). This runs it on the whole sequence and
compares, at sampled query positions, with an exact top-k computed here in float32 (or float64) throughout:
pooled keys not rounded, scores and softmax in the oracle dtype, ties to the later block. Two oracle inputs:

- ``same``: the bf16 inputs the kernel read, upcast: what the kernel's own arithmetic changes;
- ``orig``: the float32 inputs before rounding to bf16: what training in bf16 changes as well.

For every (KV head, query) whose set of selected blocks differs, the gap is ``max |s_j - s_K| / s_K`` over the
blocks j in one set but not the other, with ``s`` the oracle's scores and ``s_K`` the smallest score the oracle
selected: a near-tie has a gap of the order of bf16 rounding (2^-8 = 3.9e-3) or less.

Inputs (``--inputs``): ``random`` (N(0, 1) q and k) and ``structured`` (keys drawn around 64 per-head topic
vectors, block by block, queries around one topic each, so a few blocks stand out as in trained models).

    PYTHONPATH=$PWD/kernels python3 kernels/tools/selection_agreement.py   # GPU: T 8192, 32768; 32/2/64, BS 16, K 16
    PYTHONPATH=$PWD/kernels python3 kernels/tools/selection_agreement.py --t 512 --queries 64   # CPU, interpreter

On CPU the kernel runs under Triton's interpreter, whose bfloat16 arithmetic is not the GPU's (it selects
differently from the reference on identical bf16 inputs), so there the kernel reads float32 by default
(``--kernel-dtype``): a check of the script and the kernel's logic, not a bf16 measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

if not torch.cuda.is_available():  # the Triton interpreter must be on before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import ssa_kernels as K  # noqa: E402

BF16_EPS = 2.0 ** -8


def make_inputs(kind: str, t: int, hq: int, hkv: int, d: int, bs: int, q_scale: float, seed: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``q [t, 1, hq, d]``, ``k [t, 1, hkv, d]``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "random":
        q = torch.randn(t, 1, hq, d, generator=g)
        k = torch.randn(t, 1, hkv, d, generator=g)
    elif kind == "structured":
        topics = torch.randn(hkv, 64, d, generator=g)
        nb = -(-t // bs)
        block_topic = torch.randint(0, 64, (nb, hkv), generator=g)  # one topic per key block and KV head
        kt = topics[torch.arange(hkv)[None, :], block_topic]  # [nb, hkv, d]
        k = kt.repeat_interleave(bs, dim=0)[:t, None] + 0.5 * torch.randn(t, 1, hkv, d, generator=g)
        group = hq // hkv
        query_topic = torch.randint(0, 64, (t, hkv), generator=g)
        qt = topics[torch.arange(hkv)[None, :], query_topic].repeat_interleave(group, dim=1)  # [t, hq, d]
        q = qt[:, None] + 0.5 * torch.randn(t, 1, hq, d, generator=g)
    else:
        raise ValueError(f"--inputs {kind!r}: must be 'random' or 'structured'")
    return (q_scale * q).to(device), k.to(device)


def oracle_scores(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, bs: int, score: str,
                  scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Scores ``[HKV, n, NB]`` of the complete blocks for the queries at ``positions``, in ``dtype`` throughout
    (-inf where a block is not a candidate: not strictly before the query's own block)."""
    t, _, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    nb = t // bs
    kbar = k[: nb * bs, 0].to(dtype).unflatten(0, (nb, bs)).sum(1) / bs  # [NB, HKV, D], not rounded
    qs = q[positions, 0].to(dtype).view(len(positions), hkv, g, d)  # [n, HKV, G, D]
    logits = torch.einsum("nhgd,jhd->hgnj", qs, kbar)  # [HKV, G, n, NB]
    cand = torch.arange(nb, device=q.device)[None, :] < (positions // bs)[:, None]  # [n, NB]
    if score == "group_softmax":
        probs = torch.softmax((scale * logits).masked_fill(~cand, -math.inf), dim=-1)
        s = torch.where(cand, probs, torch.zeros_like(probs)).sum(1)
    else:
        s = logits.mean(1)
    return s.masked_fill(~cand, -math.inf)


def exact_top(scores: torch.Tensor, n_best: int) -> torch.Tensor:
    """Indices ``[.., n_best]`` of the best candidates, ties to the later block (-1 where fewer candidates)."""
    nb = scores.shape[-1]
    order = torch.sort(torch.flip(scores, [-1]), dim=-1, descending=True, stable=True).indices[..., :n_best]
    chosen = nb - 1 - order
    valid = torch.gather(scores, -1, chosen) > -math.inf
    return torch.where(valid, chosen, torch.full_like(chosen, -1))


def as_mask(blocks: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Block indices ``[.., m]`` (-1 = none) as a boolean mask ``shape = [.., NB]``."""
    nb = shape[-1]
    mask = torch.zeros(*shape[:-1], nb + 1, dtype=torch.bool, device=blocks.device)
    mask.scatter_(-1, torch.where(blocks >= 0, blocks, torch.full_like(blocks, nb)), True)  # -1 -> spare column
    return mask[..., :nb]


def compare(kernel_idx: torch.Tensor, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, bs: int,
            top_k: int, score: str, dtype: torch.dtype, chunk: int) -> dict:
    """Agreement of ``kernel_idx [1, HKV, T, K]`` (block starts) with the oracle at ``positions``."""
    scale = q.shape[-1] ** -0.5
    same = rows = 0
    block_same = block_total = 0
    gaps: list[torch.Tensor] = []
    for start in range(0, len(positions), chunk):
        pos = positions[start:start + chunk]
        s = oracle_scores(q, k, pos, bs, score, scale, dtype)  # [HKV, n, NB]
        best = exact_top(s, top_k - 1)  # the own block is the K-th
        ours = kernel_idx[0][:, pos].long()  # [HKV, n, K] starts, -1 padded
        own = (pos // bs)[None, :, None].expand(s.shape[0], -1, 1)
        ours_blocks = torch.where(ours >= 0, ours // bs, torch.full_like(ours, -1))
        ours_blocks = torch.where(ours_blocks == own, torch.full_like(ours_blocks, -1), ours_blocks)
        in_ours, in_best = as_mask(ours_blocks, s.shape), as_mask(best, s.shape)  # [HKV, n, NB]
        differ = in_ours ^ in_best
        row_differs = differ.any(-1)
        rows += row_differs.numel()
        same += int((~row_differs).sum())
        block_total += int(in_best.sum())
        block_same += int((in_best & in_ours).sum())
        if row_differs.any():
            kth = torch.where(in_best, s, torch.full_like(s, math.inf)).amin(-1, keepdim=True)  # [HKV, n, 1]
            rel = torch.where(differ, (s - kth).abs() / kth.abs().clamp_min(1e-30), torch.zeros_like(s))
            gaps.append(rel.amax(-1)[row_differs].double().cpu())
    gap = torch.cat(gaps) if gaps else torch.zeros(0, dtype=torch.float64)
    out = {"rows": rows, "equal": same / max(rows, 1), "blocks_equal": block_same / max(block_total, 1),
           "differing": len(gap)}
    if len(gap):
        out.update(gap_median=float(gap.median()), gap_p99=float(torch.quantile(gap, 0.99)),
                   gap_max=float(gap.max()), near_tie_share=float((gap <= BF16_EPS).double().mean()))
    return out


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    oracle_dtype = {"float32": torch.float32, "float64": torch.float64}[args.oracle_dtype]
    results = []
    for t in args.t:
        if t % args.block_size or t < 2 * args.block_size:
            raise SystemExit(f"selection_agreement: --t {t}: must be a multiple of --block-size "
                             f"{args.block_size} and at least two blocks")
        for kind in args.inputs:
            q32, k32 = make_inputs(kind, t, args.heads, args.kv_heads, args.head_dim, args.block_size, args.q_scale,
                                   args.seed, device)
            q16, k16 = q32.to(args.kernel_dtype), k32.to(args.kernel_dtype)
            began = time.perf_counter()
            idx, _ = K.select_blocks(q16, k16, args.block_size, args.top_k, args.score)
            if device.type == "cuda":
                torch.cuda.synchronize()
            kernel_s = time.perf_counter() - began
            # Sampled queries with at least top_k earlier blocks (others select everything), spread evenly.
            first = min(args.top_k * args.block_size, t - 1)
            n = min(args.queries, t - first)
            positions = torch.linspace(first, t - 1, n, device=device).round().long().unique()
            for oracle_input, (q, k) in (("same", (q16, k16)), ("orig", (q32, k32))):
                row = {"t": t, "inputs": kind, "oracle_input": oracle_input, "oracle_dtype": args.oracle_dtype,
                       "score": args.score, "kernel_s": round(kernel_s, 4),
                       **compare(idx, q, k, positions, args.block_size, args.top_k, args.score, oracle_dtype,
                                 args.chunk)}
                results.append(row)
                print(format_row(row), flush=True)
    return results


def format_row(r: dict) -> str:
    line = (f"T {r['t']:>6} {r['inputs']:<10} oracle {r['oracle_dtype']} on {r['oracle_input']:<4} inputs: "
            f"{r['equal']:7.2%} of {r['rows']} (head, query) selections equal, {r['blocks_equal']:7.2%} of blocks")
    if r["differing"]:
        line += (f"; {r['differing']} differ, gap median {r['gap_median']:.1e} p99 {r['gap_p99']:.1e} "
                 f"max {r['gap_max']:.1e}, {r['near_tie_share']:.0%} within 2^-8")
    return line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--t", type=int, nargs="+", default=[8192, 32768], help="sequence lengths (default 8192 32768)")
    p.add_argument("--heads", type=int, default=32, help="query heads (default 32)")
    p.add_argument("--kv-heads", type=int, default=2, help="KV heads (default 2)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--score", choices=("group_softmax", "dot"), default="group_softmax")
    p.add_argument("--inputs", nargs="+", choices=("random", "structured"), default=["random", "structured"])
    p.add_argument("--q-scale", type=float, default=1.0, help="multiplies q (sharper softmax when > 1)")
    p.add_argument("--queries", type=int, default=4096, help="query positions compared per T (default 4096)")
    p.add_argument("--chunk", type=int, default=256, help="queries per oracle batch (memory)")
    p.add_argument("--oracle-dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--kernel-dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="q/k dtype the kernel reads (default bfloat16 on CUDA, float32 under the interpreter)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    for name in ("heads", "kv_heads", "head_dim", "block_size", "top_k", "queries", "chunk"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if args.heads % args.kv_heads:
        p.error(f"--kv-heads {args.kv_heads} must divide --heads {args.heads}")
    if not (math.isfinite(args.q_scale) and args.q_scale > 0):
        p.error(f"--q-scale {args.q_scale}: must be a finite number > 0")
    name = args.kernel_dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    args.kernel_dtype = getattr(torch, name)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (Triton interpreter)"
    print(f"selection_agreement: {device}; HQ {args.heads} / HKV {args.kv_heads} / D {args.head_dim}, "
          f"BS {args.block_size}, K {args.top_k}, {args.score}, {str(args.kernel_dtype).removeprefix('torch.')} "
          f"kernel vs {args.oracle_dtype} exact top-k, "
          f"T {args.t}, {args.queries} queries each", flush=True)
    rows = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"selection_agreement: rows written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
