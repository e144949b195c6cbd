#!/usr/bin/env python
"""Hugging Face folder (ssa_llama) -> Megatron torch_dist checkpoint that a training run can start from.

    python tools/convert_from_hf.py hf/ssa_1b ckpt/ssa_1b_init
    ssa-train ssa_1b checkpoint.load=ckpt/ssa_1b_init

Writes <output>/step_00000000 (model weights, recipe, step 0; no optimizer state) and a ``latest`` marker. The
model shape comes from config.json; --recipe names a recipe to check it against and to store instead of the one
recorded in config.json (megatron_recipe). Runs on one process (CPU is fine); torch_dist reshards on load.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_folder", help="folder with config.json (model_type ssa_llama) and *.safetensors")
    parser.add_argument("output", help="checkpoint directory to write")
    parser.add_argument("--recipe", default=None, help="recipe name or YAML to check against and store")
    parser.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"),
                        help="parameter dtype of the checkpoint (default: that of the HF weights)")
    parser.add_argument("overrides", nargs="*", help="a.b=c overrides of --recipe")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from ssa_megatron.config import load_recipe
    from ssa_megatron.hf.convert import hf_to_megatron_checkpoint

    started = time.perf_counter()
    recipe = load_recipe(args.recipe, args.overrides) if args.recipe else None
    print(f"convert_from_hf: {args.hf_folder} -> {args.output} (recipe: {args.recipe or 'from config.json'})",
          flush=True)
    path = hf_to_megatron_checkpoint(args.hf_folder, args.output, recipe=recipe, precision=args.precision)
    print(f"wrote {path} (+ {Path(args.output) / 'latest'}) in {time.perf_counter() - started:.1f}s; "
          f"train from it with checkpoint.load={args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
