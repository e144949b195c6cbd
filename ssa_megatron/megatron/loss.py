"""The alignment loss's path into the gradients: an identity autograd function that injects ``d(loss) = scale``.

Megatron returns only the LM loss from a pipeline stage; auxiliary losses ride on an activation of the layer that
computed them (as ``MoEAuxLossAutoScaler`` and ``DSAIndexerLossAutoScaler`` do), so their gradient is produced by
the ordinary backward of the stage that owns the layer. The scale is set after every micro-batch forward, on every
stage, by megatron-core 0.19's hook ``TransformerConfig.experimental_attention_variant_loss_scale_func``
(``transformer_config_from_recipe`` installs :func:`set_alignment_loss_scale` there) with

- ``loss_scale * cp_size / num_microbatches`` (default path), or
- ``loss_scale`` with ``calculate_per_token_loss`` (the grads are divided by the step's token count later),

where ``loss_scale`` is the fp16 grad scaler's scale (1 otherwise). The layer attaches
``alpha / num_layers * weight * L_layer`` (:func:`attach_alignment_loss`), where ``weight`` makes the per-rank
losses sum to the global mean (:func:`alignment_loss_weight`), so the gradient is that of
``alpha * mean_over_layers(L_layer)`` normalised like the token-mean LM loss of one optimizer step under any
schedule, DP, CP and gradient accumulation.
"""

from __future__ import annotations

import torch
from torch import Tensor


class AlignmentLossScaler(torch.autograd.Function):
    """``forward(output, loss) -> output``; backward passes ``grad_output`` through and gives ``loss`` the gradient
    ``main_loss_backward_scale``."""

    main_loss_backward_scale: Tensor | None = None

    @staticmethod
    def forward(ctx, output: Tensor, loss: Tensor) -> Tensor:
        ctx.save_for_backward(loss)
        return output

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (loss,) = ctx.saved_tensors
        scale = AlignmentLossScaler.main_loss_backward_scale
        if scale is None:
            grad_loss = torch.ones_like(loss)
        else:
            grad_loss = torch.ones_like(loss) * scale.to(device=loss.device, dtype=loss.dtype)
        return grad_output, grad_loss

    @staticmethod
    def set_loss_scale(scale: Tensor | float) -> None:
        """Sets the gradient injected for the alignment loss (called by the schedules every micro-batch)."""
        scale = torch.as_tensor(scale).detach().float().reshape(())
        if AlignmentLossScaler.main_loss_backward_scale is None:
            AlignmentLossScaler.main_loss_backward_scale = scale.clone()
        else:
            current = AlignmentLossScaler.main_loss_backward_scale
            if current.device != scale.device:
                AlignmentLossScaler.main_loss_backward_scale = scale.clone()
            else:
                current.copy_(scale)


def set_alignment_loss_scale(scale: Tensor | float) -> None:
    """The ``experimental_attention_variant_loss_scale_func`` hook."""
    AlignmentLossScaler.set_loss_scale(scale)


def alignment_loss_weight(
    alpha: float, num_layers: int, tp_size: int, cp_size: int, per_token_loss: bool, local_tokens: int
) -> float:
    """The factor a layer multiplies its local alignment loss by before attaching it.

    The local loss is a mean over this rank's elements: its heads (1/tp of them) and, under CP, its queries
    (1/cp of them). Tensor-parallel gradients of replicated weights are summed over TP ranks, and DDP averages over
    DP×CP while the schedule's scale carries ``cp_size``; so ``1/(tp·cp)`` makes the ranks' contributions add up to
    the global element mean. With per-token loss the LM loss is a token sum divided by the step's token count
    later; the alignment loss is then weighted by this rank's tokens (``sq·b``) so that it is normalised the same
    way (TP ranks share tokens: ``1/tp`` only).
    """
    base = alpha / num_layers / tp_size
    if per_token_loss:
        return base * local_tokens
    return base / cp_size


def attach_alignment_loss(output: Tensor, loss: Tensor, weight: float) -> Tensor:
    """``output``, carrying ``loss * weight`` into the backward (:class:`AlignmentLossScaler`).

    Nothing is attached when the loss has no gradient to give: a forward under no_grad (the first pass of a
    checkpointed region, whose recompute attaches it), or a loss that was not computed.
    """
    if not (torch.is_grad_enabled() and loss.requires_grad):
        return output
    return AlignmentLossScaler.apply(output, loss * weight)
