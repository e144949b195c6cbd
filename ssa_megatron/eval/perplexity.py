"""Perplexity and attention statistics of an ``SSALlamaForCausalLM`` under full and sparse inference.

The model does the SSA math (``ssa_attention``); this module only chooses the mode and budget
(``set_attention_mode``), runs held-out batches and reduces token losses and per-layer statistics.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F

METRICS = ("sparsity", "entropy_bits", "kl_full_sparse", "sink_mass")


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """An ``SSALlamaForCausalLM`` in eval mode from an HF folder (config.json) or a Megatron checkpoint (run dir,
    checkpoints/ dir or step dir, converted in memory)."""
    import ssa_megatron.hf  # noqa: F401  (registers ssa_llama with the Auto classes)
    from ssa_megatron.hf import convert
    from ssa_megatron.hf.configuration import hf_config_from_recipe
    from ssa_megatron.hf.modeling import SSALlamaForCausalLM

    p = Path(path).expanduser()
    if (p / "config.json").is_file():
        model = SSALlamaForCausalLM.from_pretrained(str(p), dtype=dtype)
    else:
        from ssa_megatron.training.checkpoint import read_checkpoint_recipe, read_model_tensors, resolve_checkpoint

        ckpt = resolve_checkpoint(p)
        recipe, data = read_checkpoint_recipe(ckpt)
        config = hf_config_from_recipe(recipe)
        config.megatron_recipe = data
        hf = convert.megatron_to_hf_state_dict(read_model_tensors(ckpt), config, f"checkpoint {str(ckpt)!r}")
        model = convert.hf_model_from_state_dict(hf, config)
        if dtype is not None:
            model = model.to(dtype)
    return model.to(device).eval()


def _forward(model, batch: dict, device) -> torch.Tensor:
    kwargs = {}
    if model.config.ssa_document_mask and batch.get("cu_seqlens") is not None:
        kwargs["cu_seqlens"] = batch["cu_seqlens"].to(device)
    return model(batch["tokens"].to(device), position_ids=batch["position_ids"].to(device), **kwargs).logits


@torch.no_grad()
def perplexity(model, batches: Iterable[dict], progress=None) -> dict[str, float]:
    """Token-mean negative log-likelihood (nats) over ``loss_mask`` and its exponential.

    Returns ``{"loss", "ppl", "tokens"}``, and when every batch carries ``words`` (``eval.data.count_words``) also
    ``{"words", "word_ppl"}``: the same total negative log-likelihood per word, ``exp(NLL_total / words)``, the
    tokenizer-independent perplexity the paper reports for WikiText. ``progress`` is called once per batch (e.g.
    a tqdm ``update``).
    """
    device = next(model.parameters()).device
    total, count, words = 0.0, 0.0, 0
    with_words = True
    for batch in batches:
        logits = _forward(model, batch, device).float()
        nll = F.cross_entropy(logits.flatten(0, 1), batch["labels"].to(device).flatten(), reduction="none")
        mask = batch["loss_mask"].to(device).flatten().float()
        total += float((nll * mask).sum())
        count += float(mask.sum())
        with_words = with_words and "words" in batch
        words += int(batch.get("words", 0))
        if progress is not None:
            progress(1)
    if count == 0:
        raise ValueError("perplexity: the batches have no tokens with loss_mask > 0")
    loss = total / count
    out = {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": int(count)}
    if with_words and words > 0:
        out.update(words=words, word_ppl=math.exp(min(total / words, 700.0)))
    return out


@torch.no_grad()
def attention_statistics(model, batches: Iterable[dict], progress=None) -> list[dict[str, float]]:
    """Per layer: ``reference.attention_metrics`` (sparsity, entropy_bits, kl_full_sparse, sink_mass) of the full
    attention against the selection of the model's current budget, averaged over heads and batches (each batch
    weighted by its rows). O(s²) memory per head: use moderate sequence lengths."""
    device = next(model.parameters()).device
    layers = model.ssa_attention_modules()
    sums = [dict.fromkeys(METRICS, 0.0) for _ in layers]
    rows = 0
    model.collect_attention_metrics(True)
    try:
        for batch in batches:
            _forward(model, batch, device)
            b = batch["tokens"].shape[0]
            for acc, attn in zip(sums, layers):
                for name in METRICS:
                    acc[name] += float(attn.last_metrics[name].float().mean()) * b
            rows += b
            if progress is not None:
                progress(1)
    finally:
        model.collect_attention_metrics(False)
    return [{"layer": i + 1, **{k: v / rows for k, v in acc.items()}} for i, acc in enumerate(sums)]
