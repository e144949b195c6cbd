"""Data pipeline: tokenizer, packing, WebDataset shards, the resumable loader, the embedded default corpus, and
the streams the training loop reads.

Modules (imported lazily, so tokenizer worker processes do not pay for torch):
  tokenizer   load_tokenizer(path) -> Tokenizer; train_bpe(files_or_texts, vocab_size, output_path) -> Path
  documents   text / jsonl / directory inputs -> documents, cut into work units
  packing     RowPacker (documents -> rows of seq_length + 1 tokens + bounds); batch_from_rows (rows -> tensors)
  shards      tar layout, meta.json, read_shard (validated), resolve_shards
  prepare     prepare_shards(inputs, output_dir, tokenizer, seq_length, ...): multiprocess, resumable
  loader      TokenLoader: deterministic, resumable micro-batches per data-parallel rank
  builtin     ensure_builtin_corpus(cache_dir, seq_length, vocab_size) -> (shard_dir, tokenizer_path)
  synthetic   SyntheticTokens: deterministic synthetic token rows (tests, benchmarks)
  from_config build_loaders(recipe, dp_rank, dp_world_size) -> DataSetup (this rank's train and held-out streams)
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Tokenizer": "tokenizer", "load_tokenizer": "tokenizer", "train_bpe": "tokenizer",
    "prepare_shards": "prepare", "PrepareSummary": "prepare",
    "TokenLoader": "loader",
    "CorruptShardError": "shards", "read_meta": "shards",
    "batch_from_rows": "packing",
    "ensure_builtin_corpus": "builtin", "BUILTIN_NAME": "builtin",
    "SyntheticTokens": "synthetic",
    "build_loaders": "from_config", "DataSetup": "from_config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
