"""One optimizer step's micro-batches, and Megatron's ``forward_step_func``: forward and LM loss of one micro-batch.

``StepBatches`` fetches one optimizer step's micro-batches up front, so every model chunk (interleaved pipeline)
sees the same batches, the loader's position after a step is exact, and the NaN check can re-run the step's last
micro-batch. ``reduce_lm_losses`` turns the schedule's per-micro-batch reports into the step's token-mean loss
(the held-out evaluation logs it); ``StepReport`` does the same for a training step, with the SSA metrics and the
stop vote, without making the host wait for the GPU.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ssa_megatron.megatron.mode import MODE_SAMPLER, last_mode
from ssa_megatron.megatron.tracker import tracker_values


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch on ``device``. To a GPU the copy is asynchronous: from pinned memory it queues behind the work
    already launched instead of waiting for it, so the next step's batches go up while the GPU still computes."""
    if device.type != "cuda":
        return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    return {k: (_pinned(v).to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _pinned(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_cuda or t.is_pinned() else t.pin_memory()


class StepBatches:
    """One optimizer step's micro-batches, fetched once and served to every model chunk.

    :meth:`prefetch` fetches the next step's micro-batches while the GPU still runs the current step, so the next
    step starts without the GPU waiting for the host (the loader's work and the host-to-device copies). The
    checkpointed loader position (:meth:`state_dict`) stays the one before a prefetched step: a checkpoint after
    step N resumes at step N + 1's batches whether or not they were fetched already.
    """

    def __init__(self, loader, num_microbatches: int, device: torch.device):
        self.loader = loader
        self.num_microbatches = num_microbatches
        self.device = device
        self.batches: list[dict[str, torch.Tensor]] = []
        self._ahead: tuple[list[dict[str, torch.Tensor]], dict] | None = None

    def _fetch(self) -> list[dict[str, torch.Tensor]]:
        return [to_device(next(self.loader), self.device) for _ in range(self.num_microbatches)]

    def prefetch(self) -> None:
        """Fetches the next step's micro-batches now (at most one step ahead)."""
        if self._ahead is None:
            state = self.loader.state_dict()
            self._ahead = (self._fetch(), state)

    def next_step(self, num_chunks: int) -> list[Iterator[dict[str, torch.Tensor]]]:
        if self._ahead is not None:
            self.batches, self._ahead = self._ahead[0], None
        else:
            self.batches = self._fetch()
        return [iter(self.batches) for _ in range(num_chunks)]

    def state_dict(self) -> dict:
        """The loader's position after the last step served (a prefetched step not counted)."""
        return self._ahead[1] if self._ahead is not None else self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._ahead = None
        self.loader.load_state_dict(state)

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


def rerun_last_microbatch(model, batches: list[dict], iteration: int) -> None:
    """Forward of a step's last micro-batch again (for locating a non-finite activation)."""
    if not batches:
        return
    MODE_SAMPLER.set_iteration(iteration)
    batch = batches[-1]
    from megatron.core.utils import get_attr_wrapped_model

    if not get_attr_wrapped_model(model[0], "pre_process"):
        return  # pipeline stages after the first need the previous stage's activations
    model[0](batch["tokens"], batch["position_ids"], None, labels=batch["labels"])


# --------------------------------------------------------------------------------------------------------------
# The step's loss and metrics for logging (every rank calls these).

def _lm_sums(reports: list[dict], dims, device: torch.device) -> torch.Tensor:
    """This rank's ``[full loss sum, full tokens, sparse loss sum, sparse tokens]`` (float64 on ``device``),
    summed on the device: reading the reports one by one would wait for the GPU at each."""
    vec = torch.zeros(4, dtype=torch.float64, device=device)
    if dims.is_last_stage and dims.tp_rank == 0:  # TP ranks hold copies of the same loss
        for r in reports:
            i = 0 if r["mode"] == "full" else 2
            vec[i] += r["lm_sum"].to(vec)
            vec[i + 1] += r["tokens"].to(vec)
    return vec


def reduce_lm_losses(reports: list[dict], dims) -> dict[str, float]:
    """Token-mean LM loss over the whole step, overall and per mode (full / sparse)."""
    vec = _lm_sums(reports, dims, dims.device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(vec)
    return _lm_values(vec.cpu())


def _lm_values(vec: torch.Tensor) -> dict[str, float]:
    full_sum, full_n, sparse_sum, sparse_n = vec.tolist()
    out = {"loss/lm": (full_sum + sparse_sum) / max(full_n + sparse_n, 1.0)}
    if full_n:
        out["loss/lm_full"] = full_sum / full_n
    if sparse_n:
        out["loss/lm_sparse"] = sparse_sum / sparse_n
    out["loss/ppl"] = math.exp(min(out["loss/lm"], 50.0)) if math.isfinite(out["loss/lm"]) else out["loss/lm"]
    return out


class StepReport:
    """One training step's logged values, reduced over every rank on the device and copied to the host without
    waiting: the LM loss per mode (as ``reduce_lm_losses``), the SSA tracker's sums (as its ``reduce``), and the
    stop vote (any rank asked to stop). The loop launches the next step before it reads a report (:meth:`read`),
    so the host's per-step work (logging, the NaN check, the stop vote) overlaps the GPU's next step instead of
    leaving the GPU idle between steps.

    One all-reduce (SUM) carries everything: a stop vote > 0 means some rank voted. ``tracker.take()`` resets the
    tracker, so the next step records into empty sums while this one is still being reduced.
    """

    def __init__(self, step: int, reports: list[dict], dims, tracker, stop_vote: bool, num_layers: int, mark):
        self.step = step
        device = dims.device
        packed, self.modes = tracker.take(num_layers)
        self._layers = packed.shape[-1]
        vec = torch.cat([_lm_sums(reports, dims, device), torch.full((1,), float(stop_vote), dtype=torch.float64,
                                                                      device=device),
                         packed.to(device).flatten()])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(vec)
        self._host = vec.to("cpu", non_blocking=True)  # pinned by torch for a device→host non-blocking copy
        self.end = mark()  # the step timer's mark (``Throughput.mark``): a CUDA event after the copy, on a GPU

    def read(self) -> tuple[dict[str, float], bool, dict[str, float]]:
        """(LM losses as ``reduce_lm_losses``, whether any rank voted to stop, SSA values as the tracker's
        ``reduce``); waits for this step, not for work launched after it."""
        if not isinstance(self.end, float):
            self.end.synchronize()
        vec = self._host
        return (_lm_values(vec[:4]), bool(vec[4] > 0),
                tracker_values(vec[5:].reshape(2, -1, self._layers), self.modes))
