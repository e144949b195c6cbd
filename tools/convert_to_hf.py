#!/usr/bin/env python
"""Megatron torch_dist checkpoint -> Hugging Face folder (config.json, model.safetensors, tokenizer files).

    python tools/convert_to_hf.py runs/ssa_1b hf/ssa_1b                  # the run's latest checkpoint
    python tools/convert_to_hf.py runs/ssa_1b/checkpoints/step_00010000 hf/ssa_1b --dtype bf16 --mode full

Reads only the model tensors (not the optimizer state). Load the result with
``import ssa_megatron.hf; AutoModelForCausalLM.from_pretrained("hf/ssa_1b")``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="run directory, its checkpoints/ directory, or one step_XXXXXXXX dir")
    parser.add_argument("output", help="HF folder to write (created)")
    parser.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"), help="cast (default: as stored)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json to ship (default: the run's, if found)")
    parser.add_argument("--mode", default=None, choices=("full", "sparse"), help="default inference mode")
    parser.add_argument("--top-k", type=int, default=None, help="default sparse budget in blocks")
    parser.add_argument("--block-size", type=int, default=None, help="default sparse block size")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from ssa_megatron.hf.convert import megatron_checkpoint_to_hf
    from ssa_megatron.training.checkpoint import resolve_checkpoint

    started = time.perf_counter()
    ckpt = resolve_checkpoint(args.checkpoint)
    print(f"convert_to_hf: {ckpt} -> {args.output} (dtype {args.dtype or 'as stored'})", flush=True)
    overrides = {k: v for k, v in (("ssa_mode", args.mode), ("ssa_top_k", args.top_k),
                                   ("ssa_block_size", args.block_size)) if v is not None}
    out = megatron_checkpoint_to_hf(ckpt, args.output, dtype=args.dtype, tokenizer=args.tokenizer, **overrides)
    files = sorted(p.name for p in out.iterdir())
    print(f"wrote {out}: {', '.join(files)} in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
