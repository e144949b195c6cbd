"""Logging of training metrics: console (progress bar + a line every log_interval), TensorBoard, and wandb.

Throughput is reported as tokens/s (whole job), model TFLOP/s per GPU and MFU, over the window since the last
log line with evaluation and checkpoint time left out, and as a steady-state summary at the end of a run.

Model FLOPs per token, as Megatron-LM and PaLM count them: ``6·N + 6·L·HQ·D·T``, where N is the parameters that
do matrix work for each token (every decoder layer, and the output layer ``V·h``; the input-embedding lookup is
left out, tied or not) and the attention term is causal full attention over a context of T tokens (half of
PaLM's ``12·L·H·Q·T``, which counts the masked half). SSA runs are measured against the same work, so their MFU
is directly comparable with the full-attention baseline (the extra branch and the selection are overhead, not
credit). docs/benchmarks.md ("MFU") gives the formula with worked numbers.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path

import torch

from ssa_megatron.config import RecipeConfig

# Dense bf16 peak per GPU (no sparsity), FLOP/s.
_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12, "B200": 2250e12,
              "A100": 312e12, "A800": 312e12, "L40S": 362e12}


def parameter_count(recipe: RecipeConfig) -> int:
    """Parameters of the model (tied embeddings counted once), from the recipe's shape."""
    m = recipe.model
    embeddings = m.vocab_size * m.hidden_size * (1 if m.tie_embeddings else 2)
    return _decoder_parameters(recipe) + embeddings


def matmul_parameters(recipe: RecipeConfig) -> int:
    """Parameters that multiply every token: the decoder layers and the output layer, not the input embedding
    (a lookup, no matmul). The N of the MFU formula."""
    m = recipe.model
    return _decoder_parameters(recipe) + m.vocab_size * m.hidden_size


def _decoder_parameters(recipe: RecipeConfig) -> int:
    m = recipe.model
    d = m.head_dim
    hq, hkv = m.num_attention_heads, m.num_query_groups
    per_layer = (
        m.hidden_size * (hq + 2 * hkv) * d  # QKV
        + hq * d * m.hidden_size  # output projection
        + 3 * m.hidden_size * m.ffn_hidden_size  # SwiGLU
        + 2 * m.hidden_size  # two RMSNorm weights
        + (m.hidden_size * hq if recipe.ssa.gate == "per_head" else 0)  # SSA gate
    )
    return m.num_layers * per_layer + m.hidden_size  # + the final norm


def model_flops_per_token(recipe: RecipeConfig) -> float:
    """Training FLOPs per token (forward + backward): ``6·N + 6·L·HQ·D·T`` with N = ``matmul_parameters``."""
    m = recipe.model
    return 6.0 * matmul_parameters(recipe) + 6.0 * m.num_layers * m.num_attention_heads * m.head_dim * m.seq_length


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in _PEAK_BF16.items():
        if key in name:
            return value
    return None


def memory_gib(device: torch.device) -> tuple[float, float]:
    """(current, peak) GiB: CUDA allocator on GPU, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**30, torch.cuda.max_memory_allocated(device) / 2**30
    import psutil

    rss = psutil.Process().memory_info().rss / 2**30
    return rss, rss


class Throughput:
    """Tokens/s, TFLOP/s per GPU and MFU: over the window since the last ``read``, and in steady state.

    A step's time runs from the end of the previous step to the end of this one, as the GPU's stream sees them
    (CUDA events recorded after each optimizer step; the host clock on CPU), so every gap in which the GPU waited
    for the host counts. Evaluation and checkpoint time is left out (``excluded``). The steady state is the median
    step after the first ``warmup_steps`` of this process, which pay for kernel compilation, autotuning and the
    allocator's growth.
    """

    warmup_steps = 3

    def __init__(self, recipe: RecipeConfig, world_size: int, device: torch.device):
        self.flops_per_token = model_flops_per_token(recipe)
        self.world_size = world_size
        self.peak = peak_flops(device)
        self.device = device
        self.step_seconds: list[float] = []
        self.tokens_per_step = 0
        self._window_seconds = 0.0
        self._window_tokens = 0
        self._step_excluded = 0.0
        self._last_end = self.mark()

    def mark(self):
        """The current point of the GPU's stream (a recorded CUDA event), or the host clock on CPU."""
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def step_done(self, tokens: int, end=None) -> float:
        """Records a finished step of ``tokens`` tokens (all ranks) that ended at ``end`` (a :meth:`mark`, or a
        recorded CUDA event that has completed; default: now); returns its seconds."""
        end = self.mark() if end is None else end
        if isinstance(end, float):
            elapsed = end - self._last_end
        else:
            end.synchronize()
            elapsed = self._last_end.elapsed_time(end) / 1e3
        seconds = max(elapsed - self._step_excluded, 0.0)
        self.step_seconds.append(seconds)
        self._last_end, self._step_excluded = end, 0.0
        self._window_seconds += seconds
        self._window_tokens += tokens
        self.tokens_per_step = tokens
        return seconds

    @contextlib.contextmanager
    def excluded(self):
        """Time inside this block (evaluation, checkpointing, between two steps) counts toward no step."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._step_excluded += time.perf_counter() - t0

    def _rates(self, tokens_per_s: float) -> dict[str, float]:
        flops = tokens_per_s * self.flops_per_token / self.world_size
        out = {"throughput/tokens_per_s": tokens_per_s, "throughput/tflops_per_gpu": flops / 1e12}
        if self.peak:
            out["throughput/mfu"] = flops / self.peak
        return out

    def read(self) -> dict[str, float]:
        """The window since the last read (ends at the last finished step)."""
        out = self._rates(self._window_tokens / max(self._window_seconds, 1e-9))
        self._window_seconds, self._window_tokens = 0.0, 0
        return out

    def steady(self) -> dict[str, float] | None:
        """Median step after the warm-up steps; None when the run had no step beyond them."""
        steps = sorted(self.step_seconds[self.warmup_steps:])
        if not steps:
            return None
        median = steps[len(steps) // 2]
        out = {"steps": float(len(steps)), "step_seconds": median,
               "first_step_seconds": self.step_seconds[0], **self._rates(self.tokens_per_step / median)}
        return out


def format_steady(steady: dict[str, float], peak_gib: float) -> str:
    """The end-of-run line: steady-state rates over the steps after the warm-up."""
    parts = [f"steady state over {int(steady['steps'])} steps: {1e3 * steady['step_seconds']:,.0f} ms/step",
             f"{steady['throughput/tokens_per_s']:,.0f} tok/s",
             f"{steady['throughput/tflops_per_gpu']:.3g} TFLOP/s/GPU"]
    if steady.get("throughput/mfu") is not None:
        parts.append(f"MFU {100 * steady['throughput/mfu']:.1f}%")
    parts.append(f"first step {steady['first_step_seconds']:.1f} s")
    parts.append(f"peak mem {peak_gib:.2f} GiB")
    return " | ".join(parts)


class MetricsLogger:
    """Rank 0 writes; other ranks hold a no-op logger."""

    def __init__(self, recipe: RecipeConfig, *, enabled: bool, run_dir: Path, start_step: int):
        self.enabled = enabled
        self.total = recipe.train.steps
        self.bar = None
        self.tb = None
        self.wandb = None
        self.tb_dir = run_dir / "tensorboard"
        if not enabled:
            return
        if recipe.train.progress_bar and sys.stderr.isatty():  # piped output gets the periodic lines only
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(self.tb_dir), purge_step=start_step + 1 if start_step else None)
        except ImportError:  # tensorboard is a declared dependency; keep training if it is missing
            self.tb = None
        if _want_wandb(recipe.train.wandb):
            import wandb

            from ssa_megatron.config import to_dict

            self.wandb = wandb.init(project=recipe.train.wandb_project, name=recipe.name, dir=str(run_dir),
                                    config=to_dict(recipe), resume="allow", id=_wandb_id(run_dir))

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def advance(self, step: int, postfix: dict[str, str] | None = None) -> None:
        if self.bar is not None:
            self.bar.n = step
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.refresh()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.tb is not None:
            for key, value in values.items():
                if value is not None and math.isfinite(value):
                    self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in values.items() if v is not None}, step=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _want_wandb(setting: bool | None) -> bool:
    if setting is False:
        return False
    try:
        import wandb  # noqa: F401
    except ImportError:
        if setting:
            raise ValueError("train.wandb=true but wandb is not installed") from None
        return False
    return bool(setting) or bool(os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"))


def _wandb_id(run_dir: Path) -> str:
    """A stable run id per run directory, so a requeued job continues the same wandb run."""
    path = run_dir / "wandb_id"
    if not path.exists():
        import uuid

        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()


def format_line(step: int, total: int, v: dict[str, float]) -> str:
    """One console line: the values a person watches."""
    parts = [f"step {step:>{len(str(total))}}/{total}"]

    def add(key: str, fmt: str, label: str) -> None:
        if v.get(key) is not None:
            parts.append(f"{label} {format(v[key], fmt)}")

    add("loss/lm", ".4f", "loss")
    modes = [f"{m} {v[f'loss/lm_{m}']:.4f}" for m in ("full", "sparse") if v.get(f"loss/lm_{m}") is not None]
    if modes:
        parts[-1] += f" ({', '.join(modes)})"
    add("loss/align", ".4g", "align")
    add("attn/sparsity", ".3f", "sparsity")
    add("optim/lr", ".2e", "lr")
    add("optim/grad_norm", ".3f", "gnorm")
    if v.get("throughput/tokens_per_s") is not None:
        parts.append(f"{v['throughput/tokens_per_s']:,.0f} tok/s")
    add("throughput/tflops_per_gpu", ".3g", "TFLOP/s/GPU")
    if v.get("throughput/mfu") is not None:
        parts.append(f"MFU {100 * v['throughput/mfu']:.1f}%")
    add("memory/peak_gib", ".2f", "mem GiB")
    return " | ".join(parts)


def format_layers(v: dict[str, float]) -> str | None:
    """A second console line, per layer in layer order: the alignment loss and the attention sparsity (their
    per-layer values are in ``v`` on the steps the tracker collected metrics); None when ``v`` holds neither."""
    parts = []
    for key, label, fmt in (("loss/align", "align", ".3g"), ("attn/sparsity", "sparsity", ".2f")):
        layers = sorted(k for k in v if k.startswith(f"{key}/layer_"))
        if layers:
            parts.append(f"{label} " + " ".join(format(v[k], fmt) for k in layers))
    return "  per layer: " + " | ".join(parts) if parts else None


def ssa_values(ssa: dict[str, float]) -> dict[str, float]:
    """SSA tracker output → logged names: losses under loss/, attention statistics under attn/, per layer too."""
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


def per_layer(ssa: dict[str, float], name: str, num_layers: int) -> list[float] | None:
    """The tracker's per-layer values of ``name`` in layer order (None when it has none)."""
    values = [ssa.get(f"{name}/layer_{i + 1}") for i in range(num_layers)]
    return [v for v in values if v is not None] or None
