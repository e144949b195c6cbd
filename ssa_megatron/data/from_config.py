"""Loaders from a recipe's ``data`` section: what the training loop calls once per rank."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..config import DataConfig
from .builtin import BUILTIN_NAME, ensure_builtin_corpus
from .loader import TokenLoader
from .shards import resolve_shards
from .tokenizer import tokenizer_hash


@dataclass
class DataSetup:
    """The rank's loaders and the tokenizer that made their shards."""

    train: TokenLoader
    valid: Optional[TokenLoader]
    """Held-out batches in a fixed order, cycling; call ``valid.rewind()`` before each evaluation. None when the
    data has no held-out split."""
    tokenizer_path: Path
    train_source: str


def build_loaders(data: DataConfig, seq_length: int, micro_batch_size: int, vocab_size: int, dp_rank: int = 0,
                  dp_world_size: int = 1, log: Callable[[str], None] = print) -> DataSetup:
    """Resolves ``data.train_shards`` (building the embedded corpus on first use) and makes this rank's loaders.

    Args:
        vocab_size: the model's (padded) vocabulary; every token id of the shards must be below it. With builtin
            data and no ``data.tokenizer`` it is also the size of the BPE trained on the corpus.
    """
    if data.train_shards == BUILTIN_NAME:
        shard_dir, tokenizer_path = ensure_builtin_corpus(
            data.cache_dir, seq_length, vocab_size, tokenizer_path=data.tokenizer, max_mb=data.builtin_max_mb,
            valid_fraction=data.valid_fraction, log=log)
        source = str(shard_dir)
    else:
        source = data.train_shards
        if data.tokenizer:
            tokenizer_path = Path(data.tokenizer).expanduser()
        else:
            # prepare_data copies the tokenizer beside the shards.
            first = resolve_shards(source)[0][0]
            tokenizer_path = Path(first.path).parent / "tokenizer.json"
    expected_hash = tokenizer_hash(tokenizer_path) if data.tokenizer else None
    common = dict(seq_length=seq_length, micro_batch_size=micro_batch_size, dp_rank=dp_rank,
                  dp_world_size=dp_world_size, seed=data.seed, shuffle_shards=data.shuffle_shards,
                  skip_corrupt_shards=data.skip_corrupt_shards, verify_checksums=data.verify_checksums,
                  tokenizer_hash=expected_hash)
    train = TokenLoader(source, num_workers=data.num_workers, split="train", **common)
    if train.vocab_size > vocab_size:
        raise ValueError(f"data.train_shards={data.train_shards!r}: the tokenizer has {train.vocab_size} ids but "
                         f"model.vocab_size={vocab_size}; raise model.vocab_size to at least {train.vocab_size}")
    valid_source = data.valid_shards or source
    try:
        valid = TokenLoader(valid_source, num_workers=0, split="valid", infinite=True, **common)
    except ValueError as err:
        if data.valid_shards:
            raise
        log(f"data: no held-out split in {source} ({err}); evaluation is off")
        valid = None
    return DataSetup(train, valid, tokenizer_path, source)
