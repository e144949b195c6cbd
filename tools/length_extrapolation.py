#!/usr/bin/env python
"""Perplexity at multiples of the training length (length extrapolation), under full and sparse inference.

    python tools/length_extrapolation.py --model hf_out/ --data pg19_test.txt --tokenizer hf_out/tokenizer.json \\
        --factors 1 2 4 8 --rows 4 --out runs/ssa_1b/length_extrapolation
    python tools/length_extrapolation.py --model runs/tiny --data builtin:stdlib --factors 1 2 4 --rows 2

--model is an HF folder or a Megatron run/checkpoint directory; the training length is the model's recipe
seq_length (--train-length overrides). Each length scores the same tokens: --rows rows of the longest length,
cut into shorter rows at the smaller lengths, positions 0..L-1 over each row (ssa_megatron/eval/extrapolation.py).
RoPE scaling, if any, is the model's own (model.rope_scaling of its recipe, rope_parameters of an HF config).
Prints one line per length and mode; --out writes length_extrapolation.csv/.json/.png there.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None) -> argparse.Namespace:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF folder or a Megatron run / checkpoint directory")
    parser.add_argument("--data", required=True,
                        help="a long text file (with --tokenizer), token shards (held-out split) or 'builtin:stdlib'")
    parser.add_argument("--split", default="valid", choices=("valid", "train"), help="shard split (default valid)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json for a text file (default: the model's)")
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="multiples of the training length (default 1 2 4 8)")
    parser.add_argument("--rows", type=int, default=2, help="rows of the longest length (default 2)")
    parser.add_argument("--train-length", type=int, default=None,
                        help="the training length (default: the model's recipe seq_length)")
    parser.add_argument("--mode", default="both", choices=("full", "sparse", "both"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"), help="cast the model")
    parser.add_argument("--out", default=None, help="directory for the CSV, JSON and plot")
    args = parser.parse_args(argv)
    if args.rows < 1:
        parser.error(f"--rows {args.rows}: must be >= 1")
    if min(args.factors) < 1:
        parser.error(f"--factors {args.factors}: each must be >= 1")
    if args.train_length is not None and args.train_length < 1:
        parser.error(f"--train-length {args.train_length}: must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from tqdm import tqdm

    from ssa_megatron.eval.extrapolation import length_extrapolation, training_length, write_results
    from ssa_megatron.eval.perplexity import load_model

    started = time.perf_counter()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)
    try:
        model = load_model(args.model, args.device, dtype)
    except ValueError as err:
        print(f"length_extrapolation: error: {err}", file=sys.stderr)
        return 2
    tokenizer = args.tokenizer
    if tokenizer is None and (Path(args.model) / "tokenizer.json").is_file():
        tokenizer = str(Path(args.model) / "tokenizer.json")
    length = args.train_length or training_length(model)
    modes = ("full", "sparse") if args.mode == "both" else (args.mode,)
    factors = sorted(set(args.factors))
    cfg = model.config
    print(f"length_extrapolation: {args.model} on {args.data}: training length {length}, lengths "
          f"{', '.join(str(f * length) for f in factors)}, {args.rows} rows of {factors[-1] * length} tokens' worth "
          f"each, modes {', '.join(modes)} (sparse top_k={cfg.ssa_top_k} x block_size={cfg.ssa_block_size}), "
          f"RoPE {cfg.rope_parameters.get('rope_type', 'default')}, device {args.device}", flush=True)
    steps = sum(args.rows * (factors[-1] * length + 1) // (f * length + 1) for f in factors) * len(modes)
    try:
        with tqdm(total=steps, desc="eval", unit="row") as bar:
            rows = length_extrapolation(model, args.data, factors=factors, rows=args.rows, modes=modes,
                                        train_length=length, tokenizer=tokenizer, split=args.split,
                                        progress=bar.update)
    except ValueError as err:
        print(f"length_extrapolation: error: {err}", file=sys.stderr)
        return 2
    for r in rows:
        print(f"{r['factor']:>3}x {r['seq_length']:>7} tokens {r['mode']:>6}: ppl {r['ppl']:.4f}  loss "
              f"{r['loss']:.4f}  ({r['tokens']} tokens)")
    if args.out:
        written = write_results(Path(args.out), rows)
        print(f"outputs: {', '.join(str(p) for p in written)}")
    print(f"done in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
