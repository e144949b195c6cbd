#!/usr/bin/env python
"""Megatron torch_dist checkpoint -> Hugging Face folder (config.json, model.safetensors, tokenizer files).

    python tools/convert_to_hf.py runs/ssa_1b hf/ssa_1b                  # the run's latest checkpoint
    python tools/convert_to_hf.py runs/ssa_1b/checkpoints/step_00010000 hf/ssa_1b --dtype bf16 --mode full

Reads only the model tensors (not the optimizer state). The folder loads with stock transformers
(docs/hf_eval.md, "Loading an export anywhere"): a model trained with ``ssa.gate: none`` is written as a plain
``LlamaForCausalLM`` (full attention; SSA's sparse mode is not expressible in Llama, ``--keep-ssa-llama`` keeps
it), a gated one as ``ssa_llama`` with its modeling code in the folder
(``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``). Weights above ``--max-shard-size`` are
sharded.
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
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    parser.add_argument("--keep-ssa-llama", action="store_true",
                        help="write a gate-less model as ssa_llama (keeps sparse mode) instead of a plain Llama")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from ssa_megatron.hf.convert import megatron_checkpoint_to_hf
    from ssa_megatron.training.checkpoint import read_checkpoint_recipe, resolve_checkpoint

    started = time.perf_counter()
    ckpt = resolve_checkpoint(args.checkpoint)
    plain = read_checkpoint_recipe(ckpt)[0].ssa.gate == "none" and not args.keep_ssa_llama
    if plain and args.mode == "sparse":
        print("convert_to_hf: --mode sparse: this model has no gate (ssa.gate: none) and is written as a plain "
              "Llama, which has no sparse mode; add --keep-ssa-llama to write ssa_llama", file=sys.stderr)
        return 2
    what = ("plain LlamaForCausalLM (no gate: full attention only; SSA sparse mode is not expressible in Llama)"
            if plain else "ssa_llama + remote code (trust_remote_code=True; full and sparse mode)")
    print(f"convert_to_hf: {ckpt} -> {args.output} as {what}, dtype {args.dtype or 'as stored'}, "
          f"shards <= {args.max_shard_size}", flush=True)
    overrides = {k: v for k, v in (("ssa_mode", args.mode), ("ssa_top_k", args.top_k),
                                   ("ssa_block_size", args.block_size)) if v is not None}
    out = megatron_checkpoint_to_hf(ckpt, args.output, dtype=args.dtype, tokenizer=args.tokenizer,
                                    plain_llama=plain, max_shard_size=args.max_shard_size, **overrides)
    files = sorted(p.name for p in out.iterdir())
    print(f"wrote {out}: {', '.join(files)} in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
