#!/usr/bin/env python
"""Perplexity against the sparse budget: full attention once, then sparse attention at every (block size, top_k).

    python tools/budget_sweep.py --model hf_out/ --data shards/ --top-k 1 2 4 8 16 32 --out sweeps/run1
    python tools/budget_sweep.py --model runs/tiny --data builtin:stdlib --top-k 1 2 4 --block-size 16 32 --stats

Writes <out>/budget_sweep.csv, <out>/budget_sweep.json and <out>/budget_sweep.png (PPL against receptive field
top_k x block_size, full attention as a dashed horizontal line).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None) -> argparse.Namespace:
    from ssa_megatron.eval.cli import add_common_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--top-k", type=int, nargs="+", required=True, help="budgets in blocks")
    parser.add_argument("--block-size", type=int, nargs="+", default=None, help="block sizes (default: the model's)")
    parser.add_argument("--out", default="budget_sweep", help="output directory (default ./budget_sweep)")
    parser.add_argument("--no-plot", action="store_true", help="skip the matplotlib plot")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    from ssa_megatron.eval.cli import load_inputs
    from ssa_megatron.eval.sweep import budget_sweep, plot_sweep, steps_of, write_table

    started = time.perf_counter()
    model, batches = load_inputs(args)
    block_sizes = args.block_size or [model.config.ssa_block_size]
    rows, seq = sum(b["tokens"].shape[0] for b in batches), batches[0]["tokens"].shape[1]
    print(f"budget_sweep: {args.model} on {args.data}: {rows} rows x {seq} tokens; full + sparse at top_k "
          f"{args.top_k} x block_size {block_sizes}{' with attention statistics' if args.stats else ''}, "
          f"device {args.device}", flush=True)
    with tqdm(total=steps_of(args.top_k, block_sizes, len(batches), args.stats), desc="sweep", unit="batch") as bar:
        table = budget_sweep(model, batches, args.top_k, block_sizes, stats=args.stats, progress=bar.update)
    for r in table:
        budget = "" if r["mode"] == "full" else f" top_k {r['top_k']:>4} x bs {r['block_size']:>4}"
        print(f"{r['mode']:>6}{budget}  RF {r['receptive_field']:>7}  ppl {r['ppl']:.4f}")
    out = Path(args.out)
    paths = list(write_table(table, out))
    if not args.no_plot:
        paths.append(plot_sweep(table, out / "budget_sweep.png", title=Path(args.model).name))
    print("outputs: " + ", ".join(str(p) for p in paths))
    print(f"done in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
