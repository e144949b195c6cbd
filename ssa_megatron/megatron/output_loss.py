"""The output layer and its cross entropy over a bounded number of tokens at a time (``train.loss_chunk_tokens``).

Megatron's GPTModel multiplies all ``s·b`` final hidden states by the output weight at once: logits
``[s, b, V/tp]``, and a logits-sized gradient in backward (at 32k tokens and vocabulary 128256, 8 GiB each in
bf16; Megatron's own cross entropy adds fp32 copies). :func:`chunked_lm_loss` gives the same per-token loss
``[b, s]`` while holding one chunk's logits at a time.

- Forward, per chunk of ``chunk_tokens`` tokens: the logits GEMM, then the cross entropy of that chunk, including
  the all-reduces over the tensor-parallel group (MAX of the row maxima, SUM of the target logit and of the sum
  of exponentials). On CUDA it is ``ssa_kernels.cross_entropy`` (kept per token: the log-sum-exp); elsewhere
  Megatron's own steps (``VocabParallelCrossEntropy``; kept: the maximum and the sum of exponentials).
- Backward, per chunk: the logits GEMM again, the logits' gradient (CUDA: the kernel, written over the recomputed
  logits; elsewhere Megatron's gradient step on the recomputed softmax), then ``grad_hidden = g @ W`` and
  ``grad_weight += gᵀ @ h``. The logits are recomputed because the loss leaves per token and is reduced outside
  (loss mask, the schedule's scaling): the weight gradient needs the per-token ``grad_output``, which exists only
  in backward. The cost is one more output-layer GEMM.

The weight gradient of several chunks is summed in fp32 and rounded to the weight's dtype once, as a single GEMM
would: on CUDA with bf16/fp16 weights each chunk's GEMM accumulates into the fp32 sum itself (``torch.addmm`` with
``out_dtype=float32``: 16-bit inputs on the tensor cores, fp32 output); elsewhere each chunk's part is rounded to
the weight's dtype and added. It is returned through autograd, so it lands in ``weight.grad``, which Megatron
DDP's backward hook adds to ``main_grad``. That holds with ``gradient_accumulation_fusion`` on too: the fusion lives
in Megatron's linear layers, which mark the weights they accumulated themselves (``grad_added_to_main_grad``), and
this path does not run the output layer's. Tied embeddings pass the embedding weight (GPTModel's
``output_weight``); both uses sum into its gradient as before.

Tensor parallelism: the weight is split by vocabulary. The hidden states enter through Megatron's own region
functions, ``copy_to_tensor_model_parallel_region`` (backward: all-reduce) or, under sequence parallelism,
``gather_from_sequence_parallel_region`` (forward all-gather, backward reduce-scatter), so the autograd Function
returns only this rank's partial ``grad_hidden``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy as VPCE
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.utils import get_pg_rank, get_pg_size
from ssa_kernels.cross_entropy import cross_entropy_backward, cross_entropy_forward


def uses_triton_loss(t: torch.Tensor) -> bool:
    """Whether the LM loss of tensors on ``t``'s device is ``ssa_kernels.cross_entropy`` (CUDA) rather than
    Megatron's steps (elsewhere: on CPU the kernel would run through Triton's interpreter, which only tests do)."""
    return t.is_cuda


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int,
                    tp_group, sequence_parallel: bool = False) -> torch.Tensor:
    """Per-token LM loss ``[b, s]`` (fp32) of ``hidden`` ``[s(/tp), b, H]`` under the output ``weight``
    ``[V/tp, H]`` and ``labels`` ``[b, s]``; equal to GPTModel's ``output_layer`` followed by
    ``compute_language_model_loss``. ``sequence_parallel``: ``hidden`` holds this rank's ``s/tp`` positions."""
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
    loss = _ChunkedLMLoss.apply(hidden.reshape(s * b, h), weight, target, chunk_tokens, tp_group)
    return loss.view(s, b).t().contiguous()


class _ChunkedLMLoss(torch.autograd.Function):
    """``hidden [T, H]``, ``weight [V/tp, H]``, ``target [T]`` → loss ``[T]`` fp32; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, target, chunk_tokens, tp_group):
        n = hidden.shape[0]
        kernel = uses_triton_loss(hidden)
        loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        # per token, for backward: the log-sum-exp (CUDA), or Megatron's maximum and sum of exponentials
        stats = torch.empty(1 if kernel else 2, n, dtype=torch.float32, device=hidden.device)
        for a in range(0, n, chunk_tokens):
            z = min(a + chunk_tokens, n)
            logits = torch.matmul(hidden[a:z], weight.t())
            if kernel:
                loss[a:z], stats[0, a:z] = cross_entropy_forward(logits, target[a:z], tp_group)
            else:
                loss[a:z], stats[0, a:z], stats[1, a:z] = _megatron_loss(logits, target[a:z], tp_group)
            del logits
        ctx.save_for_backward(hidden, weight, target, stats)
        ctx.chunk_tokens, ctx.tp_group, ctx.kernel = chunk_tokens, tp_group, kernel
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, target, stats = ctx.saved_tensors
        chunk, group = ctx.chunk_tokens, ctx.tp_group
        n = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden)
        grad_loss = grad_loss.contiguous()
        grad_weight = None
        for a in range(0, n, chunk):
            z = min(a + chunk, n)
            h = hidden[a:z]
            logits = torch.matmul(h, weight.t())
            if ctx.kernel:
                g = cross_entropy_backward(logits, target[a:z], stats[0, a:z], grad_loss[a:z], out=logits,
                                           tp_group=group)
            else:
                g = _megatron_grad(logits, target[a:z], stats[0, a:z], stats[1, a:z], grad_loss[a:z], group)
                g = g.to(weight.dtype)
            del logits
            torch.matmul(g, weight, out=grad_hidden[a:z])
            grad_weight = _add_weight_grad(grad_weight, g, h, only_chunk=z - a == n)
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None


def _add_weight_grad(grad_weight, g, h, only_chunk: bool):
    """``grad_weight + gᵀ @ h``. One chunk: the GEMM's own output, as the unchunked layer's. Several: an fp32 sum."""
    if only_chunk:
        return torch.matmul(g.t(), h)
    if g.is_cuda and g.dtype in (torch.float16, torch.bfloat16):
        # 16-bit GEMM on the tensor cores with fp32 accumulation and output, added into the fp32 sum in place
        if grad_weight is None:
            return torch.mm(g.t(), h, out_dtype=torch.float32)
        return torch.addmm(grad_weight, g.t(), h, out_dtype=torch.float32, out=grad_weight)
    part = torch.matmul(g.t(), h)  # out_dtype is CUDA-only: each part rounded to the weight's dtype, then summed
    return part.float() if grad_weight is None else grad_weight.add_(part)


def _megatron_loss(logits, target, tp_group):
    """(loss, row maximum, sum of exponentials) of one chunk by Megatron's steps (tensor_parallel/cross_entropy.py),
    with its fused path's single all-reduce for the target logit and the sum."""
    world, vocab = get_pg_size(tp_group), logits.shape[-1]
    start = get_pg_rank(tp_group) * vocab
    logits, logits_max = VPCE.calculate_logits_max(logits)
    if world > 1:
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=tp_group)
    _, _, pred, sum_exp, _ = VPCE.calculate_predicted_logits(logits, target, logits_max, start, start + vocab)
    pred_sum = torch.cat((pred, sum_exp))
    if world > 1:
        dist.all_reduce(pred_sum, op=dist.ReduceOp.SUM, group=tp_group)
    pred, sum_exp = pred_sum.split(len(target))
    return torch.log(sum_exp) - pred, logits_max, sum_exp


def _megatron_grad(logits, target, logits_max, sum_exp, grad_loss, tp_group):
    """d loss / d logits of one chunk: Megatron's gradient step on the softmax recomputed from the forward's global
    maximum and sum (its ``exp_logits``), fp32."""
    vocab = logits.shape[-1]
    start = get_pg_rank(tp_group) * vocab
    target_mask = (target < start) | (target >= start + vocab)
    masked_target = (target - start).masked_fill(target_mask, 0)
    softmax = torch.exp(logits.float() - logits_max.unsqueeze(-1)).div_(sum_exp.unsqueeze(-1))
    grad_2d, rows, update, grad = VPCE.prepare_gradient_calculation_operands(softmax, target_mask)
    return VPCE.calculate_gradients(grad_2d, rows, masked_target, update, grad, grad_loss)
