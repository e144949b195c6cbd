"""The data pipeline's ``TokenLoader`` behind the loop's iterator interface (``next()``, ``state_dict()``).

``data.train_shards: builtin:stdlib`` builds (once, cached) the embedded default corpus and its BPE tokenizer;
anything else is a shard directory / brace pattern made by ``tools/prepare_data``. The held-out split is
``data.valid_shards`` or, when unset, the ``valid`` shards of the training set.
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


def build_token_loader(recipe: RecipeConfig, dims, split: str) -> LoaderStream:
    from ssa_megatron.data.builtin import BUILTIN_NAME, ensure_builtin_corpus
    from ssa_megatron.data.loader import TokenLoader

    m, data = recipe.model, recipe.data
    if data.train_shards == BUILTIN_NAME:
        shards, _tokenizer = ensure_builtin_corpus(
            data.cache_dir, m.seq_length, m.vocab_size, tokenizer_path=data.tokenizer,
            progress=dims.is_main and split == "train", log=print if dims.is_main and split == "train" else _quiet)
    else:
        shards = data.train_shards
    if split == "valid" and data.valid_shards:
        shards = data.valid_shards
    loader = TokenLoader(
        shards, m.seq_length, recipe.train.micro_batch_size, dp_rank=dims.dp_rank, dp_world_size=dims.dp,
        num_workers=data.num_workers if split == "train" else 0, seed=data.seed,
        split="train" if split == "train" else "valid", skip_corrupt_shards=data.skip_corrupt_shards,
    )
    if loader.vocab_size > m.vocab_size:
        raise ValueError(f"model.vocab_size={m.vocab_size} is smaller than the data's tokenizer vocabulary "
                         f"({loader.vocab_size}, shards {shards})")
    return LoaderStream(loader)


def packed_seq_params(batch: dict):
    """Document boundaries (``cu_seqlens`` over the flattened b·s stream) for ``ssa.document_mask``."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = batch["cu_seqlens"]
    return PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu)


def _quiet(_line: str) -> None:
    pass
