"""Clean stop on request: SIGTERM / SIGUSR1, or a stop file in the run directory.

SLURM sends a signal before the time limit, and the SLURM scripts touch ``<run_dir>/STOP`` shortly before it, then
requeue the job. The loop checks the flag after every step; when any rank saw a request, every rank checkpoints and
exits, and the next launch of the same command resumes.
"""

from __future__ import annotations

import signal
from pathlib import Path

import torch
import torch.distributed as dist

STOP_FILE = "STOP"
"""Touching ``<run_dir>/STOP`` asks a running job to checkpoint and exit; a stale one is removed when a run
starts."""


class StopFlag:
    """Installs the signal handlers (``train.exit_signal_handler``) and answers, once per step, whether to stop."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, enabled: bool, stop_file: Path, is_main: bool):
        self.received: int | str | None = None
        self.stop_file = stop_file
        self._previous = {}
        if is_main:
            stop_file.unlink(missing_ok=True)
        if dist.is_initialized():
            dist.barrier()
        if enabled:
            for sig in self.SIGNALS:
                try:
                    self._previous[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread
                    pass

    def _handle(self, signum, _frame) -> None:
        self.received = signum

    @property
    def name(self) -> str:
        if isinstance(self.received, int):
            return signal.Signals(self.received).name
        return str(self.received or "signal")

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank received a stop signal or sees the stop file (checked every step)."""
        if self.received is None and self.stop_file.exists():
            self.received = f"{self.stop_file} (stop file)"
        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.received is None:
            self.received = signal.SIGTERM
        return bool(flag.item())

    def restore(self) -> None:
        """Puts back the signal handlers that were installed before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
