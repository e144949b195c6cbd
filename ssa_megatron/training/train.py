"""The pretraining loop, top to bottom: parallel setup, model, optimizer, data, checkpoint, then the steps.

One optimizer step = Megatron's forward-backward schedule over ``global_batch / (micro_batch · dp)``
micro-batches (no pipelining, 1F1B, or interleaved 1F1B, chosen by Megatron from the parallel layout), the
optimizer step (clipping inside), the LR schedule, the NaN/Inf check, logging, evaluation and checkpointing.
Each micro-batch trains on one SSA mode sampled from (seed, step, micro-batch); the alignment loss rides on the
layers' activations (``ssa_megatron.megatron.loss``), so the loss the schedule returns is the LM loss.

The pieces, each built once here: ``step.py`` (a step's micro-batches, ``forward_step``, the loss reduction),
``ssa_megatron.data.build_loaders`` (the streams), ``evaluate.py`` (held-out perplexity), ``checkpoint.py`` (save,
resume, weights), ``stop.py`` (signals and the stop file), ``health.py`` (NaN/Inf) and ``metrics.py`` (logging).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from megatron.core.pipeline_parallel import get_forward_backward_func
from torch.profiler import record_function

from ssa_megatron.config import RecipeConfig
from ssa_megatron.data.from_config import build_loaders
from ssa_megatron.megatron.mode import MODE_SAMPLER
from ssa_megatron.megatron.tracker import get_ssa_tracker
from ssa_megatron.training import health
from ssa_megatron.training.checkpoint import RunCheckpoints
from ssa_megatron.training.evaluate import HeldOutEval
from ssa_megatron.training.lr_schedule import WarmupDecayLR
from ssa_megatron.training import compile_caches
from ssa_megatron.training.metrics import (MetricsLogger, Throughput, format_layers, format_line, format_steady,
                                           memory_gib, per_layer, ssa_values)
from ssa_megatron.training.optimizer import build_optimizer
from ssa_megatron.training.parallel import init_parallel
from ssa_megatron.training.run_dir import check_resume, record_recipe
from ssa_megatron.training.step import StepBatches, StepReport, forward_step, rerun_last_microbatch
from ssa_megatron.training.stop import STOP_FILE, StopFlag
from ssa_megatron.training.wrap import build_model_chunks, wrap_for_training


@dataclass
class TrainResult:
    """What a run did (rank-local view; losses are the global token means)."""

    start_step: int
    end_step: int
    losses: list[float] = field(default_factory=list)
    """LM loss of every step this process ran, in order."""
    eval: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    run_dir: Path | None = None
    tensorboard_dir: Path | None = None
    stopped_by_signal: bool = False
    already_finished: bool = False
    """The checkpoint resumed from was already at or past ``train.steps``: no step ran."""
    seconds: float = 0.0
    steady: dict[str, float] | None = None
    """Steady-state rates (``Throughput.steady``): step seconds, tokens/s, TFLOP/s per GPU, MFU."""
    step_seconds: list[float] = field(default_factory=list)
    """Seconds of every step this process ran (evaluation and checkpointing left out)."""
    peak_memory_gib: float = 0.0


def train(recipe: RecipeConfig, *, step_hook=None, max_steps: int | None = None) -> TrainResult:
    """Runs (or resumes) the recipe's training. ``step_hook(step, model_chunks)`` runs before each step (tests use it
    to inject faults); ``max_steps`` stops this process early (the schedule still spans ``train.steps``)."""
    t_start = time.perf_counter()
    compile_caches.configure()

    # 1. Parallel layout and batch geometry.
    dims = init_parallel(recipe)
    tr = recipe.train
    per_step = tr.micro_batch_size * dims.dp
    if tr.global_batch_size % per_step:
        raise ValueError(
            f"train.global_batch_size={tr.global_batch_size} must be a multiple of train.micro_batch_size x "
            f"data-parallel size = {tr.micro_batch_size} x {dims.dp}"
        )
    num_microbatches = tr.global_batch_size // per_step
    if dims.pp > 1 and dims.vpp and num_microbatches % dims.pp:
        raise ValueError(f"interleaved pipeline: micro-batches per step ({num_microbatches}) must be a multiple "
                         f"of parallel.pipeline_parallel={dims.pp}")
    run_dir = Path(tr.run_dir).expanduser()
    if dims.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)  # recipe.yaml is written once the run starts (run_dir.py)

    # 2. Model (SSA layer spec), precision and data parallelism; optimizer and LR schedule.
    MODE_SAMPLER.configure(tr.seed)
    model = wrap_for_training(build_model_chunks(recipe, dims), recipe, dims)
    config = model[0].config
    optimizer = build_optimizer(recipe, model, dims.device)
    if tr.precision == "fp16":
        config.grad_scale_func = optimizer.scale_loss
    scheduler = WarmupDecayLR(recipe.optim, tr.steps)

    # 3. Data: this data-parallel rank's train stream, and held-out batches for evaluation.
    data = build_loaders(recipe, dims.dp_rank, dims.dp, log=print if dims.is_main else _quiet)
    feed = StepBatches(data.train, num_microbatches, dims.device)
    evaluator = HeldOutEval(data.valid, recipe, dims) if data.valid is not None and tr.eval_interval else None

    # 4. Checkpoints: resume, or initialise from checkpoint.load.
    checkpoints = RunCheckpoints(recipe, dims, run_dir, model_chunks=model, optimizer=optimizer,
                                 scheduler=scheduler, train_loader=feed)
    check_resume(recipe, run_dir, checkpoints.store)  # a changed model or SSA setting: one line, nothing loaded
    step, consumed_tokens = checkpoints.restore()
    if step >= tr.steps:
        if dims.is_main:
            print(f"ssa-train: {recipe.name}: {checkpoints.resumed_from} is at step {step} and train.steps is "
                  f"{tr.steps}: nothing to train (raise train.steps to continue)", flush=True)
        return TrainResult(start_step=step, end_step=step, checkpoint=checkpoints.resumed_from, run_dir=run_dir,
                           already_finished=True, seconds=time.perf_counter() - t_start)

    # 5. The loop.
    logger = MetricsLogger(recipe, enabled=dims.is_main, run_dir=run_dir, start_step=step)
    logger.write(f"ssa-train: {recipe.name}: steps {step}->{tr.steps}, {num_microbatches} micro-batches of "
                 f"{tr.micro_batch_size}x{recipe.model.seq_length} tokens per rank and step, world {dims.world_size} "
                 f"(tp {dims.tp} pp {dims.pp}{f' vpp {dims.vpp}' if dims.vpp else ''} cp {dims.cp} dp {dims.dp}) "
                 f"on {dims.device.type}")
    if checkpoints.resumed_from is not None:
        logger.write(f"resumed from {checkpoints.resumed_from} (step {step}, {consumed_tokens:,} tokens)")
        if scheduler.note:
            logger.write(scheduler.note)
    if dims.is_main:
        record_recipe(run_dir, recipe, log=logger.write)  # the run has started: keep its recipe
    forward_backward = get_forward_backward_func()
    step_fn = partial(forward_step, document_mask=recipe.ssa.document_mask)
    tracker = get_ssa_tracker()
    throughput = Throughput(recipe, dims.world_size, dims.device)
    stop = StopFlag(tr.exit_signal_handler, run_dir / STOP_FILE, dims.is_main)
    result = TrainResult(start_step=step, end_step=step, run_dir=run_dir, tensorboard_dir=logger.tb_dir)
    end_step = tr.steps if max_steps is None else min(tr.steps, step + max_steps)
    window: dict[str, list[float]] = {}
    last_saved = None

    def finish(done: _FinishedStep) -> bool:
        """Reads a step's report: the NaN/Inf check, the losses, logging. Returns whether every rank stops."""
        lm, any_rank_stops, ssa = done.report.read()
        seconds = throughput.step_done(done.tokens, done.report.end)
        if len(throughput.step_seconds) == 1 and dims.device.type == "cuda":
            logger.write(f"first step: {seconds:.1f} s")
        n = done.report.step
        health.check_step(n, lm_loss=lm.get("loss/lm"),
                          align_per_layer=per_layer(ssa, "alignment_loss", recipe.model.num_layers),
                          grad_norm=done.grad_norm, model_chunks=model,
                          rerun_forward=partial(rerun_last_microbatch, model, done.batches, n - 1))
        result.losses.append(lm["loss/lm"])
        values = {**lm, "optim/lr": done.lr, "optim/grad_norm": done.grad_norm,
                  "optim/update_skipped": 0.0 if done.ok else 1.0}
        values.update(ssa_values(ssa))
        for key, value in values.items():
            if value is not None:
                window.setdefault(key, []).append(value)
        logger.advance(n, {"loss": f"{lm['loss/lm']:.3f}"})
        if n % tr.log_interval == 0 or n == end_step:
            averaged = {k: sum(v) / len(v) for k, v in window.items()}
            averaged.update({k: v for k, v in values.items() if k.startswith("attn/") or "/layer_" in k})
            averaged.update(throughput.read())
            averaged["memory/current_gib"], averaged["memory/peak_gib"] = memory_gib(dims.device)
            averaged["progress/consumed_tokens"] = float(done.consumed_tokens)
            logger.scalars(n, averaged)
            logger.write(format_line(n, tr.steps, averaged))
            if done.collected_metrics and (layers := format_layers(averaged)):
                logger.write(layers)
            window.clear()
        return stop.agree(any_rank_stops)

    try:
        if dims.device.type == "cuda":
            logger.write("first step: compiling the Triton kernels and torch.compile fusions for this shape "
                         f"(Triton kernels reused from {compile_caches.describe()} when an earlier launch compiled "
                         "them)")
        # Each step's report is read while the next step runs (StepReport), so the GPU never waits for the host's
        # per-step work. A step is read at once when something must follow it: the end, evaluation, a checkpoint,
        # a stop, or a non-finite gradient norm (the NaN check then names the step, as it would have at once).
        pending: _FinishedStep | None = None
        stopping = False
        while step < end_step and not stopping:
            if step_hook is not None:
                step_hook(step, model)
            lr = scheduler.apply(optimizer)
            MODE_SAMPLER.set_iteration(step)
            tracker.collect_metrics = bool(tr.metrics_interval) and (step + 1) % tr.metrics_interval == 0
            for chunk in model:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()

            # The named ranges show in profiles (bench_training --profile, tools/profile_gaps.py).
            with record_function("ssa_train/batches"):
                batches = feed.next_step(len(model))
            with record_function("ssa_train/forward_backward"):
                reports = forward_backward(
                    forward_step_func=step_fn, data_iterator=batches, model=model,
                    num_microbatches=num_microbatches, seq_length=recipe.model.seq_length,
                    micro_batch_size=tr.micro_batch_size, decoder_seq_length=recipe.model.seq_length,
                    forward_only=False,
                )
            if step + 1 < end_step:  # the host is ahead of the GPU here: fetch the next step's batches now
                with record_function("ssa_train/next_batches"):
                    feed.prefetch()
            if pending is not None:  # this step is queued on the GPU: read the previous one meanwhile
                with record_function("ssa_train/previous_step_report"):
                    stopping = finish(pending)
            with record_function("ssa_train/optimizer"):
                ok, grad_norm, _ = optimizer.step()  # waits for the gradient norm (Megatron's clipping)
            scheduler.step()
            step += 1
            tokens = feed.tokens_per_step * dims.dp  # every DP replica consumed the same count
            consumed_tokens += tokens
            pending = _FinishedStep(
                StepReport(step, reports, dims, tracker, stop.requested(), recipe.model.num_layers,
                           throughput.mark),
                lr=lr, grad_norm=grad_norm, ok=ok, tokens=tokens, consumed_tokens=consumed_tokens,
                batches=feed.batches, collected_metrics=tracker.collect_metrics)

            evaluating = evaluator is not None and (step % tr.eval_interval == 0 or step == tr.steps)
            if not (stopping or step == end_step or evaluating or checkpoints.due(step, False)
                    or (grad_norm is not None and not math.isfinite(grad_norm))):
                continue
            stopping = finish(pending) or stopping
            pending = None
            if evaluating:
                with throughput.excluded():
                    result.eval = evaluator.run(model)
                logger.scalars(step, result.eval)
                logger.write(f"eval @ step {step}: " + ", ".join(
                    f"{k.split('/')[-1]} {v:.3f}" for k, v in result.eval.items() if "ppl" in k))
            if checkpoints.due(step, stopping):
                with throughput.excluded():
                    result.checkpoint = checkpoints.save(step, consumed_tokens)
                last_saved = step
                logger.write(f"checkpoint: {result.checkpoint}")
            if stopping:
                result.stopped_by_signal = True
                logger.write(f"stopping at step {step} on {stop.name}; resume by launching the same command")
        result.steady = throughput.steady()
        result.step_seconds = throughput.step_seconds
        result.peak_memory_gib = memory_gib(dims.device)[1]
        if result.steady is not None:
            logger.write(format_steady(result.steady, result.peak_memory_gib))
    finally:
        logger.close()
        stop.restore()
    if last_saved is None and checkpoints.resumed_from is not None:
        result.checkpoint = checkpoints.resumed_from
    result.end_step = step
    result.seconds = time.perf_counter() - t_start
    return result


@dataclass
class _FinishedStep:
    """A step the GPU may still be finishing: its report and what the host already knows of it."""

    report: StepReport
    lr: float
    grad_norm: float
    ok: bool
    tokens: int
    consumed_tokens: int
    batches: list
    """The step's micro-batches (the NaN check re-runs the last one)."""
    collected_metrics: bool


def _quiet(_line: str) -> None:
    pass
