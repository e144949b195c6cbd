"""Per-layer SSA metrics of one optimizer step, reduced over ranks for logging.

Every SSA layer records, per training micro-batch, its alignment loss and its two terms (sparsity: full moves toward
sparse; commitment: sparse moves toward full), the mode it ran, and, on steps where the loop asks for them,
attention statistics (``with_metrics``: attention sparsity, entropy, KL, sink mass; mean over local heads).
Values are kept as sums (on the recording device) and counts in ``[num_layers]`` tensors indexed by the global
layer number.

:meth:`SSAMetricsTracker.reduce` sums sums and counts over a process group (default: the whole world) and divides:
each layer lives on one pipeline stage, so this is a sum over PP stages and a mean over DP, CP and TP ranks and
micro-batches. Every rank must call it (ranks of stages that recorded nothing contribute zeros). The training loop
does the same in two halves (:meth:`~SSAMetricsTracker.take` now, :func:`tracker_values` one step later). Recompute
forwards do not record, so nothing is counted twice.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist
from torch import Tensor

from ssa_megatron.ssa import SSAStats

LOSS_NAMES = ("alignment_loss", "sparsity_loss", "commitment_loss")
METRIC_NAMES = ("sparsity", "entropy_bits", "kl_full_sparse", "sink_mass")
TRACKED_NAMES = LOSS_NAMES + tuple(f"attn_{m}" for m in METRIC_NAMES)


class SSAMetricsTracker:
    def __init__(self) -> None:
        self.num_layers = 0
        self.collect_metrics = False
        """Set by the training loop on steps where attention statistics should be computed (costly)."""
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, Tensor] = {}
        self.modes: Counter[str] = Counter()
        self._mode_keys: set[tuple[int, int]] = set()

    def _ensure(self, num_layers: int) -> None:
        if num_layers > self.num_layers:
            grow = num_layers - self.num_layers
            for store in (self.sums, self.counts):
                for name, value in store.items():
                    store[name] = torch.cat([value, value.new_zeros(grow)])
            self.num_layers = num_layers

    def record(self, name: str, layer_number: int, num_layers: int, value: Tensor | float) -> None:
        """Adds one micro-batch's value for layer ``layer_number`` (1-based, global).

        A tensor value is summed on its own device: reading it here (``float(value)``) would stall the host on
        the GPU at every layer of every micro-batch. The host sees the sums once per step, in :meth:`reduce`.
        """
        self._ensure(num_layers)
        if isinstance(value, Tensor):
            value = value.detach().reshape(()).to(torch.float64)
        else:
            value = torch.tensor(float(value), dtype=torch.float64)
        if name not in self.sums:
            self.sums[name] = torch.zeros(self.num_layers, dtype=torch.float64, device=value.device)
            self.counts[name] = torch.zeros(self.num_layers, dtype=torch.float64)
        sums = self.sums[name]
        sums[layer_number - 1] += value.to(sums.device)
        self.counts[name][layer_number - 1] += 1

    def record_layer(self, layer_number: int, num_layers: int, alignment_loss: Tensor, stats: SSAStats) -> None:
        """Records one training forward of layer ``layer_number``: the alignment loss and its two terms when they
        were computed, and the mean over this rank's heads of each attention statistic when it was collected."""
        if stats.sparsity_loss is not None:
            self.record("alignment_loss", layer_number, num_layers, alignment_loss.detach())
            self.record("sparsity_loss", layer_number, num_layers, stats.sparsity_loss)
            self.record("commitment_loss", layer_number, num_layers, stats.commitment_loss)
        if stats.metrics is not None:
            for name, per_head in stats.metrics.items():
                self.record(f"attn_{name}", layer_number, num_layers, per_head.float().mean())

    def record_mode(self, microbatch: int, mode: str, chunk: int = 0) -> None:
        """Counts the mode of micro-batch ``microbatch`` once per model chunk, however many layers report it."""
        key = (chunk, microbatch)
        if key not in self._mode_keys:
            self._mode_keys.add(key)
            self.modes[mode] += 1

    def take(self, num_layers: int | None = None) -> tuple[Tensor, Counter[str]]:
        """This rank's step so far, and a reset: ``[2, names, layers]`` float64 sums and counts (on the device the
        sums were recorded on, so nothing waits for the GPU) and the mode counts. :func:`tracker_values` turns
        the packed tensor, summed over ranks, into the logged values."""
        if num_layers is not None:
            self._ensure(num_layers)
        L = max(self.num_layers, 1)
        device = next(iter(self.sums.values())).device if self.sums else torch.device("cpu")
        packed = torch.zeros(2, len(TRACKED_NAMES), L, dtype=torch.float64, device=device)
        for i, name in enumerate(TRACKED_NAMES):
            if name in self.sums:
                packed[0, i, : self.num_layers] = self.sums[name]
                packed[1, i, : self.num_layers] = self.counts[name].to(device, non_blocking=True)
        modes = self.modes
        self.reset()
        return packed, modes

    def reduce(self, group: dist.ProcessGroup | None = None, num_layers: int | None = None,
               device: torch.device | str | None = None) -> dict[str, float]:
        """All-reduces and returns ``{name: mean over layers, name/layer_i: value}`` plus mode counts; resets.

        Names: ``alignment_loss``, ``sparsity_loss``, ``commitment_loss`` and, when collected, ``attn_sparsity``,
        ``attn_entropy_bits``, ``attn_kl_full_sparse``, ``attn_sink_mass``; ``microbatches_full``,
        ``microbatches_sparse`` (this rank's model chunks; identical on every rank of a stage).
        The training loop does the same without waiting (``ssa_megatron.training.step.StepReport``).
        """
        packed, modes = self.take(num_layers)
        if dist.is_available() and dist.is_initialized():
            if device is None:
                device = "cuda" if torch.cuda.is_available() and dist.get_backend(group) == "nccl" else "cpu"
            packed = packed.to(device)
            # Gloo lacks AVG: reduce sums and counts and divide afterwards.
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        return tracker_values(packed.cpu(), modes)


def tracker_values(packed: Tensor, modes: Counter[str]) -> dict[str, float]:
    """The logged values of :meth:`SSAMetricsTracker.take`'s packed sums and counts (host tensor, summed over the
    ranks): per name the mean over layers and ``name/layer_i``, plus this rank's mode counts."""
    sums, counts = packed.unbind(0)
    out: dict[str, float] = {}
    for i, name in enumerate(TRACKED_NAMES):
        have = counts[i] > 0
        if not bool(have.any()):
            continue
        per_layer = sums[i][have] / counts[i][have]
        out[name] = float(per_layer.mean())
        for layer in torch.nonzero(have).flatten().tolist():
            out[f"{name}/layer_{layer + 1}"] = float(sums[i, layer] / counts[i, layer])
    out["microbatches_full"] = float(modes.get("full", 0))
    out["microbatches_sparse"] = float(modes.get("sparse", 0))
    return out


_TRACKER = SSAMetricsTracker()


def get_ssa_tracker() -> SSAMetricsTracker:
    """The process-wide tracker the SSA layers record into."""
    return _TRACKER
