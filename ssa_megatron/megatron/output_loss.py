"""The output layer and its cross entropy over a bounded number of tokens at a time (``train.loss_chunk_tokens``).

Megatron's GPTModel multiplies all ``s·b`` final hidden states by the output weight at once: bf16 logits
``[s, b, V/tp]``, which its cross entropy turns into an fp32 copy and keeps as the softmax for backward, and
backward makes a logits-sized gradient. At 32k tokens and vocabulary 128256 each of these is 8 to 16 GB.
:func:`chunked_lm_loss` gives the same per-token loss ``[b, s]`` while holding one chunk's logits at a time.

- Forward, per chunk of ``chunk_tokens`` tokens: the logits GEMM, then Megatron's own cross-entropy steps
  (``VocabParallelCrossEntropy``, or its ``torch.compile``d versions in ``megatron.core.fusions`` when
  ``fused``), including the all-reduces over the tensor-parallel group: MAX of the row maxima, SUM of the target
  logit and of the sum of exponentials. Kept for backward: the inputs, and two fp32 numbers per token.
- Backward, per chunk: the logits GEMM again, the softmax from the kept maximum and sum, Megatron's gradient
  step, then ``grad_hidden = g @ W`` and ``grad_weight += gᵀ @ h``. The logits are recomputed because the loss
  leaves per token and is reduced outside (loss mask, the schedule's scaling): the weight gradient needs the
  per-token ``grad_output``, which exists only in backward. The cost is one more output-layer GEMM.

The weight gradient of several chunks is summed in fp32 and rounded to the weight's dtype once, as a single GEMM
would. It is returned through autograd, so it lands in ``weight.grad`` (and, through Megatron DDP's hooks, in
``main_grad``) like the output layer's. That holds with ``gradient_accumulation_fusion`` on too: the output
layer's own fused GEMM never runs here, so DDP's hook adds this gradient to ``main_grad``. Tied embeddings pass the embedding weight (GPTModel's
``output_weight``); both uses sum into its gradient as before.

Tensor parallelism: the weight is split by vocabulary. The hidden states enter through Megatron's own region
functions, ``copy_to_tensor_model_parallel_region`` (backward: all-reduce) or, under sequence parallelism,
``gather_from_sequence_parallel_region`` (forward all-gather, backward reduce-scatter), so the autograd Function
returns only this rank's partial ``grad_hidden``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.fusions import fused_cross_entropy as fused
from megatron.core.jit import jit_fuser
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy as VPCE
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.utils import get_pg_rank, get_pg_size


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int,
                    tp_group, sequence_parallel: bool = False, fused_ops: bool = False) -> torch.Tensor:
    """Per-token LM loss ``[b, s]`` (fp32) of ``hidden`` ``[s(/tp), b, H]`` under the output ``weight``
    ``[V/tp, H]`` and ``labels`` ``[b, s]``; equal to GPTModel's ``output_layer`` followed by
    ``compute_language_model_loss``. ``sequence_parallel``: ``hidden`` holds this rank's ``s/tp`` positions.
    ``fused_ops``: Megatron's compiled cross-entropy steps (its ``cross_entropy_loss_fusion``, CUDA only)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens!r}: must be >= 1")
    if sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True, group=tp_group)
    else:
        hidden = copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    s, b, h = hidden.shape
    if labels.shape != (b, s):
        raise ValueError(f"labels shape {tuple(labels.shape)}: must be (b, s) = {(b, s)} of the hidden states")
    # [s, b] token order, the hidden states' own: each chunk is a contiguous row range.
    target = labels.t().reshape(-1)
    loss = _ChunkedLMLoss.apply(hidden.reshape(s * b, h), weight, target, chunk_tokens, tp_group, fused_ops)
    return loss.view(s, b).t().contiguous()


class _ChunkedLMLoss(torch.autograd.Function):
    """``hidden [T, H]``, ``weight [V/tp, H]``, ``target [T]`` → loss ``[T]`` fp32; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, target, chunk_tokens, tp_group, fuse):
        world = get_pg_size(tp_group)
        vocab = weight.shape[0]
        start = get_pg_rank(tp_group) * vocab
        n = hidden.shape[0]
        loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        logits_max, sum_exp = torch.empty_like(loss), torch.empty_like(loss)
        for a in range(0, n, chunk_tokens):
            z = min(a + chunk_tokens, n)
            logits = torch.matmul(hidden[a:z], weight.t())
            # Megatron's steps on this chunk (tensor_parallel/cross_entropy.py, fusions/fused_cross_entropy.py).
            logits, m = (fused if fuse else VPCE).calculate_logits_max(logits)
            if world > 1:
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
            if fuse:
                _, _, pred_sum, _ = fused.calculate_predicted_logits(logits, target[a:z], m, start, start + vocab)
            else:
                _, _, pred, chunk_sum, _ = VPCE.calculate_predicted_logits(logits, target[a:z], m, start,
                                                                           start + vocab)
                pred_sum = torch.cat((pred, chunk_sum))
            del logits
            if world > 1:  # one all-reduce for both, as Megatron's fused path does
                dist.all_reduce(pred_sum, op=dist.ReduceOp.SUM, group=tp_group)
            pred, chunk_sum = pred_sum.split(z - a)
            loss[a:z] = torch.log(chunk_sum) - pred
            logits_max[a:z], sum_exp[a:z] = m, chunk_sum
        ctx.save_for_backward(hidden, weight, target, logits_max, sum_exp)
        ctx.chunk_tokens, ctx.start, ctx.fuse = chunk_tokens, start, fuse
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, target, logits_max, sum_exp = ctx.saved_tensors
        chunk, start, vocab = ctx.chunk_tokens, ctx.start, weight.shape[0]
        n = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden)
        grad_loss = grad_loss.contiguous()
        # One chunk: the GEMM's own output. Several: summed in fp32 and rounded once, as one GEMM would be.
        grad_weight = None
        for a in range(0, n, chunk):
            z = min(a + chunk, n)
            h = hidden[a:z]
            logits = torch.matmul(h, weight.t())
            target_mask = (target[a:z] < start) | (target[a:z] >= start + vocab)
            masked_target = (target[a:z] - start).masked_fill(target_mask, 0)
            g = _logits_grad(logits, logits_max[a:z], sum_exp[a:z], target_mask, masked_target, grad_loss[a:z],
                             ctx.fuse)
            del logits
            g = g.to(weight.dtype)
            torch.matmul(g, weight, out=grad_hidden[a:z])
            part = torch.matmul(g.t(), h)
            if z - a == n:
                grad_weight = part
            elif grad_weight is None:
                grad_weight = part.float()
            else:
                grad_weight += part
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None


def _softmax(logits: torch.Tensor, logits_max: torch.Tensor, sum_exp: torch.Tensor) -> torch.Tensor:
    """This rank's softmax slice, fp32, from the forward's global maximum and sum (Megatron's ``exp_logits``)."""
    return torch.exp(logits.float() - logits_max.unsqueeze(-1)).div_(sum_exp.unsqueeze(-1))


_fused_softmax = jit_fuser(_softmax)


def _logits_grad(logits, logits_max, sum_exp, target_mask, masked_target, grad_loss, fuse):
    """d loss / d logits of one chunk: Megatron's gradient step on the recomputed softmax."""
    if fuse:
        softmax = _fused_softmax(logits, logits_max, sum_exp)
        return fused.calculate_gradients(softmax, grad_loss, target_mask, masked_target)
    softmax = _softmax(logits, logits_max, sum_exp)
    grad_2d, rows, update, grad = VPCE.prepare_gradient_calculation_operands(softmax, target_mask)
    return VPCE.calculate_gradients(grad_2d, rows, masked_target, update, grad, grad_loss)
