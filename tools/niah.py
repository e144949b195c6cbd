#!/usr/bin/env python
"""Needle in a haystack (passkey retrieval) at several context lengths and needle depths, full and sparse inference,
with a heat map per mode.

    python tools/niah.py --model hf_out/ --contexts 4096 8192 16384 32768 --depths 0 0.25 0.5 0.75 1 \\
        --trials 5 --out runs/ssa_1b/niah
    python tools/niah.py --model runs/tiny --contexts 256 512 --depths 0 0.5 1 --max-new-tokens 4

--model is an HF folder or a Megatron run/checkpoint directory (converted in memory); the tokenizer is --tokenizer,
else the HF folder's tokenizer.json, else the one the run trained with (its recipe's). Contexts past the training
length test extrapolation (the model's own RoPE scaling applies). Prints the accuracy per mode and context; --out writes niah.json (every answer),
niah_summary.json and niah.png there (ssa_megatron/eval/niah.py says how prompts are built and scored).
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
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the HF folder's)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384, 32768],
                        help="prompt lengths in tokens (default 4096 8192 16384 32768)")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                        help="needle depths in [0, 1] (default 0 0.25 0.5 0.75 1)")
    parser.add_argument("--trials", type=int, default=1, help="passkeys per cell (default 1)")
    parser.add_argument("--mode", default="both", choices=("full", "sparse", "both"))
    parser.add_argument("--haystack", default=None,
                        help="a text file whose tokens form the haystack (default: the passkey filler sentences)")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="tokens generated per answer (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="passkey seed (default 0)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"), help="cast the model")
    parser.add_argument("--out", default=None, help="directory for niah.json, niah_summary.json and niah.png")
    args = parser.parse_args(argv)
    if args.trials < 1:
        parser.error(f"--trials {args.trials}: must be >= 1")
    if min(args.contexts) < 1:
        parser.error(f"--contexts {args.contexts}: each must be >= 1")
    if not all(0.0 <= d <= 1.0 for d in args.depths):
        parser.error(f"--depths {args.depths}: each must be in [0, 1]")
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")
    return args


def find_model_tokenizer(model_path: str, given: str | None, model) -> str:
    """--tokenizer, else the HF folder's tokenizer.json, else the one the run trained with (its recipe)."""
    from ssa_megatron.hf.convert import find_tokenizer

    if given:
        return given
    if (Path(model_path) / "tokenizer.json").is_file():
        return str(Path(model_path) / "tokenizer.json")
    found = find_tokenizer(model.config.megatron_recipe)
    if found is None:
        raise ValueError(f"--model {model_path}: no tokenizer.json beside it and none found from its recipe; pass "
                         "--tokenizer")
    return str(found)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from tqdm import tqdm

    from ssa_megatron.data.tokenizer import Tokenizer
    from ssa_megatron.eval.niah import accuracy_grid, needle_in_a_haystack, write_results
    from ssa_megatron.eval.perplexity import load_model

    started = time.perf_counter()
    try:
        model = load_model(args.model, args.device,
                           {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype))
        tok = Tokenizer(find_model_tokenizer(args.model, args.tokenizer, model))
    except (ValueError, FileNotFoundError) as err:
        print(f"niah: error: {err}", file=sys.stderr)
        return 2
    modes = ("full", "sparse") if args.mode == "both" else (args.mode,)
    contexts, depths = sorted(set(args.contexts)), sorted(set(args.depths))
    cfg = model.config
    print(f"niah: {args.model}: contexts {', '.join(map(str, contexts))}, depths "
          f"{', '.join(f'{d:g}' for d in depths)}, {args.trials} passkey(s) per cell, modes {', '.join(modes)} "
          f"(sparse top_k={cfg.ssa_top_k} x block_size={cfg.ssa_block_size}), device {args.device}", flush=True)
    try:
        with tqdm(total=len(contexts) * len(depths) * args.trials * len(modes), desc="niah", unit="prompt") as bar:
            rows = needle_in_a_haystack(model, tok, contexts, depths=depths, trials=args.trials, modes=modes,
                                        haystack=args.haystack, seed=args.seed, max_new_tokens=args.max_new_tokens,
                                        progress=bar.update)
    except ValueError as err:
        print(f"niah: error: {err}", file=sys.stderr)
        return 2
    for mode in modes:
        ctx, _, grid = accuracy_grid(rows, mode)
        per_context = [sum(line[i] for line in grid) / len(grid) for i in range(len(ctx))]
        print(f"{mode:>6}: " + "  ".join(f"{c}: {a:.0%}" for c, a in zip(ctx, per_context)))
    if args.out:
        written = write_results(Path(args.out), rows)
        print(f"outputs: {', '.join(str(p) for p in written)}")
    print(f"done in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
