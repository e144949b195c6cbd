#!/usr/bin/env python
"""Train a byte-level BPE tokenizer.json (deterministic) on text / jsonl / directories.

    python tools/train_tokenizer.py corpus/ --vocab-size 32000 --output tokenizer.json

Special tokens come first: <|endoftext|> (id 0, the end-of-sequence token) and <|pad|> (id 1).
The same inputs in the same order always give the same file.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ssa_megatron.data.documents import DOC_SPLITS, InputError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="text or .jsonl files (.gz allowed) and directories")
    parser.add_argument("--output", "-o", required=True, help="tokenizer.json to write")
    parser.add_argument("--vocab-size", type=int, required=True, help="ids, specials and 256 byte tokens included")
    parser.add_argument("--min-frequency", type=int, default=2, help="pairs seen fewer times are not merged")
    parser.add_argument("--special-tokens", nargs="+", default=["<|endoftext|>", "<|pad|>"],
                        help="added first; the first one is the end-of-sequence token")
    parser.add_argument("--doc-split", choices=DOC_SPLITS, default="file",
                        help="what a document is in plain-text files (jsonl: one per line)")
    parser.add_argument("--text-key", default="text", help="jsonl field holding the text")
    parser.add_argument("--extensions", nargs="+", default=None, help="file endings read from directories")
    parser.add_argument("--max-mb", type=float, default=None, help="train on at most this many MB (in order)")
    parser.add_argument("--encoding-errors", choices=("strict", "replace"), default="strict")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.vocab_size < 256 + len(args.special_tokens):
        parser.error(f"--vocab-size {args.vocab_size}: must be >= 256 byte tokens + "
                     f"{len(args.special_tokens)} special tokens")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    from ssa_megatron.data.documents import list_input_files, plan_units, read_unit
    from ssa_megatron.data.tokenizer import load_tokenizer, train_bpe

    started = time.perf_counter()
    try:
        files = list_input_files(args.inputs, args.extensions)
        units = plan_units(files, args.doc_split, unit_bytes=16 << 20,
                           max_bytes=None if args.max_mb is None else int(args.max_mb * 1e6))
        total = sum(u.num_bytes for u in units)
        print(f"train_tokenizer: byte-level BPE, vocab {args.vocab_size}, on {len(files)} files "
              f"({total / 1e6:.1f} MB) -> {args.output}")
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="read", disable=args.no_progress)

        def texts():
            for unit in units:
                yield from read_unit(unit, args.doc_split, args.text_key, args.encoding_errors)
                bar.update(unit.num_bytes)

        path = train_bpe(texts(), args.vocab_size, args.output, min_frequency=args.min_frequency,
                         special_tokens=args.special_tokens, show_progress=not args.no_progress)
        bar.close()
        tokenizer = load_tokenizer(path, eos_token=args.special_tokens[0])
    except (InputError, FileNotFoundError, ValueError) as err:
        print(f"train_tokenizer: error: {err}", file=sys.stderr)
        return 2
    print(f"train_tokenizer: wrote {Path(path).resolve()} (vocab {tokenizer.vocab_size}, eos "
          f"{tokenizer.eos_token!r}={tokenizer.eos_id}, sha256 {tokenizer.hash[:12]}) in "
          f"{time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
