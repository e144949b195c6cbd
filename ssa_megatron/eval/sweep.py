"""Budget sweep: perplexity under full attention and under sparse attention at each (block_size, top_k), with
optional attention statistics; written as CSV + JSON and plotted as PPL against the receptive field
(``top_k · block_size`` tokens) with full attention as a horizontal line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ssa_megatron.eval.perplexity import METRICS, attention_statistics, perplexity

COLUMNS = ("mode", "block_size", "top_k", "receptive_field", "loss", "ppl", "tokens", "word_ppl", "words", *METRICS)


def budget_sweep(model, batches: list[dict], top_ks: list[int], block_sizes: list[int] | None = None, *,
                 stats: bool = False, progress=None) -> list[dict]:
    """Rows of :data:`COLUMNS`: one for full attention, then one per (block_size, top_k) in sparse mode.

    The model's attention mode is restored afterwards. With ``stats`` every row also holds the attention
    statistics (:data:`METRICS`, mean over layers, and ``layers``: the per-layer values) of the forward that row
    ran: the sparse rows against the selection of their budget, the full row (full inference) against the
    selection of the model's own budget.
    """
    if not top_ks:
        raise ValueError("budget_sweep: top_ks is empty; give at least one budget (blocks per query)")
    cfg = model.config
    saved = (cfg.ssa_mode, cfg.ssa_top_k, cfg.ssa_block_size)
    block_sizes = list(block_sizes or [cfg.ssa_block_size])
    seq_length = int(batches[0]["tokens"].shape[1])

    def stats_row() -> dict:
        if not stats:
            return {}
        per_layer = attention_statistics(model, batches, progress)
        return {**{k: sum(layer[k] for layer in per_layer) / len(per_layer) for k in METRICS}, "layers": per_layer}

    rows = []
    try:
        model.set_attention_mode("full")
        rows.append({"mode": "full", "block_size": None, "top_k": None, "receptive_field": seq_length,
                     **perplexity(model, batches, progress), **stats_row()})
        for bs in block_sizes:
            for k in top_ks:
                model.set_attention_mode("sparse", top_k=k, block_size=bs)
                rows.append({"mode": "sparse", "block_size": bs, "top_k": k, "receptive_field": k * bs,
                             **perplexity(model, batches, progress), **stats_row()})
    finally:
        model.set_attention_mode(saved[0], top_k=saved[1], block_size=saved[2])
    return rows


def steps_of(top_ks: list[int], block_sizes: list[int], num_batches: int, stats: bool) -> int:
    """Forward passes of a sweep (for a progress bar)."""
    rows = 1 + len(top_ks) * len(block_sizes)
    return num_batches * rows * (2 if stats else 1)


def write_csv(path: Path, rows: list[dict], columns: tuple[str, ...] | list[str]) -> None:
    """``rows`` as CSV with ``columns`` (missing or None values left empty, other keys ignored)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})


def write_table(rows: list[dict], out_dir: Path, stem: str = "budget_sweep") -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.json"
    write_csv(csv_path, rows, COLUMNS)
    json_path.write_text(json.dumps(rows, indent=2))
    return csv_path, json_path


def plot_sweep(rows: list[dict], path: Path, title: str = "") -> Path:
    """PPL against receptive field (log2 axis), one line per block size, full attention as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    sparse = [r for r in rows if r["mode"] == "sparse"]
    for bs in sorted({r["block_size"] for r in sparse}):
        pts = sorted((r["receptive_field"], r["ppl"]) for r in sparse if r["block_size"] == bs)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"sparse, block {bs}")
    for r in rows:
        if r["mode"] == "full":
            ax.axhline(r["ppl"], color="black", linestyle="--", label=f"full attention ({r['ppl']:.3g})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("receptive field (top_k × block_size tokens)")
    ax.set_ylabel("perplexity")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
