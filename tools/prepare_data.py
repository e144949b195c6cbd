#!/usr/bin/env python
"""Tokenize text / jsonl / directories into packed WebDataset shards, or into Megatron .bin/.idx indexed datasets.

    python tools/prepare_data.py corpus/ --tokenizer tokenizer.json --seq-length 8192 --output shards/ \\
        --valid-fraction 0.005
    python tools/prepare_data.py corpus/ --tokenizer tokenizer.json --format megatron --output mydata/ \\
        --valid-fraction 0.005          # mydata/{train,valid}.{bin,idx}; no --seq-length (cut when read)

WebDataset rows hold seq_length + 1 tokens; documents are EOS-separated and their bounds are stored for document
masking. --layout padded puts whole documents in rows and pads the rest (the authors' preprocessing). Megatron datasets hold one EOS-terminated sequence per document. Interrupted runs resume when rerun with
the same arguments. See docs/data.md.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import warnings
from pathlib import Path

from ssa_megatron.data.documents import DOC_SPLITS, InputError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="text or .jsonl files (.gz allowed) and directories")
    parser.add_argument("--output", "-o", required=True, help="shard directory (created; resumable)")
    parser.add_argument("--tokenizer", required=True, help="a HF tokenizer.json (see tools/train_tokenizer.py)")
    parser.add_argument("--eos-token", default=None, help="end-of-sequence token (default: found in the tokenizer)")
    parser.add_argument("--format", choices=("webdataset", "megatron"), default="webdataset",
                        help="webdataset: packed tar shards + meta.json (default); megatron: train/valid .bin/.idx "
                             "indexed datasets (megatron.core IndexedDatasetBuilder) for data.format=megatron")
    parser.add_argument("--layout", choices=("packed", "padded"), default="packed",
                        help="webdataset rows: packed (documents run on across rows, no padding; default) or padded "
                             "(whole documents per row, the rest padding excluded from the loss: the authors' "
                             "preprocessing); docs/data.md")
    parser.add_argument("--seq-length", type=int, default=None,
                        help="training context; rows hold this + 1 tokens (webdataset only, required there)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--rows-per-shard", type=int, default=None, help="rows per tar shard")
    size.add_argument("--shard-mb", type=float, default=64.0, help="target shard size in MiB (default 64)")
    parser.add_argument("--valid-fraction", type=float, default=0.0,
                        help="share of documents (by content hash) written to valid-*.tar (default 0)")
    parser.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: one per CPU)")
    parser.add_argument("--doc-split", choices=DOC_SPLITS, default="file",
                        help="what a document is in plain-text files (jsonl: one per line); default file")
    parser.add_argument("--text-key", default="text", help="jsonl field holding the text (default text)")
    parser.add_argument("--extensions", nargs="+", default=None,
                        help="file endings read from directories (default: common text and source files)")
    parser.add_argument("--max-mb", type=float, default=None, help="read at most this many MB of input")
    parser.add_argument("--unit-mb", type=float, default=4.0, help="input MB per work unit (default 4)")
    parser.add_argument("--encoding-errors", choices=("strict", "replace"), default="strict",
                        help="invalid UTF-8: stop with an error naming the file (strict) or substitute U+FFFD")
    parser.add_argument("--overwrite", action="store_true", help="replace shards made with other settings")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.format == "megatron":
        if args.layout != "packed":
            parser.error("--layout padded is for --format webdataset; Megatron data is cut into samples by "
                         "megatron.core when it is read (packed)")
        if args.seq_length is not None or args.rows_per_shard is not None or args.shard_mb != 64.0:
            parser.error("--seq-length, --rows-per-shard and --shard-mb are for --format webdataset; Megatron data is "
                         "cut into samples when it is read (model.seq_length)")
    elif args.seq_length is None:
        parser.error("--seq-length is required for --format webdataset (the rows are packed for it)")
    elif args.seq_length < 1:
        parser.error(f"--seq-length {args.seq_length}: must be >= 1")
    if not 0.0 <= args.valid_fraction < 1.0:
        parser.error(f"--valid-fraction {args.valid_fraction}: must be in [0, 1)")
    for flag, value in (("--shard-mb", args.shard_mb), ("--unit-mb", args.unit_mb), ("--max-mb", args.max_mb)):
        if value is not None and not (math.isfinite(value) and value > 0):
            parser.error(f"{flag} {value}: must be a number > 0")
    if args.rows_per_shard is not None and args.rows_per_shard < 1:
        parser.error(f"--rows-per-shard {args.rows_per_shard}: must be >= 1")
    if args.workers is not None and args.workers < 0:
        parser.error(f"--workers {args.workers}: must be >= 0 (0 tokenizes in this process)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from ssa_megatron.data.prepare import prepare_shards
    from ssa_megatron.data.tokenizer import load_tokenizer

    common = dict(valid_fraction=args.valid_fraction, workers=args.workers, doc_split=args.doc_split,
                  text_key=args.text_key, extensions=args.extensions, unit_mb=args.unit_mb,
                  max_bytes=None if args.max_mb is None else int(args.max_mb * 1e6),
                  encoding_errors=args.encoding_errors, overwrite=args.overwrite, progress=not args.no_progress)
    try:
        tokenizer = load_tokenizer(args.tokenizer, eos_token=args.eos_token)
        if args.format == "megatron":
            # megatron.core's import notes (no Apex/TE, no CUDA runtime) are irrelevant to writing files.
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
            warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
            from ssa_megatron.data.megatron_indexed import prepare_indexed

            summary = prepare_indexed(args.inputs, args.output, tokenizer, **common)
        else:
            summary = prepare_shards(args.inputs, args.output, tokenizer, args.seq_length,
                                     rows_per_shard=args.rows_per_shard, shard_mb=args.shard_mb, layout=args.layout,
                                     **common)
    except KeyboardInterrupt:
        print(f"prepare_data: interrupted; rerun the same command to resume into {args.output}", file=sys.stderr)
        return 130
    except (InputError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"prepare_data: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.output).resolve()
    if args.format == "megatron":
        written = " + ".join(f"{s}.bin/.idx" for s in ("train", "valid") if summary.documents.get(s))
        print(f"prepare_data: wrote {written} + dataset.json + tokenizer.json to {out} (recipe: "
              f"data.train_shards={out})")
    else:
        print(f"prepare_data: wrote {sum(summary.shards.values())} shards + meta.json + tokenizer.json to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
