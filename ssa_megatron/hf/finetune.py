"""Continued SSA training of a Hugging Face model, without Megatron (``tools/finetune_hf.py``).

The input is an export of this project (``ssa_llama``, its recipe stored in ``config.json``) or any Llama folder
(``model_type: llama``, e.g. a stock Llama checkpoint, read as ``ssa_llama`` with ``ssa.gate: none``: its weights
are unchanged and its attention is SSA's full mode). Fine-tuning it with the alignment loss teaches it sparse
mode: that is how an existing Llama becomes an SSA model.

What it shares with the Megatron path, rather than re-implementing:

- the recipe schema (``ssa_megatron.config``): the input's stored recipe (or one derived from its config) plus
  ``a.b=c`` overrides; ``ssa.*`` is the training semantics (p_full, alpha, alignment, mode_sampling, budget);
- the SSA math: each layer calls ``ssa_attention(..., training=True)`` (``SSALlamaAttention.ssa_training``), which
  runs both branches and returns the layer's alignment loss when ``alpha > 0``;
- the mode of each micro-batch: ``sample_mode(train.seed, step, micro-batch, p_full[, layer])``, the function the
  Megatron layers use, so a step's modes are the same on every rank;
- the data (``build_loaders``: shards, ``builtin:stdlib``, Megatron .bin/.idx, ``synthetic``) and the LR schedule
  (``WarmupDecayLR``).

The loss of one micro-batch is ``lm + alpha * mean over layers(alignment)``, the gradient Megatron's
``AlignmentLossScaler`` injects (docs/ssa.md). Engines: DeepSpeed (ZeRO-2 from a JSON config; the batch keys are
filled from the recipe) when a config is given, else a plain single-process torch loop. Each save is an export
folder (``write_export``, always ``ssa_llama`` so sparse mode stays usable) written to a temporary name and renamed
into ``step_XXXXXXXX``; then the ``latest`` marker is replaced.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ssa_megatron.config import RecipeConfig, SSAConfig, apply_overrides, from_dict, to_dict
from ssa_megatron.hf.configuration import SSALlamaConfig, hf_config_from_recipe
from ssa_megatron.hf.convert import hf_model_from_state_dict, load_hf_folder, recipe_for_hf_config
from ssa_megatron.hf.export import write_export
from ssa_megatron.megatron.mode import sample_mode

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json")
"""Files of the input folder copied into every save, so that the save loads with its tokenizer."""
BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
              "gradient_clipping")
"""DeepSpeed config keys the recipe decides (train.micro_batch_size, global_batch_size, optim.grad_clip)."""


# ------------------------------------------------------------------------------------------------------------
# Model and recipe


def load_model_and_recipe(model_dir: str | Path, overrides: list[str] | None = None):
    """``(SSALlamaForCausalLM in train mode, fp32, CPU; its RecipeConfig)``. The recipe is the one stored in the
    folder (or derived from its config) with ``overrides`` applied; the model section must still match the weights
    (``recipe_for_hf_config`` names the first field that does not)."""
    config, state = load_hf_folder(model_dir)
    source = f"HF folder {str(model_dir)!r}"
    recipe = recipe_for_hf_config(config, None, source)
    if overrides:
        recipe = from_dict(RecipeConfig, apply_overrides(to_dict(recipe), list(overrides)))
        recipe = recipe_for_hf_config(config, recipe, source)
    recipe.validate()
    model = hf_model_from_state_dict({k: v.float() for k, v in state.items()}, config)
    return model.train(), recipe


def set_modes(model, ssa: SSAConfig, seed: int, step: int, microbatch: int) -> list[str]:
    """Puts every layer of ``model`` in training mode for micro-batch ``microbatch`` of ``step``: its mode drawn as
    the Megatron layers draw it (layer numbers from 1, as Megatron's). Returns the modes, first layer first."""
    modes = []
    for attn in model.ssa_attention_modules():
        layer = attn.layer_idx + 1 if ssa.mode_sampling == "per_layer" else None
        mode = sample_mode(seed, step, microbatch, ssa.p_full, layer)
        attn.ssa_training = (ssa, mode)
        modes.append(mode)
    return modes


def alignment_loss(model, alpha: float) -> torch.Tensor | None:
    """``alpha`` times the mean over layers of the alignment losses of the last training forward (None when
    ``alpha`` is 0, where no layer computes one)."""
    if alpha == 0:
        return None
    losses = [attn.alignment_loss for attn in model.ssa_attention_modules()]
    if any(loss is None for loss in losses):
        raise RuntimeError("alignment_loss: a layer kept no alignment loss; call set_modes and run a forward in "
                           "train mode first")
    return alpha * torch.stack([loss.float() for loss in losses]).mean()


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Token mean of the cross-entropy under ``loss_mask`` (as the Megatron loop's ``loss_func``), in float32."""
    per_token = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
    mask = loss_mask.flatten().float()
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


# ------------------------------------------------------------------------------------------------------------
# Saving


def save_folder(model, recipe: RecipeConfig, source_dir: str | Path, out_dir: str | Path, step: int) -> Path:
    """Writes ``out_dir/step_XXXXXXXX`` (an ``ssa_llama`` export: config with the recipe's SSA inference settings
    and the recipe itself, weights, remote code, the input's tokenizer files) atomically, then ``out_dir/latest``."""
    out = Path(out_dir).expanduser()
    final = out / f"step_{step:08d}"
    tmp = out / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    config = SSALlamaConfig.from_dict(model.config.to_dict())
    fresh = hf_config_from_recipe(recipe).to_dict()  # the one recipe -> HF field mapping
    for key, value in fresh.items():
        if key.startswith("ssa_") or key == "megatron_recipe":
            setattr(config, key, value)
    # Copies: under ZeRO the parameters are views into flat buffers, which safetensors refuses to write.
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # saved once; HF re-ties it on load
    write_export(tmp, config, state, plain_llama=False)
    for name in TOKENIZER_FILES:
        if (Path(source_dir) / name).is_file():
            shutil.copyfile(Path(source_dir) / name, tmp / name)
    if final.exists():  # a re-run of the same step: replace it whole
        shutil.rmtree(final)
    os.rename(tmp, final)
    marker = out / "latest.tmp"
    marker.write_text(final.name + "\n")
    os.replace(marker, out / "latest")
    return final


# ------------------------------------------------------------------------------------------------------------
# Engines: one optimizer step over its micro-batches


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups with Megatron's exemption: biases and 1-D parameters (norm weights) are not decayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class TorchEngine:
    """One process, torch AdamW, fp32 weights (bf16/fp16 autocast on CUDA for ``train.precision``)."""

    name = "torch"

    def __init__(self, model, recipe: RecipeConfig, device: torch.device):
        self.module = model.to(device)
        self.device = device
        o = recipe.optim
        self.optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas),
                                           eps=o.eps)
        self.grad_clip = o.grad_clip
        self.accumulation = recipe.train.global_batch_size // recipe.train.micro_batch_size
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.train.precision)
        self.autocast = dtype if device.type == "cuda" else None

    def forward(self, **kwargs):
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            return self.module(**kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def step(self) -> float:
        norm = (torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip or float("inf")))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)


class DeepSpeedEngine:
    """DeepSpeed's engine from a JSON config (ZeRO-2 in ``tools/ds_zero2.json``) with a torch AdamW as the client
    optimizer: no fused-optimizer extension to compile, and the same optimizer and groups as :class:`TorchEngine`.
    ``backward`` divides by the accumulation steps itself (DeepSpeed's ``scale_wrt_gas``). ``grad_norm`` is NaN
    where DeepSpeed computes none (ZeRO stage 0)."""

    name = "deepspeed"

    def __init__(self, model, recipe: RecipeConfig, device: torch.device, ds_config: dict):
        import deepspeed

        o = recipe.optim
        optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.module = self.engine.module
        self.optimizer = optimizer  # the LR schedule sets its groups' lr; ZeRO steps with them
        self.device = device

    def forward(self, **kwargs):
        return self.engine(**kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        # DeepSpeed counts micro-batches by its step() calls and updates only at the accumulation boundary, so
        # every micro-batch but the last of a step calls it too (there it only advances the count).
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()

    def step(self) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")


def deepspeed_config(path: str | Path, recipe: RecipeConfig, world_size: int) -> dict:
    """The JSON at ``path`` with the batch keys and precision set from the recipe (one line when it disagrees)."""
    path = Path(path).expanduser()
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--deepspeed {str(path)!r}: not a readable DeepSpeed JSON config ({err})") from err
    if "optimizer" in cfg:
        raise ValueError(f"--deepspeed {str(path)!r}: remove its 'optimizer' section; the optimizer is AdamW from the "
                         "recipe's optim section")
    tr = recipe.train
    accumulation = tr.global_batch_size // (tr.micro_batch_size * world_size)
    wanted = {"train_micro_batch_size_per_gpu": tr.micro_batch_size, "gradient_accumulation_steps": accumulation,
              "train_batch_size": tr.global_batch_size, "gradient_clipping": recipe.optim.grad_clip}
    for key in BATCH_KEYS:
        if key in cfg and cfg[key] != "auto" and cfg[key] != wanted[key]:
            raise ValueError(f"--deepspeed {str(path)!r}: {key}={cfg[key]!r} but the recipe gives {wanted[key]!r}; "
                             "set it with train.micro_batch_size / train.global_batch_size / optim.grad_clip or 'auto'")
    cfg.update(wanted)
    cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": tr.precision == "bf16"}
    cfg["fp16"] = {**cfg.get("fp16", {}), "enabled": tr.precision == "fp16"}
    cfg.setdefault("zero_allow_untested_optimizer", True)  # a torch AdamW client optimizer under ZeRO
    return cfg


# ------------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class StepLog:
    step: int
    loss: float
    lm: float
    alignment: float | None
    modes: list[str]
    """The first layer's mode of each micro-batch."""
    lr: float
    grad_norm: float


def _init_deepspeed_process_group(device: torch.device) -> tuple[int, int]:
    """(rank, world size); a single process started without a launcher gets a one-process group."""
    import deepspeed

    if "RANK" not in os.environ:
        from ssa_megatron.training.parallel import free_port

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def finetune(model_dir: str | Path, out_dir: str | Path, overrides: list[str] | None = None, *,
             deepspeed: str | Path | None = None, save_interval: int = 0,
             log: Callable[[str], None] = print) -> tuple[Path, list[StepLog]]:
    """Fine-tunes ``model_dir`` for ``train.steps`` optimizer steps; returns the last save and the step logs.

    Args:
        overrides: recipe overrides (``ssa.alpha=1``, ``data.train_shards=/data/shards``, ``train.steps=100``, ...).
        deepspeed: a DeepSpeed JSON config (``tools/ds_zero2.json``); None: the plain torch loop.
        save_interval: also save every this many steps (0: at the end only).
    """
    model, recipe = load_model_and_recipe(model_dir, overrides)
    tr = recipe.train
    device = torch.device("cuda" if tr.device == "cuda" or (tr.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if deepspeed is not None:
        try:
            import deepspeed as _  # noqa: F401
        except ImportError as err:
            raise ValueError(f"--deepspeed {str(deepspeed)!r}: DeepSpeed is not installed ({err}); "
                             "pip install -e \".[deepspeed]\", or leave --deepspeed out for the plain torch loop") from err
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            device = torch.device("cuda", torch.cuda.current_device())
        rank, world = _init_deepspeed_process_group(device)
    else:
        rank, world = 0, 1
    if tr.global_batch_size % (tr.micro_batch_size * world):
        raise ValueError(f"train.global_batch_size={tr.global_batch_size} must be a multiple of "
                         f"train.micro_batch_size={tr.micro_batch_size} x {world} data-parallel ranks")
    accumulation = tr.global_batch_size // (tr.micro_batch_size * world)

    from ssa_megatron.data.from_config import build_loaders
    from ssa_megatron.training.lr_schedule import WarmupDecayLR

    data = build_loaders(recipe, dp_rank=rank, dp_world_size=world, log=log if rank == 0 else (lambda _: None))
    model.to(device)
    engine = (DeepSpeedEngine(model, recipe, device, deepspeed_config(deepspeed, recipe, world)) if deepspeed
              else TorchEngine(model, recipe, device))
    schedule = WarmupDecayLR(recipe.optim, tr.steps)
    ssa = recipe.ssa
    if rank == 0:
        log(f"finetune_hf: {model_dir} -> {out_dir}: {tr.steps} steps of {tr.global_batch_size} x "
            f"{recipe.model.seq_length} tokens ({accumulation} micro-batches of {tr.micro_batch_size} on {world} "
            f"rank(s)), engine {engine.name}, {device.type}; SSA p_full={ssa.p_full} alpha={ssa.alpha} "
            f"budget {ssa.top_k}x{ssa.block_size}, data {data.train_source}")
    history: list[StepLog] = []
    saved = None
    start = time.perf_counter()
    for step in range(tr.steps):
        lr = schedule.apply(engine.optimizer)
        totals = {"loss": 0.0, "lm": 0.0, "alignment": 0.0}
        modes = []
        for micro in range(accumulation):
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in next(data.train).items()}
            modes.append(set_modes(engine.module, ssa, tr.seed, step, micro)[0])
            extra = {"cu_seqlens": batch["cu_seqlens"]} if ssa.document_mask and batch.get("cu_seqlens") is not None else {}
            out = engine.forward(input_ids=batch["tokens"], position_ids=batch["position_ids"], use_cache=False, **extra)
            lm = lm_loss(out.logits, batch["labels"], batch["loss_mask"])
            align = alignment_loss(engine.module, ssa.alpha)
            loss = lm + align if align is not None else lm
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"finetune_hf: step {step} micro-batch {micro}: loss {loss.item()} "
                                         f"(lm {lm.item()}) is not finite")
            engine.backward(loss)
            totals["loss"] += loss.item() / accumulation
            totals["lm"] += lm.item() / accumulation
            totals["alignment"] += (align.item() if align is not None else 0.0) / accumulation
        norm = engine.step()
        schedule.step()
        entry = StepLog(step + 1, totals["loss"], totals["lm"], totals["alignment"] if ssa.alpha else None,
                        modes, lr, norm)
        history.append(entry)
        if rank == 0 and ((step + 1) % max(1, tr.log_interval) == 0 or step + 1 == tr.steps):
            rate = (step + 1) * tr.global_batch_size * recipe.model.seq_length / (time.perf_counter() - start)
            align_text = f" align {entry.alignment:.4f}" if entry.alignment is not None else ""
            log(f"step {entry.step}/{tr.steps} loss {entry.loss:.4f} lm {entry.lm:.4f}{align_text} "
                f"modes {''.join(m[0] for m in modes)} lr {lr:.3g} grad_norm {norm:.3g} {rate:.0f} tok/s")
        if rank == 0 and (step + 1 == tr.steps or (save_interval and (step + 1) % save_interval == 0)):
            saved = save_folder(engine.module, recipe, model_dir, out_dir, step + 1)
            log(f"saved {saved}")
    if deepspeed is not None and world > 1:
        torch.distributed.barrier()
    return saved or Path(out_dir) / f"step_{tr.steps:08d}", history
