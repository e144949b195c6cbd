"""Held-out batches for evaluation: token shards (the data pipeline's ``TokenLoader``), the embedded builtin
corpus, or a plain text file tokenized with a ``tokenizer.json``.

Every source yields the training batch layout: ``tokens, labels, position_ids [b, s]`` int64, ``loss_mask [b, s]``
float32 and ``cu_seqlens`` (document boundaries over the flattened ``b·s`` stream; None for plain text, which
is one document). When the tokenizer is known (given, beside the shards, or the builtin corpus's), each batch also
holds ``words``: the word count of its scored text (:func:`count_words`), for word-level perplexity.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


def is_text_file(source: str) -> bool:
    p = Path(source).expanduser()
    return p.is_file() and (p.suffix in TEXT_SUFFIXES or not p.suffix)


def shard_seq_length(source: str) -> int:
    """The seq_length the shards at ``source`` were packed for (their meta.json)."""
    from ssa_megatron.data.shards import resolve_shards

    try:
        _, metas = resolve_shards(source)
    except Exception as err:
        raise ValueError(f"data {source!r}: not a readable shard directory/pattern ({err}); pass token shards "
                         "written by tools/prepare_data.py, 'builtin:stdlib', or a .txt file with --tokenizer") from err
    return int(metas[0].seq_length)


def count_words(tokenizer, batch: dict) -> int:
    """Words of the text a batch scores: per row, the labels under ``loss_mask`` decoded (special tokens such as
    the EOS dropped) and split at whitespace, as lm-evaluation-harness's word perplexity counts words. A word cut by
    a row end counts in both rows; over many rows this is negligible."""
    words = 0
    for labels, mask in zip(batch["labels"], batch["loss_mask"]):
        ids = labels[mask > 0].tolist()
        words += len(tokenizer.decode(ids, skip_special_tokens=True).split())
    return words


def _tokenizer_beside(source: str) -> str | None:
    """The tokenizer.json in the directory of a shard set (prepare_data writes one there), or None."""
    from ssa_megatron.data.shards import resolve_shards

    try:
        candidate = Path(resolve_shards(source)[0][0].path).parent / "tokenizer.json"
    except Exception:  # unreadable shards are reported by the loader itself
        return None
    return str(candidate) if candidate.is_file() else None


def text_batches(path: str, tokenizer: str, seq_length: int, batch_size: int) -> Iterator[dict]:
    """Rows of ``seq_length + 1`` consecutive tokens of one text file (the last partial row is dropped)."""
    from ssa_megatron.data.tokenizer import Tokenizer

    if not tokenizer:
        raise ValueError(f"data {path!r} is a text file: pass --tokenizer (a tokenizer.json) to tokenize it")
    tok = Tokenizer(tokenizer)
    text = Path(path).expanduser().read_text(encoding="utf-8", errors="replace")
    ids = torch.tensor(tok.encode_batch([text])[0] + [tok.eos_id], dtype=torch.long)
    rows = len(ids) // (seq_length + 1)
    if rows == 0:
        raise ValueError(f"data {path!r}: {len(ids)} tokens, fewer than one row of seq_length + 1 = "
                         f"{seq_length + 1}; use more text or a shorter --seq-length")
    ids = ids[: rows * (seq_length + 1)].view(rows, seq_length + 1)
    for start in range(0, rows, batch_size):
        chunk = ids[start:start + batch_size]
        b = chunk.shape[0]
        yield {"tokens": chunk[:, :-1].contiguous(), "labels": chunk[:, 1:].contiguous(),
               "loss_mask": torch.ones(b, seq_length), "position_ids": torch.arange(seq_length).expand(b, -1),
               "cu_seqlens": None}


def eval_batches(source: str, batch_size: int, max_batches: int | None, *, seq_length: int | None = None,
                 tokenizer: str | None = None, split: str = "valid", recipe_data: dict | None = None) -> list[dict]:
    """Up to ``max_batches`` batches of ``source`` (all of them when None), materialised so every budget of a
    sweep sees the same tokens.

    Args:
        source: a shard directory / brace pattern (held-out ``split``), ``builtin:stdlib`` (the recipe's embedded
            corpus; ``recipe_data`` is the recipe stored with the model) or a text file (needs ``tokenizer``).
        seq_length: tokens per row; for shards it must equal their packing (default: theirs).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be >= 1")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches={max_batches!r}: must be >= 1 (or None for all)")
    if is_text_file(source):
        it = text_batches(source, tokenizer, seq_length or 1024, batch_size)
    else:
        from ssa_megatron.data.loader import TokenLoader

        if source.startswith("builtin:"):
            from ssa_megatron.data.builtin import ensure_builtin_corpus

            data = (recipe_data or {}).get("data") or {}
            model = (recipe_data or {}).get("model") or {}
            if not model:
                raise ValueError(f"data {source!r}: the model carries no Megatron recipe to rebuild the builtin "
                                 "corpus from; pass shards or a text file instead")
            shard_dir, builtin_tokenizer = ensure_builtin_corpus(
                data.get("cache_dir", "~/.cache/ssa_megatron"), model["seq_length"], model["vocab_size"],
                tokenizer_path=data.get("tokenizer"), max_mb=data.get("builtin_max_mb", 16.0),
                valid_fraction=data.get("valid_fraction", 0.02))
            source = str(shard_dir)
            tokenizer = tokenizer or str(builtin_tokenizer)
        tokenizer = tokenizer or _tokenizer_beside(source)
        packed = shard_seq_length(source)
        if seq_length is not None and seq_length != packed:
            raise ValueError(f"data {source!r} was packed for seq_length={packed}, not --seq-length {seq_length}")
        it = iter(TokenLoader(source, seq_length=packed, micro_batch_size=batch_size, split=split,
                              shuffle=False, infinite=False, num_workers=0))
    batches = []
    for batch in it:
        batches.append(batch)
        if max_batches is not None and len(batches) >= max_batches:
            break
    if not batches:
        raise ValueError(f"data {source!r} yielded no batches")
    if tokenizer:
        from ssa_megatron.data.tokenizer import Tokenizer

        tok = Tokenizer(tokenizer)
        for batch in batches:
            batch["words"] = count_words(tok, batch)
    return batches
