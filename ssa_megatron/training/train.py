"""The pretraining loop, top to bottom: parallel setup, model, optimizer, data, checkpoint, then the steps.

One optimizer step = Megatron's forward-backward schedule over ``global_batch / (micro_batch · dp)``
micro-batches (no pipelining, 1F1B, or interleaved 1F1B, chosen by Megatron from the parallel layout), the
optimizer step (clipping inside), the LR schedule, the NaN/Inf check, logging, evaluation and checkpointing.
Each micro-batch trains on one SSA mode sampled from (seed, step, micro-batch); the alignment loss rides on the
layers' activations (``ssa_megatron.megatron.loss``), so the loss the schedule returns is the LM loss.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from ssa_megatron.config import RecipeConfig, to_dict
from ssa_megatron.megatron.mode import MODE_SAMPLER, force_mode, last_mode
from ssa_megatron.megatron.tracker import get_ssa_tracker
from ssa_megatron.training import checkpoint as ckpt_lib
from ssa_megatron.training import health
from ssa_megatron.training.data import StepBatches, build_loaders
from ssa_megatron.training.lr_schedule import WarmupDecayLR
from ssa_megatron.training.metrics import MetricsLogger, Throughput, format_line, memory_gib
from ssa_megatron.training.optimizer import (build_optimizer, ensure_optimizer_state, place_fused_adamw_steps,
                                             torch_adam_step_kept_out_of_param_load)
from ssa_megatron.training.parallel import init_parallel
from ssa_megatron.training.wrap import build_model_chunks, wrap_for_training

log = logging.getLogger(__name__)


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
    seconds: float = 0.0


def train(recipe: RecipeConfig, *, step_hook=None, max_steps: int | None = None) -> TrainResult:
    """Runs (or resumes) the recipe's training. ``step_hook(step, model_chunks)`` runs before each step (tests use it
    to inject faults); ``max_steps`` stops this process early (the schedule still spans ``train.steps``)."""
    t_start = time.perf_counter()

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
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))

    # 2. Model (SSA layer spec), precision and data parallelism; optimizer and LR schedule.
    MODE_SAMPLER.configure(tr.seed)
    model = wrap_for_training(build_model_chunks(recipe, dims), recipe, dims)
    config = model[0].config
    optimizer = build_optimizer(recipe, model, dims.device)
    if tr.precision == "fp16":
        config.grad_scale_func = optimizer.scale_loss
    scheduler = WarmupDecayLR(recipe.optim, tr.steps)

    # 3. Data.
    train_loader, eval_loader = build_loaders(recipe, dims)
    feed = StepBatches(train_loader, num_microbatches, dims.device)
    if not tr.eval_interval:
        eval_loader = None
    eval_start = eval_loader.state_dict() if eval_loader is not None else None

    # 4. Checkpoint: resume, or initialise from checkpoint.load.
    ckpt_dir = Path(recipe.checkpoint.dir or run_dir / "checkpoints")
    checkpointer = ckpt_lib.Checkpointer(ckpt_dir, recipe.checkpoint.keep_last, dims.rank)
    step, consumed_tokens = 0, 0

    def state(step_: int, consumed_: int, is_loading: bool = False, **kw) -> dict:
        kw.setdefault("optimizer_format", recipe.checkpoint.optimizer_format)
        return ckpt_lib.training_state(
            model_chunks=model, optimizer=optimizer, scheduler=scheduler, data_state=train_loader.state_dict,
            step=step_, consumed_tokens=consumed_, recipe=to_dict(recipe), dims=dims, is_loading=is_loading, **kw)

    latest = checkpointer.latest() if recipe.checkpoint.resume else None
    if latest is not None:
        step, consumed_tokens = _resume(latest, checkpointer, state, model, optimizer, scheduler, train_loader, dims)
    elif recipe.checkpoint.load:
        _load_weights(Path(recipe.checkpoint.load), state, model, optimizer)
    start_step = step

    # 5. The loop.
    logger = MetricsLogger(recipe, enabled=dims.is_main, run_dir=run_dir, start_step=step)
    logger.write(f"ssa-train: {recipe.name}: steps {step}->{tr.steps}, {num_microbatches} micro-batches of "
                 f"{tr.micro_batch_size}x{recipe.model.seq_length} tokens per rank and step, world {dims.world_size} "
                 f"(tp {dims.tp} pp {dims.pp}{f' vpp {dims.vpp}' if dims.vpp else ''} cp {dims.cp} dp {dims.dp}) "
                 f"on {dims.device.type}")
    if latest is not None:
        logger.write(f"resumed from {latest} (step {step}, {consumed_tokens:,} tokens)")
    forward_backward = get_forward_backward_func()
    step_fn = partial(forward_step, document_mask=recipe.ssa.document_mask)
    tracker = get_ssa_tracker()
    throughput = Throughput(recipe, dims.world_size, dims.device)
    stop = _StopFlag(tr.exit_signal_handler, run_dir / STOP_FILE, dims.is_main)
    result = TrainResult(start_step=step, end_step=step, run_dir=run_dir, tensorboard_dir=logger.tb_dir)
    end_step = tr.steps if max_steps is None else min(tr.steps, step + max_steps)
    window: dict[str, list[float]] = {}
    last_saved = None

    try:
        while step < end_step:
            if step_hook is not None:
                step_hook(step, model)
            lr = scheduler.apply(optimizer)
            MODE_SAMPLER.set_iteration(step)
            tracker.collect_metrics = bool(tr.metrics_interval) and (step + 1) % tr.metrics_interval == 0
            for chunk in model:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()

            reports = forward_backward(
                forward_step_func=step_fn, data_iterator=feed.next_step(len(model)), model=model,
                num_microbatches=num_microbatches, seq_length=recipe.model.seq_length,
                micro_batch_size=tr.micro_batch_size, decoder_seq_length=recipe.model.seq_length,
                forward_only=False,
            )
            ok, grad_norm, _ = optimizer.step()
            scheduler.step()
            step += 1
            tokens = feed.tokens_per_step * dims.dp  # every DP replica consumed the same count
            consumed_tokens += tokens
            throughput.add(tokens)

            lm = _reduce_lm_losses(reports, dims)
            ssa = tracker.reduce(num_layers=recipe.model.num_layers)
            align_layers = _per_layer(ssa, "alignment_loss", recipe.model.num_layers)
            health.check_step(step, lm_loss=lm.get("loss/lm"), align_per_layer=align_layers,
                              grad_norm=grad_norm, model_chunks=model,
                              rerun_forward=partial(_rerun_last_microbatch, model, feed, step - 1))
            result.losses.append(lm["loss/lm"])
            values = {**lm, "optim/lr": lr, "optim/grad_norm": grad_norm,
                      "optim/update_skipped": 0.0 if ok else 1.0}
            values.update(_ssa_values(ssa))
            for key, value in values.items():
                if value is not None:
                    window.setdefault(key, []).append(value)
            logger.advance(step, {"loss": f"{lm['loss/lm']:.3f}"})

            if step % tr.log_interval == 0 or step == end_step:
                averaged = {k: sum(v) / len(v) for k, v in window.items()}
                averaged.update({k: v for k, v in values.items() if k.startswith("attn/") or "/layer_" in k})
                averaged.update(throughput.read())
                averaged["memory/current_gib"], averaged["memory/peak_gib"] = memory_gib(dims.device)
                averaged["progress/consumed_tokens"] = float(consumed_tokens)
                logger.scalars(step, averaged)
                logger.write(format_line(step, tr.steps, averaged))
                window.clear()

            if eval_loader is not None and (step % tr.eval_interval == 0 or step == tr.steps):
                eval_loader.load_state_dict(eval_start)  # the same held-out batches every time
                result.eval = evaluate(model, eval_loader, recipe, dims, forward_backward)
                logger.scalars(step, result.eval)
                logger.write(f"eval @ step {step}: " + ", ".join(
                    f"{k.split('/')[-1]} {v:.3f}" for k, v in result.eval.items() if "ppl" in k))

            stopping = stop.agreed(dims.device)
            interval = recipe.checkpoint.interval
            if (interval and step % interval == 0) or stopping or (
                    step == tr.steps and recipe.checkpoint.save_at_end):
                result.checkpoint = checkpointer.save(step, state(step, consumed_tokens),
                                                      {"consumed_tokens": consumed_tokens,
                                                       "layout": ckpt_lib.layout_of(dims), "recipe": recipe.name})
                last_saved = step
                logger.write(f"checkpoint: {result.checkpoint}")
            if stopping:
                result.stopped_by_signal = True
                logger.write(f"stopping at step {step} on {stop.name}; resume by launching the same command")
                break
    finally:
        logger.close()
        stop.restore()
    if last_saved is None and latest is not None:
        result.checkpoint = latest
    result.end_step = step
    result.seconds = time.perf_counter() - t_start
    return result


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
    """Document boundaries for ``ssa.document_mask`` (None otherwise, as in ordinary pretraining)."""
    if batch.get("cu_seqlens") is None:
        raise ValueError("ssa.document_mask=true needs batches with cu_seqlens (the token-shard loader gives them)")
    from ssa_megatron.training.data_adapter import packed_seq_params

    return packed_seq_params(batch)


def _rerun_last_microbatch(model, feed: StepBatches, iteration: int) -> None:
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
# Reductions for logging (every rank calls these).

def _reduce_lm_losses(reports: list[dict], dims) -> dict[str, float]:
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


def _per_layer(ssa: dict[str, float], name: str, num_layers: int) -> list[float] | None:
    values = [ssa.get(f"{name}/layer_{i + 1}") for i in range(num_layers)]
    return [v for v in values if v is not None] or None


def _ssa_values(ssa: dict[str, float]) -> dict[str, float]:
    """Tracker output → logged names: losses under loss/, attention statistics under attn/, per layer too."""
    out = {}
    for key, value in ssa.items():
        base, _, layer = key.partition("/layer_")
        if base in ("alignment_loss", "sparsity_loss", "commitment_loss"):
            name = {"alignment_loss": "loss/align", "sparsity_loss": "loss/align_sparsity",
                    "commitment_loss": "loss/align_commitment"}[base]
        elif base.startswith("attn_"):
            name = "attn/" + base[len("attn_"):]
        elif base.startswith("microbatches_"):
            name = "mode/" + base
        else:
            continue
        out[f"{name}/layer_{int(layer) - 1:02d}" if layer else name] = value
    return out


# --------------------------------------------------------------------------------------------------------------
# Evaluation: held-out perplexity under full and under sparse inference.

def evaluate(model, loader, recipe: RecipeConfig, dims, forward_backward) -> dict[str, float]:
    num_microbatches = recipe.train.eval_batches
    feed = StepBatches(loader, num_microbatches, dims.device)
    batches = [feed._to_device(next(loader)) for _ in range(num_microbatches)]
    out = {}
    for chunk in model:
        chunk.eval()
    try:
        for mode in ("full", "sparse"):
            with force_mode(mode), torch.no_grad():
                reports = forward_backward(
                    forward_step_func=partial(forward_step, document_mask=recipe.ssa.document_mask),
                    data_iterator=[iter(batches) for _ in model], model=model,
                    num_microbatches=num_microbatches, seq_length=recipe.model.seq_length,
                    micro_batch_size=recipe.train.micro_batch_size,
                    decoder_seq_length=recipe.model.seq_length, forward_only=True)
            lm = _reduce_lm_losses(reports, dims)
            out[f"eval/loss_{mode}"] = lm["loss/lm"]
            out[f"eval/ppl_{mode}"] = lm["loss/ppl"]
    finally:
        for chunk in model:
            chunk.train()
    return out


# --------------------------------------------------------------------------------------------------------------
# Resume.

def _resume(path: Path, checkpointer, state, model, optimizer, scheduler, train_loader, dims) -> tuple[int, int]:
    common = dist_checkpointing.load_common_state_dict(str(path))
    layout, saved = ckpt_lib.layout_of(dims), common.get("layout", {})
    same_layout = saved == layout
    optimizer_format = common.get("optimizer_format", "fully_reshardable")
    if optimizer_format == "dp_reshardable" and (saved.get("tp"), saved.get("pp")) != (layout["tp"], layout["pp"]):
        raise ValueError(f"{path} was written with checkpoint.optimizer_format=dp_reshardable under tp "
                         f"{saved.get('tp')} pp {saved.get('pp')}; it resumes only with the same TP and PP "
                         f"(now tp {layout['tp']} pp {layout['pp']})")
    same_dp = saved.get("dp") == layout["dp"]
    ensure_optimizer_state(optimizer)
    template = state(0, 0, is_loading=True, with_rank_objects=same_layout, with_data_state=same_dp,
                     optimizer_format=optimizer_format)
    loaded = checkpointer.load(path, template)
    ckpt_lib.load_model_chunks(model, loaded)
    with torch_adam_step_kept_out_of_param_load(optimizer):
        optimizer.load_state_dict(loaded["optimizer"])
    place_fused_adamw_steps(optimizer)  # a loaded Adam step is a CPU scalar; fused AdamW wants it on the GPU
    scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        ckpt_lib.set_rng_state(loaded["rng_state"])
    if same_dp and "data_state" in loaded:
        train_loader.load_state_dict(loaded["data_state"])
    if not same_layout and dims.is_main:
        log.warning("resuming %s under another parallel layout (%s -> %s): model and optimizer resharded; RNG "
                    "streams restart%s", path, saved, layout,
                    "" if same_dp else "; the data-parallel size changed, so data positions restart too")
    return int(loaded["step"]), int(loaded["consumed_tokens"])


def _load_weights(path: Path, state, model, optimizer) -> None:
    """checkpoint.load: model weights only (a fresh optimizer, schedule and data position)."""
    if (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    loaded = ckpt_lib.Checkpointer.load(path, state(0, 0, is_loading=True, with_optimizer=False,
                                                    with_rank_objects=False))
    ckpt_lib.load_model_chunks(model, loaded)
    if hasattr(optimizer, "reload_model_params"):
        optimizer.reload_model_params()


# --------------------------------------------------------------------------------------------------------------
# Clean stop on SIGTERM / SIGUSR1 (SLURM sends one before the time limit; the job requeues and resumes).

STOP_FILE = "STOP"
"""Touching ``<run_dir>/STOP`` asks a running job to checkpoint and exit (the SLURM scripts do this shortly before
the time limit, then requeue); a stale one is removed when a run starts."""


class _StopFlag:
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
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
