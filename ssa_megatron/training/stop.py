"""Clean stop on request: SIGTERM, SIGINT or SIGUSR1, or a stop file in the run directory.

SLURM sends a signal before the time limit, and the SLURM scripts touch ``<run_dir>/STOP`` shortly before it, then
requeue the job. ``timeout``, ``scancel``, preemption and Ctrl-C signal the whole process group: the data-loader
workers ignore these signals (``ssa_megatron.data.loader.WORKER_IGNORED_SIGNALS``) and leave the shutdown to the
training process. Every step carries each rank's vote; the loop reads it one step later (with the step's losses,
``ssa_megatron.training.step.StepReport``), so when any rank saw a request, every rank finishes the step under way
and the next one, checkpoints and exits 0, and the next launch of the same command resumes.

SIGINT (Ctrl-C) is a stop request like SIGTERM, and so is a repeated one: torchrun forwards the group's signal
to its workers, so each rank may receive it twice, and a second Ctrl-C that killed the run would lose the
checkpoint the first one asked for. To quit at once without a checkpoint, send SIGQUIT (Ctrl-\\) or SIGKILL.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch.distributed as dist

STOP_FILE = "STOP"
"""Touching ``<run_dir>/STOP`` asks a running job to checkpoint and exit; a stale one is removed when a run
starts."""


class StopFlag:
    """Installs the signal handlers (``train.exit_signal_handler``) and answers, once per step, whether to stop."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self, enabled: bool, stop_file: Path, is_main: bool):
        self.received: int | str | None = None
        self.stop_file = stop_file
        self.is_main = is_main
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
        if self.received is None and self.is_main:
            # os.write, not print: the handler may interrupt a print of the main thread.
            name = signal.Signals(signum).name
            try:
                os.write(sys.stderr.fileno(), f"ssa-train: {name}: finishing the steps under way, then checkpointing "
                                              "and exiting (SIGQUIT, Ctrl-\\, quits at once without a checkpoint)\n"
                         .encode())
            except (OSError, ValueError):
                pass
        if self.received is None:
            self.received = signum

    @property
    def name(self) -> str:
        if isinstance(self.received, int):
            return signal.Signals(self.received).name
        return str(self.received or "signal")

    def requested(self) -> bool:
        """This rank's vote: a signal arrived, or the stop file exists (looked for at every step)."""
        if self.received is None and self.stop_file.exists():
            self.received = f"{self.stop_file} (stop file)"
        return self.received is not None

    def agree(self, any_rank: bool) -> bool:
        """The outcome of the vote (``any_rank``: some rank voted to stop), the same on every rank."""
        if any_rank and self.received is None:
            self.received = signal.SIGTERM
        return any_rank

    def restore(self) -> None:
        """Puts back the signal handlers that were installed before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
