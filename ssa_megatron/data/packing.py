"""Packing documents into fixed-length rows, and turning rows back into training tensors.

A **row** holds ``seq_length + 1`` tokens (inputs are ``row[:-1]``, labels ``row[1:]``) cut from the stream of
documents, each followed by the EOS id. Rows do not overlap: every token of the stream is in exactly one row.
Two layouts (``tools/prepare_data.py --layout``, docs/data.md):

- ``packed`` (:class:`RowPacker`): the stream is cut at every ``seq_length + 1`` tokens, so a document cut by a row
  end continues at the start of the next row (as a new segment at position 0). No padding.
- ``padded`` (:class:`PaddedRowPacker`, the authors' preprocessing): whole documents only; a document that does
  not fit in the rest of the row starts the next row and the rest of the row is padding. A document longer than a
  row is cut into row-sized pieces, each starting a row. Padding is outside the row's bounds, so it is never a
  label (``loss_mask`` 0) and is its own segment.

Alongside each row we store its **bounds**: int32 offsets ``[0, start_1, ..., start_k, n_real]`` where the
``start_i`` are the offsets of documents beginning inside the row and ``n_real`` is the number of real tokens
(``seq_length + 1`` except in the final, padded row of a split). This is the row-local form of ``cu_seqlens``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass
class PackedRows:
    """Rows cut from the stream: ``tokens [n, seq_length + 1]`` and one bounds array per row."""

    tokens: np.ndarray
    bounds: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.bounds)


@dataclass
class RowPacker:
    """Accumulates documents (token ids with the EOS already appended) and cuts complete rows.

    The unpacked tail (fewer than a row's tokens, or whatever the caller has not cut yet) is the packer's whole
    state: :meth:`state` / :meth:`from_state` save and restore it so shard writing can resume mid-stream.
    """

    row_tokens: int
    dtype: np.dtype
    _chunks: list[np.ndarray] = field(default_factory=list)
    _doc_starts: list[int] = field(default_factory=list)  # offsets into the pending stream
    _length: int = 0

    def add(self, tokens: np.ndarray, doc_lengths: np.ndarray) -> None:
        """Appends documents given as one flat array and their lengths (EOS included in each length)."""
        if int(doc_lengths.sum()) != len(tokens):
            raise ValueError(f"doc_lengths sum to {int(doc_lengths.sum())} but {len(tokens)} tokens were given")
        if len(tokens) == 0:
            return
        starts = self._length + np.concatenate([[0], np.cumsum(doc_lengths[:-1])])
        self._doc_starts.extend(int(s) for s in starts)
        self._chunks.append(tokens.astype(self.dtype, copy=False))
        self._length += len(tokens)

    def full_rows(self) -> int:
        return self._length // self.row_tokens

    def take_rows(self, count: int) -> PackedRows:
        """Removes the first ``count`` complete rows from the stream."""
        if count > self.full_rows():
            raise ValueError(f"take_rows({count}): only {self.full_rows()} complete rows are pending")
        stream = self._stream()
        used = count * self.row_tokens
        rows = stream[:used].reshape(count, self.row_tokens)
        starts = np.asarray(self._doc_starts, dtype=np.int64)
        bounds = _row_bounds(starts, count, self.row_tokens, [self.row_tokens] * count)
        self._chunks = [stream[used:]] if used < len(stream) else []
        keep = starts >= used
        self._doc_starts = [int(s) - used for s in starts[keep]]
        self._length -= used
        return PackedRows(rows.copy(), bounds)

    def take_padded_tail(self, pad_id: int) -> PackedRows:
        """Removes everything pending as rows, the last one padded with ``pad_id`` (its bounds end at the real
        length, so padding is never a label)."""
        count = -(-self._length // self.row_tokens)
        if count == 0:
            return PackedRows(np.zeros((0, self.row_tokens), self.dtype), [])
        stream = self._stream()
        padded = np.full(count * self.row_tokens, pad_id, dtype=self.dtype)
        padded[: len(stream)] = stream
        real = [self.row_tokens] * (count - 1) + [self._length - (count - 1) * self.row_tokens]
        bounds = _row_bounds(np.asarray(self._doc_starts, dtype=np.int64), count, self.row_tokens, real)
        self._chunks, self._doc_starts, self._length = [], [], 0
        return PackedRows(padded.reshape(count, self.row_tokens), bounds)

    def _stream(self) -> np.ndarray:
        if len(self._chunks) != 1:
            self._chunks = [np.concatenate(self._chunks) if self._chunks else np.zeros(0, self.dtype)]
        return self._chunks[0]

    def state(self) -> dict[str, np.ndarray]:
        return {"tokens": self._stream().copy(), "doc_starts": np.asarray(self._doc_starts, dtype=np.int64)}

    @classmethod
    def from_state(cls, row_tokens: int, dtype: np.dtype, state: dict[str, np.ndarray]) -> "RowPacker":
        packer = cls(row_tokens, dtype)
        tokens = state["tokens"].astype(dtype, copy=False)
        packer._chunks = [tokens] if len(tokens) else []
        packer._doc_starts = [int(s) for s in state["doc_starts"]]
        packer._length = len(tokens)
        return packer


@dataclass
class PaddedRowPacker(RowPacker):
    """A :class:`RowPacker` that never cuts a document across rows unless it is longer than a row: the row is
    padded with ``pad_id`` instead (the ``padded`` layout). Same interface; the padding sits in the pending stream,
    and ``_real`` maps each padded pending row to its real length."""

    pad_id: int = 0
    _real: dict[int, int] = field(default_factory=dict)  # pending row index -> real tokens in it

    def add(self, tokens: np.ndarray, doc_lengths: np.ndarray) -> None:
        if int(doc_lengths.sum()) != len(tokens):
            raise ValueError(f"doc_lengths sum to {int(doc_lengths.sum())} but {len(tokens)} tokens were given")
        n = self.row_tokens
        offset = 0
        for length in (int(x) for x in doc_lengths):
            used = self._length % n
            if used and used + length > n:  # the document does not fit in the open row: pad it, start a new one
                self._real[self._length // n] = used
                self._chunks.append(np.full(n - used, self.pad_id, dtype=self.dtype))
                self._length += n - used
            self._doc_starts.append(self._length)
            # A document longer than a row runs on into the next rows, each piece starting at a row start.
            self._chunks.append(tokens[offset:offset + length].astype(self.dtype, copy=False))
            self._length += length
            offset += length

    def take_rows(self, count: int) -> PackedRows:
        real = [self._real.get(r, self.row_tokens) for r in range(count)]
        rows = super().take_rows(count)
        rows.bounds = _row_bounds_from(rows.bounds, real)
        self._real = {r - count: v for r, v in self._real.items() if r >= count}
        return rows

    def take_padded_tail(self, pad_id: int) -> PackedRows:
        count = -(-self._length // self.row_tokens)
        real = [self._real.get(r, self.row_tokens) for r in range(count)]
        if count:
            real[-1] = min(real[-1], self._length - (count - 1) * self.row_tokens)
        rows = super().take_padded_tail(pad_id)
        rows.bounds = _row_bounds_from(rows.bounds, real)
        self._real = {}
        return rows

    def state(self) -> dict[str, np.ndarray]:
        rows = np.asarray(sorted(self._real), dtype=np.int64)
        return {**super().state(), "pad_rows": rows, "pad_real": np.asarray([self._real[r] for r in rows],
                                                                             dtype=np.int64),
                "pad_id": np.asarray(self.pad_id, dtype=np.int64)}

    @classmethod
    def from_state(cls, row_tokens: int, dtype: np.dtype, state: dict[str, np.ndarray]) -> "PaddedRowPacker":
        packer = super().from_state(row_tokens, dtype, state)
        packer.pad_id = int(state["pad_id"])
        packer._real = {int(r): int(v) for r, v in zip(state["pad_rows"], state["pad_real"])}
        return packer


def _row_bounds_from(bounds: list[np.ndarray], real_lengths: list[int]) -> list[np.ndarray]:
    """Bounds whose last entry is the row's real length (document starts at or past it dropped)."""
    out = []
    for b, real in zip(bounds, real_lengths):
        inner = b[1:-1]
        out.append(np.concatenate([[0], inner[inner < real], [min(real, int(b[-1]))]]).astype(np.int32))
    return out


def make_packer(layout: str, row_tokens: int, dtype: np.dtype, pad_id: int) -> RowPacker:
    """The packer of ``layout`` ('packed' or 'padded')."""
    if layout == "packed":
        return RowPacker(row_tokens, dtype)
    if layout == "padded":
        return PaddedRowPacker(row_tokens, dtype, pad_id=pad_id)
    raise ValueError(f"layout={layout!r}: must be 'packed' or 'padded'")


LAYOUTS = ("packed", "padded")


def _row_bounds(doc_starts: np.ndarray, count: int, row_tokens: int, real_lengths: list[int]) -> list[np.ndarray]:
    """Bounds of rows ``0..count-1`` of the stream from the documents' stream offsets."""
    row_of_start = doc_starts // row_tokens
    cuts = np.searchsorted(row_of_start, np.arange(count + 1))
    bounds = []
    for row in range(count):
        inner = doc_starts[cuts[row]: cuts[row + 1]] - row * row_tokens
        inner = inner[(inner > 0) & (inner < real_lengths[row])]
        bounds.append(np.concatenate([[0], inner, [real_lengths[row]]]).astype(np.int32))
    return bounds


def check_bounds(bounds: np.ndarray, row_tokens: int) -> str | None:
    """Why a bounds array is malformed, or None when it is fine."""
    if bounds.ndim != 1 or len(bounds) < 2:
        return f"bounds must be 1-D with at least 2 entries, got shape {tuple(bounds.shape)}"
    if bounds[0] != 0:
        return f"bounds must start at 0, got {int(bounds[0])}"
    if not np.all(np.diff(bounds) > 0):
        return "bounds must be strictly increasing"
    if not 0 < bounds[-1] <= row_tokens:
        return f"bounds must end at the real length in (0, {row_tokens}], got {int(bounds[-1])}"
    return None


def segment_starts(bounds: np.ndarray, seq_length: int) -> np.ndarray:
    """Segment starts over the ``seq_length`` input positions of a row: document starts, plus the start of the
    padding when the row is padded (so padding is its own segment)."""
    return bounds[bounds < seq_length]


def batch_from_rows(rows, bounds: list[np.ndarray], seq_length: int) -> dict[str, "torch.Tensor"]:
    """Training tensors of a micro-batch of rows.

    Args:
        rows: ``[b, seq_length + 1]`` token ids (an array, or a list of ``b`` rows).
        bounds: their bounds (see the module docstring).
    Returns:
        ``tokens [b, s]`` int64, ``labels [b, s]`` int64 (tokens shifted by one), ``position_ids [b, s]`` int64
        (0 at every document start and row start), ``loss_mask [b, s]`` float32 (0 where the label is padding),
        ``cu_seqlens [n + 1]`` int32 segment boundaries over the flattened ``b·s`` stream (starts at 0, ends at
        ``b·s``, every row start ``r·s`` included; docs/architecture.md).
    """
    import torch

    batch = len(rows)
    stacked = np.asarray(rows if isinstance(rows, np.ndarray) else np.stack(rows), dtype=np.int64)
    positions = np.empty((batch, seq_length), dtype=np.int64)
    loss_mask = np.zeros((batch, seq_length), dtype=np.float32)
    cu_parts = []
    index = np.arange(seq_length, dtype=np.int64)
    for r, row_bounds in enumerate(bounds):
        starts = segment_starts(row_bounds, seq_length).astype(np.int64)
        lengths = np.diff(np.append(starts, seq_length))
        positions[r] = index - np.repeat(starts, lengths)
        # A label at input position i is token i+1; it is real when i+1 < n_real.
        loss_mask[r, : max(0, int(row_bounds[-1]) - 1)] = 1.0
        cu_parts.append(starts + r * seq_length)
    cu_parts.append(np.array([batch * seq_length]))
    return {
        "tokens": torch.from_numpy(np.ascontiguousarray(stacked[:, :-1])),
        "labels": torch.from_numpy(np.ascontiguousarray(stacked[:, 1:])),
        "position_ids": torch.from_numpy(positions),
        "loss_mask": torch.from_numpy(loss_mask),
        "cu_seqlens": torch.from_numpy(np.concatenate(cu_parts).astype(np.int32)),
    }
