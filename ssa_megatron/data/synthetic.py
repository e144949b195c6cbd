"""Deterministic synthetic token rows (``data.train_shards: synthetic``): tests and benchmarks, stated as synthetic
wherever reported."""

from __future__ import annotations

import hashlib
from typing import Iterator

import torch


class SyntheticTokens:
    """An endless stream of ``[micro_batch, seq]`` batches (``tokens``, ``labels``, ``position_ids``, ``loss_mask``)
    with the loader interface (``next()``, ``state_dict()``, ``load_state_dict()``).

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
        start = torch.randint(0, v, (b,), generator=g)
        rows = affine_recurrence(start, s + 1, a=5, c=7, modulus=v)
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


def affine_recurrence(start: torch.Tensor, length: int, *, a: int, c: int, modulus: int) -> torch.Tensor:
    """``x[0] = start``, ``x[t+1] = (a·x[t] + c) mod modulus``, for every row of ``start [b]`` at once:
    ``[b, length]`` int64.

    Closed form, exact in integers: ``x[t] = (a^t·x[0] + c·(a^0 + … + a^(t-1))) mod modulus``. A Python loop over
    t costs a few tensor operations per token (about 0.1 s per 8k-token row, on the training process's critical
    path); this is O(log length) operations. Intermediates stay below ``modulus²`` and ``modulus · length``, far
    inside int64 for any vocabulary.
    """
    t = torch.arange(length, dtype=torch.long)
    power = torch.ones(length, dtype=torch.long)  # a^t mod modulus, by binary exponentiation over the bits of t
    base = torch.tensor(a % modulus, dtype=torch.long)
    for bit in range(max(1, int(length - 1).bit_length())):
        power = torch.where((t >> bit) & 1 == 1, power * base % modulus, power)
        base = base * base % modulus
    geometric = torch.cumsum(power, 0) - power  # a^0 + ... + a^(t-1), exact (each term < modulus)
    return (start[:, None] % modulus * power + c * (geometric % modulus)) % modulus
