"""``build_loaders``: this data-parallel rank's train and held-out streams for a recipe, what the training loop
calls once.

``data.train_shards`` is ``builtin:stdlib`` (the embedded default corpus and its BPE tokenizer, built once and
cached), a shard directory or brace pattern made by ``tools/prepare_data.py``, ``synthetic[:<seed>]``
(deterministic synthetic tokens for tests and benchmarks), or with ``data.format: megatron`` (or ``auto``, which
recognises them) a Megatron ``.bin/.idx`` prefix or weighted blend (``megatron_loader.py``). The held-out split is
``data.valid_shards`` or, when unset, the ``valid`` shards (prefixes) beside the training set, or for Megatron data
``data.split``.

A stream yields dicts of ``[micro_batch, seq]`` tensors -- ``tokens``, ``labels``, ``position_ids``, ``loss_mask``
(and ``cu_seqlens`` for document masking) -- and has ``state_dict()`` / ``load_state_dict()``, so a resumed run
continues at the exact next batch. Every rank of one data-parallel replica (its TP, CP and PP ranks) reads the
same batches; data-parallel replicas read disjoint ones.
"""

from __future__ import annotations

import atexit
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..config import RecipeConfig
from .builtin import BUILTIN_NAME, ensure_builtin_corpus
from .loader import TokenLoader
from .shards import resolve_shards
from .synthetic import SyntheticTokens
from .tokenizer import tokenizer_hash


DATA_HINT = ("make shards with tools/prepare_data.py (docs/data.md), or use data.train_shards=builtin:stdlib; "
             "--debug shows the traceback")


class DataSourceError(FileNotFoundError):
    """A recipe's data path does not exist. The message names the recipe key and the path itself."""

    hint = DATA_HINT


class EmptyDatasetError(ValueError):
    """A shard set with no shards (e.g. prepared from empty input)."""

    hint = DATA_HINT


def check_data_path(key: str, value: str) -> None:
    """A plain path (no brace, glob or URL) must exist; without this check a missing directory is reported as a
    missing meta.json of its parent."""
    text = os.path.expanduser(value)
    if "://" in text or text.startswith("pipe:") or any(c in text for c in "{}*?["):
        return  # patterns: resolve_shards names what they fail to match
    if not os.path.exists(text):
        raise DataSourceError(f"{key}={value!r}: no such file or directory; expected a shard directory made by "
                              "tools/prepare_data.py, a shard path or pattern, a Megatron .bin/.idx prefix or "
                              "blend, builtin:stdlib or synthetic[:<seed>]")


@dataclass
class DataSetup:
    """The rank's streams and where their tokens come from."""

    train: "LoaderStream | SyntheticTokens"
    valid: "LoaderStream | SyntheticTokens | None"
    """Held-out batches in a fixed order, cycling (load a state saved before the first evaluation to replay the
    same batches). None when the data has no held-out split."""
    tokenizer_path: Optional[Path]
    """The tokenizer that made the shards (None for synthetic tokens)."""
    train_source: str


def build_loaders(recipe: RecipeConfig, dp_rank: int = 0, dp_world_size: int = 1,
                  log: Callable[[str], None] = print) -> DataSetup:
    """This data-parallel rank's (train, held-out) streams for ``recipe.data``.

    Resolves ``data.train_shards`` (building the embedded corpus on first use). ``model.vocab_size`` is the
    model's (padded) vocabulary: every token id of the shards must be below it; with builtin data and no
    ``data.tokenizer`` it is also the size of the BPE trained on the corpus.
    """
    m, data = recipe.model, recipe.data
    if data.train_shards.startswith("synthetic"):
        # "synthetic" (or "synthetic:<seed>"); the held-out stream uses another seed.
        seed = int(data.train_shards.split(":", 1)[1]) if ":" in data.train_shards else data.seed

        def stream(offset: int) -> SyntheticTokens:
            return SyntheticTokens(vocab_size=m.vocab_size, seq_length=m.seq_length,
                                   micro_batch_size=recipe.train.micro_batch_size, seed=seed + offset,
                                   dp_rank=dp_rank)

        return DataSetup(stream(0), stream(1_000_003), None, data.train_shards)

    if data_format(data) == "megatron":
        from .megatron_loader import build_megatron_streams

        train, valid, tokenizer_path = build_megatron_streams(recipe, dp_rank, dp_world_size, log)
        return DataSetup(LoaderStream(train), LoaderStream(valid) if valid is not None else None, tokenizer_path,
                         data.train_shards)

    if data.train_shards == BUILTIN_NAME:
        shard_dir, tokenizer_path = ensure_builtin_corpus(
            data.cache_dir, m.seq_length, m.vocab_size, tokenizer_path=data.tokenizer, max_mb=data.builtin_max_mb,
            valid_fraction=data.valid_fraction, log=log)
        source = str(shard_dir)
    else:
        source = data.train_shards
        check_data_path("data.train_shards", source)
        if data.tokenizer:
            check_data_path("data.tokenizer", data.tokenizer)
        shards, _ = resolve_shards(source)
        if not shards:
            raise EmptyDatasetError(f"data.train_shards={source!r}: the shard set lists no shards (was it prepared "
                                    "from empty input?); it needs at least one train shard")
        if data.tokenizer:
            tokenizer_path = Path(data.tokenizer).expanduser()
        else:
            # prepare_data copies the tokenizer beside the shards; training needs only meta.json's vocab_size.
            tokenizer_path = Path(shards[0].path).parent / "tokenizer.json"
            if not tokenizer_path.is_file():
                tokenizer_path = None
    expected_hash = tokenizer_hash(tokenizer_path) if data.tokenizer else None
    common = dict(seq_length=m.seq_length, micro_batch_size=recipe.train.micro_batch_size, dp_rank=dp_rank,
                  dp_world_size=dp_world_size, seed=data.seed, shuffle_shards=data.shuffle_shards,
                  skip_corrupt_shards=data.skip_corrupt_shards, verify_checksums=data.verify_checksums,
                  tokenizer_hash=expected_hash)
    train = TokenLoader(source, num_workers=data.num_workers, split="train", **common)
    if train.vocab_size > m.vocab_size:
        raise ValueError(f"data.train_shards={data.train_shards!r}: the tokenizer has {train.vocab_size} ids but "
                         f"model.vocab_size={m.vocab_size}; raise model.vocab_size to at least {train.vocab_size}")
    valid_source = data.valid_shards or source
    if data.valid_shards:
        check_data_path("data.valid_shards", data.valid_shards)
    try:
        valid = TokenLoader(valid_source, num_workers=0, split="valid", infinite=True, **common)
    except ValueError as err:
        if data.valid_shards:
            raise
        log(f"data: no held-out split in {source} ({err}); evaluation is off")
        valid = None
    return DataSetup(LoaderStream(train), LoaderStream(valid) if valid is not None else None, tokenizer_path,
                     source)


def data_format(data) -> str:
    """``data.format``, with ``auto`` resolved: megatron for a weighted blend, or for names of .bin/.idx prefixes or
    of directories written by ``prepare_data --format megatron``; else webdataset."""
    from .megatron_indexed import looks_indexed

    builtin = data.train_shards == BUILTIN_NAME or data.train_shards.startswith("synthetic")
    if data.format == "megatron" and builtin:
        raise ValueError(f"data.format=megatron with data.train_shards={data.train_shards!r}: Megatron data is a "
                         ".bin/.idx prefix or a blend 'W1 PREFIX1 W2 PREFIX2 ...'")
    found = data.format if data.format != "auto" else "megatron" if looks_indexed(data.train_shards) else "webdataset"
    if found == "webdataset" and data.split:
        raise ValueError(f"data.split={data.split!r} is for Megatron data (data.format=megatron); WebDataset shards "
                         "carry their held-out split (prepare_data --valid-fraction) or take data.valid_shards")
    return found


def _close_at_exit(ref: "weakref.ref[LoaderStream]") -> None:
    stream = ref()
    if stream is not None:
        stream.close()


class LoaderStream:
    """A ``TokenLoader`` or ``MegatronLoader`` as an endless iterator (a one-pass held-out split starts over when
    exhausted); its state is the loader's, and loading a state restarts iteration at that position."""

    def __init__(self, loader: "TokenLoader | MegatronLoader"):
        self.loader = loader
        self._it = None
        # A stream still open at interpreter exit: multiprocessing's exit handler would SIGTERM the DataLoader
        # workers, which ignore it (loader.WORKER_IGNORED_SIGNALS), then wait for them forever. Exit handlers run
        # last-registered first, so this one stops the workers before that.
        atexit.register(_close_at_exit, weakref.ref(self))

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            self._it = iter(self.loader)
        try:
            return next(self._it)
        except StopIteration:
            self._it = iter(self.loader)
            return next(self._it)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.loader.load_state_dict(state)

    def close(self) -> None:
        """Stops iterating (and the loader's DataLoader workers); the next batch starts a new iteration."""
        if self._it is not None:
            self._it.close()
            self._it = None

    @property
    def vocab_size(self) -> int:
        return self.loader.vocab_size
