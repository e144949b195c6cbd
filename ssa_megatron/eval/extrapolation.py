"""Length extrapolation: perplexity at multiples of the training length (1x, 2x, 4x, 8x), under full and sparse
inference, on the same tokens at every length.

Rows are cut from one token stream and their positions run ``0..L-1`` over the whole row, so a row of ``L`` tokens
exercises every RoPE position up to ``L`` (the paper's PG19-style evaluation). Documents inside the stream are not
separated: use long documents (a long text file, or shards of long documents) for a meaningful curve. Every length
scores the same prefix of the stream, ``rows`` rows of the longest length, cut into more, shorter rows at the
smaller lengths.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import torch

from ssa_megatron.eval.data import eval_batches, is_text_file, shard_seq_length
from ssa_megatron.eval.perplexity import perplexity

DEFAULT_FACTORS = (1, 2, 4, 8)
COLUMNS = ("factor", "seq_length", "mode", "top_k", "block_size", "loss", "ppl", "tokens")


def training_length(model) -> int:
    """The context the model was trained at: its Megatron recipe's ``model.seq_length``, else the HF config's
    ``max_position_embeddings``."""
    recipe = model.config.megatron_recipe or {}
    return int((recipe.get("model") or {}).get("seq_length") or model.config.max_position_embeddings)


def token_stream(source: str, num_tokens: int, *, tokenizer: str | None = None, split: str = "valid",
                 recipe_data: dict | None = None) -> torch.Tensor:
    """The first ``num_tokens`` tokens (int64 ``[n]``) of ``source``: a text file (tokenized with ``tokenizer``,
    an EOS at its end) or token shards / ``builtin:stdlib`` (their held-out rows joined back into the stream they
    were cut from; rows do not overlap, and a padded row contributes its real tokens only)."""
    if is_text_file(source):
        from ssa_megatron.data.tokenizer import Tokenizer

        if not tokenizer:
            raise ValueError(f"data {source!r} is a text file: pass --tokenizer (a tokenizer.json) to tokenize it")
        tok = Tokenizer(tokenizer)
        text = Path(source).expanduser().read_text(encoding="utf-8", errors="replace")
        ids = torch.tensor(tok.encode_batch([text])[0] + [tok.eos_id], dtype=torch.long)
    else:
        if source.startswith("builtin:"):
            packed = ((recipe_data or {}).get("model") or {}).get("seq_length")
        else:
            packed = shard_seq_length(source)
        rows = math.ceil(num_tokens / (packed + 1)) if packed else None
        batches = eval_batches(source, 1, rows, split=split, recipe_data=recipe_data)
        parts = []
        for batch in batches:
            real = int(batch["loss_mask"][0].sum()) + 1  # real tokens of the row: labels under the mask + 1
            parts.append(torch.cat([batch["tokens"][0], batch["labels"][0][-1:]])[:real])
            if sum(len(p) for p in parts) >= num_tokens:
                break
        ids = torch.cat(parts)
    if len(ids) < num_tokens:
        raise ValueError(f"data {source!r}: {len(ids)} tokens, fewer than the {num_tokens} needed ("
                         "rows x the longest length + 1 per row); use more text, fewer --rows or smaller --factors")
    return ids[:num_tokens]


def stream_rows(ids: torch.Tensor, seq_length: int) -> list[dict]:
    """Batches of one row each: ``seq_length + 1`` consecutive tokens, positions ``0..seq_length-1``."""
    n = len(ids) // (seq_length + 1)
    rows = ids[: n * (seq_length + 1)].view(n, seq_length + 1)
    return [{"tokens": r[None, :-1], "labels": r[None, 1:], "loss_mask": torch.ones(1, seq_length),
             "position_ids": torch.arange(seq_length)[None], "cu_seqlens": None} for r in rows]


def length_extrapolation(model, source: str, *, factors=DEFAULT_FACTORS, rows: int = 2, modes=("full", "sparse"),
                         train_length: int | None = None, tokenizer: str | None = None, split: str = "valid",
                         progress=None) -> list[dict]:
    """Rows of :data:`COLUMNS`: per factor and mode, the perplexity of ``rows`` rows of ``factor x train_length``
    tokens' worth of the stream. The model's attention mode is restored afterwards."""
    factors = sorted({int(f) for f in factors})
    if not factors or factors[0] < 1:
        raise ValueError(f"factors={factors!r}: give multiples of the training length >= 1")
    if rows < 1:
        raise ValueError(f"rows={rows!r}: must be >= 1")
    for mode in modes:
        if mode not in ("full", "sparse"):
            raise ValueError(f"modes: {mode!r} is not 'full' or 'sparse'")
    length = train_length or training_length(model)
    longest = factors[-1] * length
    ids = token_stream(source, rows * (longest + 1), tokenizer=tokenizer, split=split,
                       recipe_data=model.config.megatron_recipe)
    cfg = model.config
    saved = (cfg.ssa_mode, cfg.ssa_top_k, cfg.ssa_block_size)
    out = []
    try:
        for factor in factors:
            batches = stream_rows(ids, factor * length)
            for mode in modes:
                model.set_attention_mode(mode, top_k=saved[1], block_size=saved[2])
                result = perplexity(model, batches, progress)
                out.append({"factor": factor, "seq_length": factor * length, "mode": mode,
                            "top_k": saved[1] if mode == "sparse" else None,
                            "block_size": saved[2] if mode == "sparse" else None, **result})
    finally:
        model.set_attention_mode(*saved)
    return out


def write_results(out_dir: Path, rows: list[dict]) -> list[Path]:
    """``length_extrapolation.csv`` / ``.json`` and ``length_extrapolation.png`` (PPL against length, one line per
    mode, log-scaled axes; the plot needs matplotlib and is skipped without it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "length_extrapolation.csv", out_dir / "length_extrapolation.json"]
    with open(written[0], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    written[1].write_text(json.dumps(rows, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for mode in ("full", "sparse"):
        points = [(r["seq_length"], r["ppl"]) for r in rows if r["mode"] == mode]
        if points:
            ax.plot(*zip(*points), marker="o", label=f"{mode} attention")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title("Length extrapolation")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "length_extrapolation.png", dpi=120)
    plt.close(fig)
    written.append(out_dir / "length_extrapolation.png")
    return written
