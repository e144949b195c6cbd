"""Needle in a haystack (passkey retrieval): prompts of a given token length with a passkey hidden at a given
depth, greedy generation under full or sparse inference, exact-match scoring and a heat map.

A prompt is, in tokens: the instruction, the haystack up to the needle, the needle ("The pass key is N. Remember
it. N is the pass key."), the rest of the haystack and the question ("What is the pass key? The pass key is").
The haystack is the classic passkey filler ("The grass is green. The sky is blue. ...") repeated, or the tokens of
a text file (``haystack``), cut so the whole prompt is exactly ``context`` tokens. Depth 0 puts the needle right
after the instruction, depth 1 right before the question. The answer is correct when the first number in the
generated text is the passkey.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will "
               "quiz you about the important info there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class Prompt:
    """One haystack prompt: ``ids`` (int64 ``[context]``), the passkey, where the needle starts (token index)."""

    ids: torch.Tensor
    passkey: str
    needle_at: int
    context: int
    depth: float


class PromptBuilder:
    """Builds prompts of exact token lengths from a tokenizer (:class:`ssa_megatron.data.tokenizer.Tokenizer`)."""

    def __init__(self, tokenizer, haystack: str | Path | None = None):
        self.tokenizer = tokenizer
        encode = lambda text: tokenizer.encode_batch([text])[0]  # noqa: E731
        self.instruction = encode(INSTRUCTION)
        self.question = encode(QUESTION)
        self._encode = encode
        if haystack is None:
            self.filler = encode(FILLER)
        else:
            text = Path(haystack).expanduser().read_text(encoding="utf-8", errors="replace")
            self.filler = encode(text)
            if not self.filler:
                raise ValueError(f"haystack {str(haystack)!r}: no text to hide the needle in")

    def build(self, context: int, depth: float, passkey: str) -> Prompt:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth={depth!r}: must be in [0, 1]")
        needle = self._encode(NEEDLE.format(key=passkey))
        fixed = len(self.instruction) + len(needle) + len(self.question)
        room = context - fixed
        if room < 0:
            raise ValueError(f"context={context}: shorter than the instruction, needle and question alone ({fixed} "
                             "tokens); use longer contexts")
        repeats = -(-room // len(self.filler))
        hay = (self.filler * repeats)[:room]
        before = round(depth * room)
        ids = self.instruction + hay[:before] + needle + hay[before:] + self.question
        return Prompt(torch.tensor(ids, dtype=torch.long), passkey, len(self.instruction) + before, context, depth)


def passkey_found(generated: str, passkey: str) -> bool:
    """True when the first number in ``generated`` is ``passkey``."""
    match = re.search(r"\d+", generated)
    return match is not None and match.group(0) == passkey


@torch.no_grad()
def answer(model, prompt: Prompt, tokenizer, max_new_tokens: int = 8) -> str:
    """Greedy continuation of the prompt (KV cache), decoded without special tokens."""
    device = next(model.parameters()).device
    ids = prompt.ids[None].to(device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id)
    return tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


def needle_in_a_haystack(model, tokenizer, contexts: list[int], *, depths=DEFAULT_DEPTHS, trials: int = 1,
                         modes=("full", "sparse"), haystack: str | Path | None = None, seed: int = 0,
                         max_new_tokens: int = 8, progress=None) -> list[dict]:
    """One row per (mode, context, depth, trial): ``mode, context, depth, trial, passkey, needle_at, answer,
    correct``. Passkeys are 5-digit numbers drawn from ``seed``; every mode sees the same prompts. The model's
    attention mode is restored afterwards."""
    for mode in modes:
        if mode not in ("full", "sparse"):
            raise ValueError(f"modes: {mode!r} is not 'full' or 'sparse'")
    if trials < 1:
        raise ValueError(f"trials={trials!r}: must be >= 1")
    builder = PromptBuilder(tokenizer, haystack)
    rng = random.Random(seed)
    prompts = [(trial, builder.build(c, d, str(rng.randint(10000, 99999))))
               for c in contexts for d in depths for trial in range(trials)]
    cfg = model.config
    saved = (cfg.ssa_mode, cfg.ssa_top_k, cfg.ssa_block_size)
    rows = []
    try:
        for mode in modes:
            model.set_attention_mode(mode, top_k=saved[1], block_size=saved[2])
            for trial, p in prompts:
                text = answer(model, p, tokenizer, max_new_tokens)
                rows.append({"mode": mode, "context": p.context, "depth": p.depth, "trial": trial,
                             "passkey": p.passkey, "needle_at": p.needle_at, "answer": text,
                             "correct": passkey_found(text, p.passkey)})
                if progress is not None:
                    progress(1)
    finally:
        model.set_attention_mode(*saved)
    return rows


def accuracy_grid(rows: list[dict], mode: str) -> tuple[list[int], list[float], list[list[float]]]:
    """(contexts, depths, accuracy[depth][context]) of one mode, accuracy the share of correct trials."""
    mine = [r for r in rows if r["mode"] == mode]
    contexts = sorted({r["context"] for r in mine})
    depths = sorted({r["depth"] for r in mine})
    grid = []
    for d in depths:
        line = []
        for c in contexts:
            cell = [r["correct"] for r in mine if r["context"] == c and r["depth"] == d]
            line.append(sum(cell) / len(cell) if cell else float("nan"))
        grid.append(line)
    return contexts, depths, grid


def write_results(out_dir: Path, rows: list[dict]) -> list[Path]:
    """``niah.json`` (every answer), ``niah_summary.json`` (accuracy per mode, overall and per cell) and
    ``niah.png``: one heat map per mode, depth against context length (needs matplotlib; skipped without it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "niah.json", out_dir / "niah_summary.json"]
    written[0].write_text(json.dumps(rows, indent=2))
    modes = [m for m in ("full", "sparse") if any(r["mode"] == m for r in rows)]
    summary = {}
    for mode in modes:
        contexts, depths, grid = accuracy_grid(rows, mode)
        mine = [r["correct"] for r in rows if r["mode"] == mode]
        summary[mode] = {"accuracy": sum(mine) / len(mine), "contexts": contexts, "depths": depths, "grid": grid}
    written[1].write_text(json.dumps(summary, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    fig, axes = plt.subplots(1, len(modes), figsize=(4.5 * len(modes), 4), squeeze=False, layout="constrained")
    for i, (ax, mode) in enumerate(zip(axes[0], modes)):
        s = summary[mode]
        image = ax.imshow(s["grid"], vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(s["contexts"])), [f"{c // 1024}k" if c >= 1024 else str(c) for c in s["contexts"]])
        ax.set_yticks(range(len(s["depths"])), [f"{d:.0%}" for d in s["depths"]])
        ax.set_xlabel("context length (tokens)")
        if i == 0:
            ax.set_ylabel("needle depth")
        ax.set_title(f"{mode} attention: {s['accuracy']:.0%} correct")
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy")
    fig.savefig(out_dir / "niah.png", dpi=120)
    plt.close(fig)
    written.append(out_dir / "niah.png")
    return written
