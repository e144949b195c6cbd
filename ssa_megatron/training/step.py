"""One optimizer step's micro-batches, and Megatron's ``forward_step_func``: forward and LM loss of one micro-batch.

``StepBatches`` fetches one optimizer step's micro-batches up front, so every model chunk (interleaved pipeline)
sees the same batches, the loader's position after a step is exact, and the NaN check can re-run the step's last
micro-batch. ``reduce_lm_losses`` turns the schedule's per-micro-batch reports into the step's token-mean loss
(training and the held-out evaluation both log it).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ssa_megatron.megatron.mode import MODE_SAMPLER, last_mode


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


class StepBatches:
    """One optimizer step's micro-batches, fetched once and served to every model chunk."""

    def __init__(self, loader, num_microbatches: int, device: torch.device):
        self.loader = loader
        self.num_microbatches = num_microbatches
        self.device = device
        self.batches: list[dict[str, torch.Tensor]] = []

    def next_step(self, num_chunks: int) -> list[Iterator[dict[str, torch.Tensor]]]:
        self.batches = [to_device(next(self.loader), self.device) for _ in range(self.num_microbatches)]
        return [iter(self.batches) for _ in range(num_chunks)]

    @property
    def tokens_per_step(self) -> int:
        return sum(int(b["loss_mask"].numel()) for b in self.batches)


# --------------------------------------------------------------------------------------------------------------
# One micro-batch: forward and loss.

def forward_step(data_iterator, model, *, document_mask: bool = False):
    """Megatron's forward_step_func: returns the per-token LM loss and the function that reduces it."""
    batch = next(data_iterator)
    packed = _packed_seq_params(batch) if document_mask else None  # boundaries over the whole sequence
    if parallel_state.get_context_parallel_world_size() > 1:
        batch = _slice_for_context_parallel(batch)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], packed_seq_params=packed)
    return output, partial(loss_func, batch["loss_mask"])


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Token-mean LM loss of the micro-batch (this rank's tokens), and what to log: the sum, the count, the mode."""
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.reshape(-1).float()
    total = (losses * mask).sum()
    count = mask.sum()
    mean = total / count.clamp(min=1.0)
    return mean, {"lm_sum": total.detach(), "tokens": count.detach(), "mode": last_mode() or "full"}


def _slice_for_context_parallel(batch: dict) -> dict:
    """Megatron's load-balanced split: rank r keeps sequence chunks r and 2cp-1-r (positions stay global)."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    keys = ("tokens", "labels", "position_ids", "loss_mask")
    sliced = get_batch_on_this_cp_rank({k: batch[k] for k in keys}, False)
    return {**batch, **sliced}


def _packed_seq_params(batch: dict):
    """Document boundaries (``cu_seqlens`` over the flattened b·s stream) for ``ssa.document_mask`` (None
    otherwise, as in ordinary pretraining)."""
    if batch.get("cu_seqlens") is None:
        raise ValueError("ssa.document_mask=true needs batches with cu_seqlens (the token-shard loader gives them)")
    from ssa_megatron.megatron.attention import document_packed_seq_params

    return document_packed_seq_params(batch["cu_seqlens"], batch["tokens"].shape[1])


def rerun_last_microbatch(model, feed: StepBatches, iteration: int) -> None:
    """Forward of the step's last micro-batch again (for locating a non-finite activation)."""
    if not feed.batches:
        return
    MODE_SAMPLER.set_iteration(iteration)
    batch = feed.batches[-1]
    from megatron.core.utils import get_attr_wrapped_model

    if not get_attr_wrapped_model(model[0], "pre_process"):
        return  # pipeline stages after the first need the previous stage's activations
    model[0](batch["tokens"], batch["position_ids"], None, labels=batch["labels"])


# --------------------------------------------------------------------------------------------------------------
# The step's loss for logging (every rank calls this).

def reduce_lm_losses(reports: list[dict], dims) -> dict[str, float]:
    """Token-mean LM loss over the whole step, overall and per mode (full / sparse)."""
    vec = torch.zeros(4, dtype=torch.float64)
    if dims.is_last_stage and dims.tp_rank == 0:  # TP ranks hold copies of the same loss
        for r in reports:
            i = 0 if r["mode"] == "full" else 2
            vec[i] += float(r["lm_sum"])
            vec[i + 1] += float(r["tokens"])
    if dist.is_initialized() and dist.get_world_size() > 1:
        vec = vec.to(dims.device)
        dist.all_reduce(vec)
        vec = vec.cpu()
    full_sum, full_n, sparse_sum, sparse_n = vec.tolist()
    out = {"loss/lm": (full_sum + sparse_sum) / max(full_n + sparse_n, 1.0)}
    if full_n:
        out["loss/lm_full"] = full_sum / full_n
    if sparse_n:
        out["loss/lm_sparse"] = sparse_sum / sparse_n
    out["loss/ppl"] = math.exp(min(out["loss/lm"], 50.0)) if math.isfinite(out["loss/lm"]) else out["loss/lm"]
    return out
