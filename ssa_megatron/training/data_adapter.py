"""The data pipeline's ``TokenLoader`` behind the loop's iterator interface (``next()``, ``state_dict()``).

The data pipeline resolves ``recipe.data`` (``ssa_megatron.data.from_config.build_loaders``): ``builtin:stdlib``
builds (once, cached) the embedded default corpus and its BPE tokenizer; anything else is a shard directory or
brace pattern made by ``tools/prepare_data``. The held-out split is ``data.valid_shards`` or, when unset, the
``valid`` shards of the training set.
"""

from __future__ import annotations

from ssa_megatron.config import RecipeConfig


class LoaderStream:
    """An endless iterator over a TokenLoader (a one-pass held-out split starts over when exhausted); its state
    is the loader's, and loading a state restarts iteration at that position."""

    def __init__(self, loader):
        self.loader = loader
        self._it = None

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
        if self._it is not None:
            self._it.close()
            self._it = None
        self.loader.load_state_dict(state)

    @property
    def vocab_size(self) -> int:
        return self.loader.vocab_size


def build_token_loaders(recipe: RecipeConfig, dims) -> tuple[LoaderStream, LoaderStream | None]:
    """This rank's (train, held-out) streams from ``recipe.data`` (``ssa_megatron.data.build_loaders``); the
    held-out one is None when the data has no held-out split."""
    from ssa_megatron.data.from_config import build_loaders

    setup = build_loaders(recipe.data, recipe.model.seq_length, recipe.train.micro_batch_size,
                          recipe.model.vocab_size, dp_rank=dims.dp_rank, dp_world_size=dims.dp,
                          log=print if dims.is_main else _quiet)
    return LoaderStream(setup.train), (LoaderStream(setup.valid) if setup.valid is not None else None)


def packed_seq_params(batch: dict):
    """Document boundaries (``cu_seqlens`` over the flattened b·s stream) for ``ssa.document_mask``."""
    from ssa_megatron.megatron.attention import document_packed_seq_params

    return document_packed_seq_params(batch["cu_seqlens"], batch["tokens"].shape[1])


def _quiet(_line: str) -> None:
    pass
