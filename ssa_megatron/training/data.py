"""Batches for the loop: the recipe's token stream (the data pipeline's resumable loader), or synthetic tokens.

A loader yields dicts of ``[micro_batch, seq]`` tensors -- ``tokens``, ``labels``, ``position_ids``,
``loss_mask`` (and ``cu_seqlens`` for document masking) -- and has ``state_dict()`` / ``load_state_dict()`` so a
resumed run continues at the exact next batch. Every rank of one data-parallel replica (its TP, CP and PP ranks)
reads the same batches; data-parallel replicas read disjoint ones.

``StepBatches`` fetches one optimizer step's micro-batches up front, so every model chunk (interleaved
pipeline) sees the same batches, the loader's position after a step is exact, and the NaN check can re-run the
step's last micro-batch.
"""

from __future__ import annotations

import hashlib
from typing import Iterator

import torch

from ssa_megatron.config import RecipeConfig


class SyntheticTokens:
    """Deterministic synthetic token rows (benchmarks and tests); stated as synthetic wherever reported.

    Row r of batch i is a pure function of (seed, dp_rank, i, r): a random start token followed by a fixed
    affine recurrence ``x[t+1] = (a·x[t] + c) mod V`` with a small amount of noise, so a model can learn it and
    its loss falls, while random starts keep batches distinct.
    """

    def __init__(self, *, vocab_size: int, seq_length: int, micro_batch_size: int, seed: int, dp_rank: int = 0,
                 noise: float = 0.1):
        self.vocab_size = vocab_size
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.dp_rank = dp_rank
        self.noise = noise
        self.position = 0
        """Batches yielded so far."""

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        digest = hashlib.sha256(f"{self.seed}/{self.dp_rank}/{self.position}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        b, s, v = self.micro_batch_size, self.seq_length, self.vocab_size
        rows = torch.empty(b, s + 1, dtype=torch.long)
        rows[:, 0] = torch.randint(0, v, (b,), generator=g)
        a, c = 5, 7
        for t in range(s):
            rows[:, t + 1] = (a * rows[:, t] + c) % v
        flip = torch.rand(b, s + 1, generator=g) < self.noise
        rows[flip] = torch.randint(0, v, (int(flip.sum()),), generator=g)
        self.position += 1
        return {
            "tokens": rows[:, :-1].contiguous(),
            "labels": rows[:, 1:].contiguous(),
            "position_ids": torch.arange(s).expand(b, s).contiguous(),
            "loss_mask": torch.ones(b, s, dtype=torch.float32),
        }

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "dp_rank": self.dp_rank}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def build_loaders(recipe: RecipeConfig, dims):
    """(train, held-out or None) streams of this data-parallel rank for the recipe's data."""
    m, data = recipe.model, recipe.data
    if data.train_shards.startswith("synthetic"):
        # "synthetic" (or "synthetic:<seed>"): the benchmark/test stream; the held-out stream uses another seed.
        seed = int(data.train_shards.split(":", 1)[1]) if ":" in data.train_shards else data.seed

        def stream(offset: int) -> SyntheticTokens:
            return SyntheticTokens(vocab_size=m.vocab_size, seq_length=m.seq_length,
                                   micro_batch_size=recipe.train.micro_batch_size, seed=seed + offset,
                                   dp_rank=dims.dp_rank)

        return stream(0), stream(1_000_003)
    from ssa_megatron.training.data_adapter import build_token_loaders

    return build_token_loaders(recipe, dims)


class StepBatches:
    """One optimizer step's micro-batches, fetched once and served to every model chunk."""

    def __init__(self, loader, num_microbatches: int, device: torch.device):
        self.loader = loader
        self.num_microbatches = num_microbatches
        self.device = device
        self.batches: list[dict[str, torch.Tensor]] = []

    def next_step(self, num_chunks: int) -> list[Iterator[dict[str, torch.Tensor]]]:
        self.batches = [self._to_device(next(self.loader)) for _ in range(self.num_microbatches)]
        return [iter(self.batches) for _ in range(num_chunks)]

    def _to_device(self, batch: dict) -> dict:
        return {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}

    @property
    def tokens_per_step(self) -> int:
        return sum(int(b["loss_mask"].numel()) for b in self.batches)
