#!/usr/bin/env python
"""Perplexity of an SSA model on held-out data under full and/or sparse inference.

    python tools/eval_ppl.py --model hf_out/ --data shards/ --mode both --top-k 16 --batches 32
    python tools/eval_ppl.py --model runs/tiny --data builtin:stdlib --mode sparse --top-k 4 --stats

--model is an HF folder (tools/convert_to_hf.py) or a Megatron run/checkpoint directory (converted in memory).
Prints one line per mode (and, with --stats, per-layer attention statistics of each mode's forward against
the sparse budget's selection); --out writes the results as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None) -> argparse.Namespace:
    from ssa_megatron.eval.cli import add_common_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--mode", default="both", choices=("full", "sparse", "both"))
    parser.add_argument("--top-k", type=int, default=None, help="sparse budget in blocks (default: the model's)")
    parser.add_argument("--block-size", type=int, default=None, help="sparse block size (default: the model's)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    from ssa_megatron.eval.cli import load_inputs
    from ssa_megatron.eval.perplexity import attention_statistics, perplexity

    started = time.perf_counter()
    model, batches = load_inputs(args)
    cfg = model.config
    top_k, block_size = args.top_k or cfg.ssa_top_k, args.block_size or cfg.ssa_block_size
    modes = ("full", "sparse") if args.mode == "both" else (args.mode,)
    rows, seq = sum(b["tokens"].shape[0] for b in batches), batches[0]["tokens"].shape[1]
    print(f"eval_ppl: {args.model} on {args.data}: {rows} rows x {seq} tokens, modes {', '.join(modes)}, "
          f"sparse budget top_k={top_k} x block_size={block_size} (receptive field {top_k * block_size}), "
          f"device {args.device}", flush=True)
    steps = len(batches) * len(modes) * (2 if args.stats else 1)
    results = {"model": str(args.model), "data": args.data, "seq_length": int(seq), "rows": int(rows)}
    with tqdm(total=steps, desc="eval", unit="batch") as bar:
        for mode in modes:
            model.set_attention_mode(mode, top_k=top_k, block_size=block_size)
            results[mode] = perplexity(model, batches, bar.update)
            if mode == "sparse":
                results[mode].update(top_k=top_k, block_size=block_size, receptive_field=top_k * block_size)
            if args.stats:  # the statistics of this mode's forward, against the selection of the sparse budget
                results.setdefault("attention_statistics", {})[mode] = attention_statistics(model, batches, bar.update)
    for mode in modes:
        r = results[mode]
        words = f", word ppl {r['word_ppl']:.4f} ({r['words']} words)" if "word_ppl" in r else ""
        print(f"{mode:>6}: ppl {r['ppl']:.4f}  loss {r['loss']:.4f} nats/token  ({r['tokens']} tokens){words}")
    for mode, layers in results.get("attention_statistics", {}).items():
        for layer in layers:
            print(f"{mode:>6} layer {layer['layer']:>3}: "
                  + "  ".join(f"{k} {v:.4f}" for k, v in layer.items() if k != "layer"))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print(f"results: {out}")
    print(f"done in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
