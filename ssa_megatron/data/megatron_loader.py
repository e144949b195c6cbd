"""Megatron ``.bin/.idx`` data (``data.format: megatron``) as this rank's deterministic, resumable micro-batches.

The samples are megatron-core's (the installed wheel's ``megatron.core.datasets``, with its compiled
``helpers_cpp``): ``BlendedMegatronDatasetBuilder`` builds a ``GPTDataset`` per prefix -- documents shuffled with
the seed, concatenated and cut into samples of ``seq_length + 1`` tokens (consecutive samples share one token,
Megatron's convention), the samples shuffled -- and, for several prefixes with weights, a ``BlendedDataset``
that interleaves them in those proportions. The held-out split is a ``valid`` prefix beside the data, a separate
blend (``blend_per_split``) or Megatron's split string (``data.split``). ``inter_document_masking`` gives each
sample's document boundaries; position ids restart at every document start and at every sample start. The indices
are cached under ``data.cache_dir/megatron_indices/<digest of the files>`` (global rank 0 builds them, the others
load them: on several nodes that directory must be on a shared filesystem, as Megatron-LM's --data-cache-path).

This module adds what the training loop needs around them:

* **Size.** The training dataset is built for ``train.steps × train.global_batch_size`` samples (what
  Megatron-LM builds for --train-iters). A run that goes past it (a resume with more steps) continues with
  further *passes*: pass p reads the same samples in the order of a permutation seeded with ``(seed, p)``
  (pass 0 is Megatron's order). The held-out dataset has ``train.eval_batches`` micro-batches per rank and
  repeats.
* **Ranks.** The k-th micro-batch of data-parallel rank r holds global samples
  ``[(k·dp + r)·b, (k·dp + r + 1)·b)`` (Megatron's ``MegatronPretrainingSampler``): ranks read disjoint samples,
  and together one micro-batch round reads consecutive ones.
* **Resumption.** The state is the number of micro-batches this rank has yielded (the same on every rank) plus
  the settings the order depends on; the number of samples the dataset was built for is kept in it, so a resume
  with another ``train.steps`` rebuilds the same dataset and continues the same order. DataLoader workers only
  prefetch; the order does not depend on their number.

Batches have the layout of the WebDataset loader (``data/packing.py``): ``tokens, labels, position_ids [b, s]``
int64, ``loss_mask [b, s]`` float32, ``cu_seqlens [n + 1]`` int32 over the flattened ``b·s`` stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from .loader import iter_with_workers
from .megatron_indexed import Blend, IndexedDataError
from .tokenizer import Tokenizer, tokenizer_hash

_SPLIT_INDEX = {"train": 0, "valid": 1}


class DatasetFacts:
    """What ``GPTDataset`` reads of a tokenizer: ``eod``, ``vocab_size`` and ``unique_identifiers`` (part of its
    index-cache key). megatron.core's tokenizer classes would need a metadata file and transformers to open a plain
    tokenizer.json, for these three values."""

    def __init__(self, path: Path):
        try:
            tok = Tokenizer(path)
            self.eod, self.vocab_size = tok.eos_id, tok.vocab_size
        except ValueError:  # no known end-of-sequence token: boundaries come from the index, not from EOS ids
            from tokenizers import Tokenizer as HFTokenizer

            self.eod, self.vocab_size = -1, HFTokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
        self.path = Path(path)
        self.hash = tokenizer_hash(path)

    @property
    def unique_identifiers(self) -> dict:
        return {"class": "tokenizer.json", "tokenizer_hash": self.hash, "vocab_size": self.vocab_size,
                "eod": self.eod}


@dataclass(frozen=True)
class GPTSource:
    """How to build one split's Megatron dataset: the blend, the split string (None: the blend is the split's
    own, ``blend_per_split``), the seed, the sample length, and where the indices are cached."""

    blend: tuple[tuple[str, ...], Optional[tuple[float, ...]]]
    split_name: str  # "train" or "valid"
    split: Optional[str]
    seq_length: int
    seed: int
    tokenizer: DatasetFacts
    cache_dir: Path
    """Megatron's index cache for these files (``path_to_cache``)."""
    data_digest: str
    """:meth:`Blend.digest`: what the order depends on besides the settings (checked on resume)."""

    def build(self, num_samples: int, what: str):
        """The ``GPTDataset`` / ``BlendedDataset`` of this split with at least ``num_samples`` samples."""
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

        try:  # sample and blending indices are built by this compiled module (the wheel ships it)
            from megatron.core.datasets import helpers_cpp  # noqa: F401
        except ImportError as err:
            raise ImportError("megatron-core's compiled dataset helper megatron.core.datasets.helpers_cpp is missing "
                              "(the megatron-core wheel ships it; a source checkout builds it with make -C "
                              "megatron/core/datasets); data.format=megatron needs it") from err

        prefixes, weights = list(self.blend[0]), (list(self.blend[1]) if self.blend[1] else None)
        if len(prefixes) == 1:
            weights = None  # Megatron warns about a blend of one
        self._check_sizes(prefixes, weights, num_samples, what)
        blend = (prefixes, weights)
        index = _SPLIT_INDEX[self.split_name]
        if self.split is None:
            per_split = [None, None, None]
            per_split[index] = blend
            where = dict(blend_per_split=per_split)
            sizes = [None, None, None]
        else:
            where = dict(blend=blend, split=self.split)
            sizes = [1, 1, 1]  # the other splits are built too (Megatron builds every split of a split string)
        sizes[index] = num_samples
        config = GPTDatasetConfig(
            random_seed=self.seed, sequence_length=self.seq_length, tokenizer=self.tokenizer,
            reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
            inter_document_masking=True, path_to_cache=str(self.cache_dir), **where)
        try:
            datasets = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{what}: megatron-core's index cache {err.filename or err} is missing on this "
                                    "rank: global rank 0 builds it under data.cache_dir, which must be a shared "
                                    "filesystem across nodes") from err
        dataset = datasets[index]
        if dataset is None or len(dataset) == 0:
            raise IndexedDataError(f"{what}: the {self.split_name} split has no samples of {self.seq_length + 1} "
                                   "tokens (too little data, or a split share of 0)")
        return dataset


    def _check_sizes(self, prefixes: list[str], weights: Optional[list[float]], num_samples: int, what: str) -> None:
        """Refuses what megatron-core would not survive: a prefix with no tokens in a split it builds (its epoch
        count loop never ends) or one that needs more epochs x documents than its int32 document index holds. With
        a split string megatron-core builds every split with a share, so all of them are checked."""
        from megatron.core.datasets.blended_megatron_dataset_config import (
            convert_split_vector_to_split_matrix, parse_and_normalize_split)
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        names = ("train", "valid", "test")
        mine = _SPLIT_INDEX[self.split_name]
        if self.split:
            matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(self.split))
            targets = [(names[i], b, num_samples if i == mine else 1) for i, b in enumerate(matrix) if b is not None]
        else:
            targets = [(self.split_name, (0.0, 1.0), num_samples)]
        total = sum(weights) if weights else None
        for k, prefix in enumerate(prefixes):
            indexed = IndexedDataset(prefix)  # its lengths are a view of its mmap: keep it open while reading
            for name, bounds, samples in targets:
                begin, end = (int(round(b * len(indexed))) for b in bounds)
                tokens = int(indexed.sequence_lengths[begin:end].sum(dtype=np.int64))
                where = f"{prefix}" + (f" (data.split={self.split}, {name} share)" if self.split else "")
                if tokens == 0:
                    raise IndexedDataError(f"{what}: {where} has no {name} tokens ({end - begin} documents)")
                share = weights[k] / total if weights else (1.0 if len(prefixes) == 1 else 0.0)
                epochs = -(-int(samples * share * 1.01 + 1) * self.seq_length // tokens)
                if epochs * (end - begin) >= 2 ** 31:
                    raise IndexedDataError(
                        f"{what}: {where} holds {tokens:,} tokens; {int(samples * share):,} samples of "
                        f"{self.seq_length + 1} tokens would take {epochs:,} epochs of it, more than megatron-core's "
                        "int32 document index holds; use more data or fewer samples (train.steps, "
                        "train.global_batch_size)")
            del indexed


def _sample_batch(samples: list[dict], seq_length: int) -> dict[str, torch.Tensor]:
    """Megatron samples (``cu_seqlens`` padded with ``seq_length``) → one micro-batch of the training layout."""
    cu_parts = []
    for r, sample in enumerate(samples):
        cu = sample["cu_seqlens"]
        cu_parts.append(cu[cu < seq_length].to(torch.int32) + r * seq_length)
    cu_parts.append(torch.tensor([len(samples) * seq_length], dtype=torch.int32))
    return {
        "tokens": torch.stack([s["tokens"] for s in samples]),
        "labels": torch.stack([s["labels"] for s in samples]),
        "position_ids": torch.stack([s["position_ids"] for s in samples]),
        "loss_mask": torch.stack([s["loss_mask"] for s in samples]).float(),
        "cu_seqlens": torch.cat(cu_parts),
    }


class _PassView(torch.utils.data.Dataset):
    """Samples of one pass: ``dataset[order[i]]`` (``order`` None: Megatron's order)."""

    def __init__(self, dataset, order: Optional[np.ndarray]):
        self.dataset, self.order = dataset, order

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        return self.dataset[int(self.order[i]) if self.order is not None else int(i)]


class MegatronLoader:
    """Micro-batches of a Megatron dataset for one data-parallel rank; endless, exactly resumable.

    Args:
        source: what to build (:class:`GPTSource`).
        num_samples: samples to build the dataset for (pass 0); see the module docstring.
        reshuffle_passes: later passes in a new order (training) or in the same order (held-out data).
        num_workers: DataLoader worker processes that prefetch (0: read in this process).
    """

    def __init__(self, source: GPTSource, num_samples: int, micro_batch_size: int, dp_rank: int = 0,
                 dp_world_size: int = 1, num_workers: int = 0, *, reshuffle_passes: bool = True,
                 prefetch_factor: int = 4, what: str = "data.train_shards", log: Callable[[str], None] = print):
        for name, value, low in (("num_samples", num_samples, 1), ("micro_batch_size", micro_batch_size, 1),
                                 ("dp_world_size", dp_world_size, 1), ("num_workers", num_workers, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r}: must be an integer >= {low}")
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank={dp_rank!r}: must be in [0, dp_world_size={dp_world_size})")
        self.source = source
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.num_workers = num_workers
        self.reshuffle_passes = reshuffle_passes
        self.prefetch_factor = prefetch_factor
        self.seq_length = source.seq_length
        self.vocab_size = source.tokenizer.vocab_size
        self.what = what
        self.log = log
        self._consumed = 0
        self._orders: dict[int, Optional[np.ndarray]] = {}
        self._build(num_samples)

    def _build(self, num_samples: int) -> None:
        self.num_samples = num_samples
        self.dataset = self.source.build(num_samples, self.what)
        self.pass_samples = len(self.dataset)
        self._orders.clear()

    # ---------------------------------------------------------------------------------------------------------
    # Order

    def _order(self, pass_index: int) -> Optional[np.ndarray]:
        if pass_index == 0 or not self.reshuffle_passes:
            return None
        if pass_index not in self._orders:
            if len(self._orders) >= 2:  # a batch spans at most two passes
                self._orders.pop(min(self._orders))
            self._orders[pass_index] = np.random.default_rng([self.source.seed, pass_index]).permutation(
                self.pass_samples)
        return self._orders[pass_index]

    def _first_sample(self, batch: int) -> int:
        return (batch * self.dp_world_size + self.dp_rank) * self.micro_batch_size

    def _last_batch_in_pass(self, pass_index: int) -> int:
        """The last micro-batch of this rank whose samples all lie in pass ``pass_index`` (-1: none)."""
        end = (pass_index + 1) * self.pass_samples  # first sample of the next pass
        stride = self.dp_world_size * self.micro_batch_size
        return (end - self.micro_batch_size - self.dp_rank * self.micro_batch_size) // stride

    def _batch_samples(self, batch: int) -> list[dict]:
        """The samples of one micro-batch (in this process; for a batch that spans two passes)."""
        first = self._first_sample(batch)
        out = []
        for g in range(first, first + self.micro_batch_size):
            p, i = divmod(g, self.pass_samples)
            order = self._order(p)
            out.append(self.dataset[int(order[i]) if order is not None else i])
        return out

    # ---------------------------------------------------------------------------------------------------------
    # Resumption

    def state_dict(self) -> dict:
        """Position and the settings the order depends on; identical on every data-parallel rank."""
        src = self.source
        return {
            "format": "megatron",
            "consumed_batches": self._consumed,
            "num_samples": self.num_samples,
            "seed": src.seed,
            "split": src.split_name,
            "split_string": src.split,
            "seq_length": src.seq_length,
            "micro_batch_size": self.micro_batch_size,
            "dp_world_size": self.dp_world_size,
            "reshuffle_passes": self.reshuffle_passes,
            "data": src.data_digest,
            "weights": list(src.blend[1]) if src.blend[1] else None,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores the position; the next batch is the one an uninterrupted loader would yield next. A state
        saved with another dataset size (another ``train.steps``) rebuilds the dataset at that size."""
        mine = self.state_dict()
        for key, value in mine.items():
            if key not in ("consumed_batches", "num_samples") and state.get(key) != value:
                raise ValueError(f"loader state: {key}={state.get(key)!r} in the checkpoint but {value!r} now; an "
                                 "exact resume needs the same data, seed, seq_length, micro-batch and "
                                 "data-parallel sizes")
        consumed, size = state["consumed_batches"], state["num_samples"]
        if not isinstance(consumed, int) or consumed < 0:
            raise ValueError(f"loader state: consumed_batches={consumed!r}: must be an integer >= 0")
        if size != self.num_samples:
            self.log(f"data: the checkpoint's data order was built for {size:,} samples ({self.num_samples:,} "
                     "now, from train.steps x train.global_batch_size); rebuilding it at that size to continue it")
            self._build(size)
        self._consumed = consumed

    def rewind(self) -> None:
        self._consumed = 0

    # ---------------------------------------------------------------------------------------------------------
    # Iteration

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Yields from the current position, forever (pass after pass)."""
        collate = partial(_sample_batch, seq_length=self.seq_length)
        while True:
            batch = self._consumed
            pass_index = self._first_sample(batch) // self.pass_samples
            last = self._last_batch_in_pass(pass_index)
            if last < batch:  # this micro-batch spans the end of a pass
                self._consumed += 1
                yield collate(self._batch_samples(batch))
                continue
            view = _PassView(self.dataset, self._order(pass_index))
            indices = _BatchIndices(self, batch, last, pass_index)
            if self.num_workers == 0:
                batches = (collate([view[i] for i in idx]) for idx in indices)
            else:
                batches = iter_with_workers(view, batch_sampler=indices, collate_fn=collate,
                                            num_workers=self.num_workers, prefetch_factor=self.prefetch_factor)
            try:
                for out in batches:
                    self._consumed += 1
                    yield out
            finally:
                shutdown = getattr(batches, "_shutdown_workers", None)
                if shutdown is not None:
                    shutdown()


class _BatchIndices:
    """Pass-local sample indices of this rank's micro-batches ``first..last`` (a DataLoader batch sampler)."""

    def __init__(self, loader: MegatronLoader, first: int, last: int, pass_index: int):
        self.loader, self.first, self.last, self.offset = loader, first, last, pass_index * loader.pass_samples

    def __len__(self) -> int:
        return self.last - self.first + 1

    def __iter__(self):
        b = self.loader.micro_batch_size
        for batch in range(self.first, self.last + 1):
            start = self.loader._first_sample(batch) - self.offset
            yield list(range(start, start + b))


# ------------------------------------------------------------------------------------------------------------
# From a recipe.

def build_megatron_streams(recipe, dp_rank: int, dp_world_size: int, log: Callable[[str], None] = print):
    """This rank's (train loader, held-out loader or None, tokenizer path) for ``data.format: megatron``."""
    from .megatron_indexed import find_tokenizer, resolve_blend

    m, data, tr = recipe.model, recipe.data, recipe.train
    train_blend = resolve_blend("data.train_shards", data.train_shards)
    valid_blend = resolve_blend("data.valid_shards", data.valid_shards) if data.valid_shards else None
    if data.split and valid_blend is not None:
        raise ValueError(f"data.split={data.split!r} and data.valid_shards={data.valid_shards!r}: the held-out data "
                         "is either a share of train_shards (split) or separate (valid_shards); set one")
    tokenizer_path = find_tokenizer([b for b in (train_blend, valid_blend) if b], data.train_shards, data.tokenizer)
    facts = DatasetFacts(tokenizer_path)
    if facts.vocab_size > m.vocab_size:
        raise ValueError(f"data.train_shards={data.train_shards!r}: the tokenizer {str(tokenizer_path)!r} has "
                         f"{facts.vocab_size} ids but model.vocab_size={m.vocab_size}; raise model.vocab_size to at "
                         f"least {facts.vocab_size}")
    split = ",".join(data.split.replace(",", " ").split()) if data.split else None

    def source(blend: Blend, prefixes: str, which: str, split_string: Optional[str]) -> GPTSource:
        names, weights = blend.megatron_blend(prefixes)
        cache = Path(data.cache_dir).expanduser() / "megatron_indices" / blend.files_digest()
        return GPTSource((tuple(names), tuple(weights) if weights else None), which, split_string, m.seq_length,
                         data.seed, facts, cache, blend.digest())

    common = dict(micro_batch_size=tr.micro_batch_size, dp_rank=dp_rank, dp_world_size=dp_world_size, log=log)
    train = MegatronLoader(source(train_blend, "train", "train", split), tr.steps * tr.global_batch_size,
                           num_workers=data.num_workers, what="data.train_shards", **common)
    if split:  # Megatron's split string: the valid share of every train prefix
        valid_source = source(train_blend, "train", "valid", split)
    elif valid_blend is not None:  # a separate blend: directories stand for their valid prefix, else train
        valid_source = source(valid_blend, "held_out", "valid", None)
    elif train_blend.megatron_blend("valid") is not None:  # the valid prefixes beside the train data
        valid_source = source(train_blend, "valid", "valid", None)
    else:
        log(f"data: no held-out data for {data.train_shards} (no valid prefix beside it, no data.valid_shards or "
            "data.split); evaluation is off")
        valid_source = None
    valid = None
    if valid_source is not None:
        valid = MegatronLoader(valid_source, tr.eval_batches * tr.micro_batch_size * dp_world_size, num_workers=0,
                               reshuffle_passes=False, what="data.valid_shards" if valid_blend else "data.split"
                               if split else "data.train_shards", **common)
    corpora = ", ".join(c.train + (f" (weight {c.weight:g})" if c.weight else "") for c in train_blend.corpora)
    log(f"data: Megatron indexed data {corpora}: {train.pass_samples:,} train samples of {m.seq_length + 1} tokens"
        + (f", {valid.pass_samples:,} held-out" if valid is not None else "") + f"; tokenizer {tokenizer_path}")
    return train, valid, tokenizer_path

