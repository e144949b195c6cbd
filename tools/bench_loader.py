#!/usr/bin/env python
"""Loader throughput: tokens per second one rank's TokenLoader delivers to the training process.

    python tools/bench_loader.py SHARD_DIR --seq-length 8192 --micro-batch-size 1 --num-workers 2

Counts ``micro_batch_size × seq_length`` tokens per batch received in the main process (tensors built, workers'
decode + checksum + shuffle included); the clock starts after the first batch so that worker start-up and the
first group load are reported separately. Compare with what the GPUs consume (docs/benchmarks.md, "Data pipeline
(CPU)").
"""

from __future__ import annotations

import argparse
import os
import time

from ssa_megatron.data.loader import TokenLoader


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", help="shard directory (or pattern) written by tools/prepare_data.py")
    parser.add_argument("--seq-length", type=int, required=True)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--dp-rank", type=int, default=0)
    parser.add_argument("--dp-world-size", type=int, default=1)
    parser.add_argument("--batches", type=int, default=2000, help="batches timed after the first one")
    parser.add_argument("--shuffle-shards", type=int, default=4)
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of shards")
    parser.add_argument("--consume-tokens-per-s", type=float, default=41_100.0,
                        help="what one GPU trains on (default: HF Llama 1B shape, 8k, H100; docs/benchmarks.md)")
    args = parser.parse_args(argv)

    loader = TokenLoader(args.shards, args.seq_length, args.micro_batch_size, dp_rank=args.dp_rank,
                         dp_world_size=args.dp_world_size, num_workers=args.num_workers, seed=1234,
                         shuffle_shards=args.shuffle_shards, verify_checksums=not args.no_verify)
    print(f"bench: {loader.num_rows} rows in {len(loader.shards)} shards ({loader.distribute}), "
          f"b={args.micro_batch_size} s={args.seq_length}, {args.num_workers} workers, rank "
          f"{args.dp_rank}/{args.dp_world_size}, {os.cpu_count()} CPUs; timing {args.batches} batches")
    started = time.perf_counter()
    batches = iter(loader)
    first = next(batches)
    first_seconds = time.perf_counter() - started
    tokens_per_batch = first["tokens"].numel()
    timed_start = time.perf_counter()
    for _ in range(args.batches):
        next(batches)
    seconds = time.perf_counter() - timed_start
    rate = args.batches * tokens_per_batch / seconds
    node = 8 * args.consume_tokens_per_s
    print(f"bench: first batch after {first_seconds:.2f} s; then {rate:,.0f} tokens/s "
          f"({args.batches / seconds:,.1f} batches/s) over {seconds:.1f} s")
    print(f"bench: = {rate / args.consume_tokens_per_s:,.0f}x one GPU's {args.consume_tokens_per_s:,.0f} tokens/s, "
          f"{rate / node:,.1f}x an 8-GPU node's {node:,.0f} tokens/s")


if __name__ == "__main__":
    main()
