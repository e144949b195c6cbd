"""NaN/Inf detection: stop the run with the step, the layer and the quantity named.

Checked every step: the LM loss, each layer's alignment loss and the gradient norm. When one is not finite,
the culprit is located: a per-layer alignment loss names its layer directly; a non-finite LM loss re-runs the
forward of the step's last micro-batch with hooks and names the first layer (and sub-module) whose output is
not finite; a non-finite gradient norm names the first layer holding a non-finite gradient.
Layers are numbered from 0 (global index across pipeline stages, as in ``decoder.layers.<i>``).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer


class NonFiniteError(RuntimeError):
    """A watched quantity is NaN or infinite. ``ssa-train`` prints its one-line message and ``hint`` (exit 1)."""

    hint = ("the failed step wrote no checkpoint and the last one is intact: fix the cause (a lower optim.lr, "
            "optim.grad_clip, the data) and rerun the same command to resume; --debug shows the traceback")

    def __init__(self, step: int, quantity: str, value: float, layer: int | None, detail: str = ""):
        self.step, self.quantity, self.value, self.layer = step, quantity, value, layer
        where = f"layer {layer}" if layer is not None else "no single layer identified"
        super().__init__(f"step {step}: {quantity} is {value} ({where}{'; ' + detail if detail else ''})")


def transformer_layers(model_chunks: Iterable[torch.nn.Module]) -> list[tuple[int, TransformerLayer]]:
    """(global 0-based index, layer) for the layers on this rank."""
    found = []
    for chunk in model_chunks:
        for module in chunk.modules():
            if isinstance(module, TransformerLayer):
                found.append((module.layer_number - 1, module))
    return sorted(found, key=lambda x: x[0])


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def first_nonfinite_grad(model_chunks) -> tuple[int | None, str] | None:
    """(layer, parameter name) of the first parameter with a non-finite gradient, layers first."""
    def grad_of(p: torch.nn.Parameter):
        g = getattr(p, "main_grad", None)  # Megatron DDP accumulates into main_grad
        return g if g is not None else p.grad

    for index, layer in transformer_layers(model_chunks):
        for name, p in layer.named_parameters():
            g = grad_of(p)
            if g is not None and not _finite(g):
                return index, name
    for chunk in model_chunks:
        for name, p in chunk.named_parameters():
            g = grad_of(p)
            if g is not None and not _finite(g):
                return None, name
    return None


def first_nonfinite_forward(model_chunks, run_forward: Callable[[], None]) -> tuple[int | None, str] | None:
    """Re-runs a forward (no grad) with hooks; (layer, sub-module) of the first non-finite output."""
    hits: list[tuple[int | None, str]] = []
    handles = []

    def hook(index, label):
        def fn(_module, _inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            if not hits and torch.is_tensor(out) and not _finite(out):
                hits.append((index, label))
        return fn

    for chunk in model_chunks:
        for name, module in chunk.named_modules():
            if name.endswith("embedding") and not name.endswith("rotary_pos_emb"):
                handles.append(module.register_forward_hook(hook(None, "embedding")))
    for index, layer in transformer_layers(model_chunks):
        for label in ("input_layernorm", "self_attention", "pre_mlp_layernorm", "mlp"):
            sub = getattr(layer, label, None)
            if isinstance(sub, torch.nn.Module):
                handles.append(sub.register_forward_hook(hook(index, label)))
        handles.append(layer.register_forward_hook(hook(index, "output")))
    try:
        with torch.no_grad():
            run_forward()
    finally:
        for h in handles:
            h.remove()
    return hits[0] if hits else None


def check_step(
    step: int,
    *,
    lm_loss: float | None,
    align_per_layer: list[float] | None,
    grad_norm: float | None,
    model_chunks,
    rerun_forward: Callable[[], None] | None,
) -> None:
    """Raises NonFiniteError when a watched quantity is not finite."""
    if align_per_layer is not None:
        for layer, value in enumerate(align_per_layer):
            if not math.isfinite(value):
                raise NonFiniteError(step, "alignment loss", value, layer)
    if lm_loss is not None and not math.isfinite(lm_loss):
        hit = first_nonfinite_forward(model_chunks, rerun_forward) if rerun_forward else None
        if hit is not None:
            layer, label = hit
            raise NonFiniteError(step, "LM loss", lm_loss, layer, f"first non-finite activation: {label}")
        raise NonFiniteError(step, "LM loss", lm_loss, None)
    if grad_norm is not None and not math.isfinite(grad_norm):
        hit = first_nonfinite_grad(model_chunks)
        layer, name = hit if hit else (None, "")
        raise NonFiniteError(step, "gradient norm", grad_norm, layer,
                             f"first non-finite gradient: {name}" if name else "")
