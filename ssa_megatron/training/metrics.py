"""Logging of training metrics: console (progress bar + a line every log_interval), TensorBoard, and wandb.

Throughput is reported as tokens/s (whole job), model TFLOP/s per GPU and MFU. Model FLOPs per token follow
docs/benchmarks.md: ``6·N + 6·L·HQ·D·T`` (N = parameters with tied embeddings counted once, T = sequence length),
i.e. a dense causal full-attention model. SSA runs are measured against the same work, so their MFU is directly
comparable with the full-attention baseline (the extra branch and the selection are overhead, not credit).
"""

from __future__ import annotations

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
    """Parameters of the decoder (tied embeddings counted once), from the recipe's shape."""
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
    embeddings = m.vocab_size * m.hidden_size * (1 if m.tie_embeddings else 2)
    return m.num_layers * per_layer + embeddings + m.hidden_size


def model_flops_per_token(recipe: RecipeConfig) -> float:
    m = recipe.model
    return 6.0 * parameter_count(recipe) + 6.0 * m.num_layers * m.num_attention_heads * m.head_dim * m.seq_length


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
    """Tokens/s, TFLOP/s per GPU and MFU over the steps since the last ``read``."""

    def __init__(self, recipe: RecipeConfig, world_size: int, device: torch.device):
        self.flops_per_token = model_flops_per_token(recipe)
        self.world_size = world_size
        self.peak = peak_flops(device)
        self.device = device
        self._t0 = time.perf_counter()
        self._tokens = 0

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    def read(self) -> dict[str, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        dt = max(now - self._t0, 1e-9)
        tps = self._tokens / dt
        out = {"throughput/tokens_per_s": tps,
               "throughput/tflops_per_gpu": tps * self.flops_per_token / self.world_size / 1e12}
        if self.peak:
            out["throughput/mfu"] = tps * self.flops_per_token / self.world_size / self.peak
        self._t0, self._tokens = now, 0
        return out


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
