#!/usr/bin/env python
"""Continued SSA training / fine-tuning of a Hugging Face model, without Megatron (ssa_megatron/hf/finetune.py).

    # a stock Llama folder (or an export of this project) -> an SSA model, plain torch loop (one process)
    python tools/finetune_hf.py hf/llama out/llama_ssa data.train_shards=/data/shards train.steps=200
    # DeepSpeed ZeRO-2 on 8 GPUs
    deepspeed --num_gpus 8 tools/finetune_hf.py hf/ssa_1b out/ssa_1b_ft --deepspeed tools/ds_zero2.json \\
        data.train_shards=/data/shards train.steps=1000 train.global_batch_size=64

The recipe is the one stored in the input's config.json (an export of this project) or one derived from it (any
Llama folder: ssa.gate none, the default SSA settings); a.b=c overrides change it (ssa.*, data.*, train.*,
optim.*; model.* must still match the weights). Writes <output>/step_XXXXXXXX (each an ssa_llama export folder
that loads with AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)) and <output>/latest.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="HF folder: an ssa_llama export or a Llama (model_type llama) checkpoint")
    parser.add_argument("output", help="directory for step_XXXXXXXX export folders and the latest marker")
    parser.add_argument("--deepspeed", default=None, metavar="JSON",
                        help="DeepSpeed config (tools/ds_zero2.json); batch keys and precision come from the recipe. "
                             "Default: the plain torch loop, one process")
    parser.add_argument("--save-interval", type=int, default=0, help="also save every N steps (default: at the end)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    parser.add_argument("overrides", nargs="*", help="a.b=c recipe overrides")
    return parser.parse_intermixed_args(argv)  # options may sit between the overrides


def main(argv=None) -> int:
    args = parse_args(argv)
    from ssa_megatron.hf.finetune import finetune

    started = time.perf_counter()
    try:
        path, history = finetune(args.model, args.output, args.overrides, deepspeed=args.deepspeed,
                                 save_interval=args.save_interval, log=lambda s: print(s, flush=True))
    except ValueError as err:
        print(f"finetune_hf: error: {err}", file=sys.stderr)
        return 2
    last = history[-1]
    print(f"finetune_hf: {len(history)} steps in {time.perf_counter() - started:.1f}s, last loss {last.loss:.4f}; "
          f"model in {path} (load with trust_remote_code=True, or import ssa_megatron.hf)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
