"""Arguments and set-up shared by tools/eval_ppl.py, tools/budget_sweep.py and tools/study_report.py."""

from __future__ import annotations

import argparse

import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="HF folder (tools/convert_to_hf.py) or a Megatron run / checkpoint directory")
    add_data_args(parser, data_required=True)


def add_data_args(parser: argparse.ArgumentParser, data_required: bool) -> None:
    """The held-out data and evaluation settings (tools/study_report.py takes these without --model)."""
    parser.add_argument("--data", required=data_required,
                        help="token shards (directory or brace pattern; held-out split), 'builtin:stdlib' "
                             "(the model's training corpus), or a text file (with --tokenizer)")
    parser.add_argument("--split", default="valid", choices=("valid", "train"), help="shard split (default valid)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json for a text file (default: the model's)")
    parser.add_argument("--seq-length", type=int, default=None,
                        help="tokens per row (shards: must match their packing; text default 1024)")
    parser.add_argument("--batch-size", type=int, default=1, help="rows per forward (default 1)")
    parser.add_argument("--batches", type=int, default=16, help="batches to evaluate (default 16; 0: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=tuple(_DTYPES), help="cast the model (default: as saved)")
    parser.add_argument("--stats", action="store_true",
                        help="also compute attention statistics (O(s^2) memory per head)")


def load_inputs(args):
    """(model, batches) from the parsed common arguments."""
    from pathlib import Path

    from ssa_megatron.eval.data import eval_batches
    from ssa_megatron.eval.perplexity import load_model

    model = load_model(args.model, args.device, _DTYPES.get(args.dtype))
    tokenizer = args.tokenizer
    if tokenizer is None and (Path(args.model) / "tokenizer.json").is_file():
        tokenizer = str(Path(args.model) / "tokenizer.json")
    batches = eval_batches(args.data, args.batch_size, args.batches or None, seq_length=args.seq_length,
                           tokenizer=tokenizer, split=args.split, recipe_data=model.config.megatron_recipe)
    return model, batches
