"""AdamW with global-norm clipping: Megatron's (distributed) optimizer on CUDA, a small torch adapter on CPU.

Both expose what the loop and the checkpointer use::

    step() -> (update_successful: bool, grad_norm: float | None, num_zeros: None)
    zero_grad(), param_groups, sharded_state_dict(model_sharded_sd, is_loading), load_state_dict(sd)

Megatron's optimizers allocate on ``device="cuda"`` (grad-norm buffers, overflow flags), so CPU runs use
``LocalAdamW``: ``torch.optim.AdamW`` with Megatron's parameter grouping (no weight decay on biases and norm
weights) and Megatron's model-parallel-aware clipping; its checkpoint state uses the same sharded layout as
Megatron's non-distributed optimizer (``optimizer.state.exp_avg.<param key>``). Loading optimizer state from a
checkpoint, with the workarounds Megatron's torch AdamW fallback needs, is in ``checkpoint.py``.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    optim_state_to_sharding_state,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from ssa_megatron.config import RecipeConfig


def build_optimizer(recipe: RecipeConfig, model_chunks: list[torch.nn.Module], device: torch.device):
    opt = recipe.optim
    if device.type == "cuda":
        config = OptimizerConfig(
            optimizer="adam",
            lr=opt.lr,
            min_lr=opt.min_lr,
            weight_decay=opt.weight_decay,
            adam_beta1=opt.betas[0],
            adam_beta2=opt.betas[1],
            adam_eps=opt.eps,
            clip_grad=opt.grad_clip,
            bf16=recipe.train.precision == "bf16",
            fp16=recipe.train.precision == "fp16",
            params_dtype=_dtype(recipe.train.precision),
            use_distributed_optimizer=recipe.parallel.distributed_optimizer,
            overlap_param_gather=False,  # see wrap.py: params are gathered inside step()
        )
        optimizer = get_megatron_optimizer(config, model_chunks)
        if recipe.train.fused_ops:
            use_fused_adamw(optimizer)
        return optimizer
    if recipe.train.precision != "fp32":
        raise ValueError(f"train.precision={recipe.train.precision!r}: CPU runs support only 'fp32'")
    return LocalAdamW(model_chunks, lr=opt.lr, betas=opt.betas, eps=opt.eps,
                      weight_decay=opt.weight_decay, grad_clip=opt.grad_clip)


def _dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def _no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    # Megatron's default: biases and 1-D parameters (norm weights) are not decayed.
    return name.endswith(".bias") or param.ndim == 1


class LocalAdamW:
    """fp32 AdamW for CPU runs, with the MegatronOptimizer surface the loop and checkpointer use."""

    def __init__(self, model_chunks: list[torch.nn.Module], *, lr: float, betas: tuple[float, float],
                 eps: float, weight_decay: float, grad_clip: float):
        decay, no_decay = [], []
        for chunk in model_chunks:
            for name, param in chunk.named_parameters():
                if param.requires_grad:
                    (no_decay if _no_weight_decay(name, param) else decay).append(param)
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False)
        self.grad_clip = grad_clip

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def parameters(self) -> Iterable[torch.nn.Parameter]:
        for group in self.optimizer.param_groups:
            yield from group["params"]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def grad_norm(self) -> float:
        """Global L2 norm over model-parallel ranks, counting TP-duplicated parameters once."""
        sq = torch.zeros((), dtype=torch.float64)
        for p in self.parameters():
            if p.grad is not None and tensor_parallel.param_is_not_tensor_parallel_duplicate(p):
                sq += p.grad.detach().double().pow(2).sum()
        group = parallel_state.get_model_parallel_group()
        if dist.get_world_size(group) > 1:
            dist.all_reduce(sq, group=group)
        return math.sqrt(sq.item())

    def step(self) -> tuple[bool, float, None]:
        norm = self.grad_norm()
        if not math.isfinite(norm):
            return False, norm, None
        if self.grad_clip > 0 and norm > self.grad_clip:
            coef = self.grad_clip / (norm + 1e-6)
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
        self.optimizer.step()
        return True, norm, None

    # ---- checkpointing (same layout as Megatron's FP32Optimizer) ----

    def _init_state(self) -> None:
        for p in self.parameters():
            state = self.optimizer.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool = False, metadata=None) -> dict:
        if is_loading:
            self._init_state()
        state_dict = self.optimizer.state_dict()
        id_map = get_param_id_to_sharded_param_map(model_sharded_state_dict, self.parameters())
        steps = {float(s["step"]) for s in state_dict["state"].values() if "step" in s}
        if len(steps) > 1:
            raise ValueError(f"optimizer step differs between parameters: {sorted(steps)}")
        optim_state_to_sharding_state(state_dict, id_map, exclude_keys=("step",))
        if steps:
            state_dict["state"]["common_step"] = torch.tensor(steps.pop())
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        common_step = state_dict["state"].pop("common_step", None)
        if common_step is not None:
            for s in state_dict["state"].values():
                s["step"] = common_step.clone().float()
        self.optimizer.load_state_dict(state_dict)


def torch_optimizers(optimizer):
    """The torch optimizers inside Megatron's (chained) optimizer."""
    from megatron.core.optimizer.optimizer import MegatronOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(opt, MegatronOptimizer) and isinstance(inner, torch.optim.Optimizer):
            yield inner


def use_fused_adamw(optimizer) -> None:
    """Switches the torch AdamW Megatron falls back to (no Apex/TE) from ``foreach`` to the fused CUDA kernel.

    Megatron builds ``torch.optim.AdamW`` with torch's default (``foreach``); the fused kernel does the update in
    one pass. Fused AdamW keeps ``step`` as a float32 tensor on the parameter's device, so existing state is moved
    there (after a checkpoint load, :func:`place_fused_adamw_steps` does that alone). Idempotent.
    """
    for inner in torch_optimizers(optimizer):
        if not isinstance(inner, torch.optim.AdamW):
            continue
        for group in inner.param_groups:
            if all(p.is_cuda for p in group["params"]):
                group["fused"], group["foreach"] = True, False
    place_fused_adamw_steps(optimizer)


def place_fused_adamw_steps(optimizer) -> None:
    """Moves Adam ``step`` scalars of fused param groups onto their parameters' device (after a checkpoint load)."""
    for inner in torch_optimizers(optimizer):
        for group in inner.param_groups:
            if not group.get("fused"):
                continue
            for p in group["params"]:
                state = inner.state.get(p)
                if state and "step" in state:
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
