"""Helpers for tests and small checks: free ports, gloo process groups spawned with torch.multiprocessing,
Megatron parallel-state set-up, and a tiny recipe."""

from __future__ import annotations

import os
import sys
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssa_megatron.config import ModelConfig, ParallelConfig, RecipeConfig, SSAConfig, TrainConfig
from ssa_megatron.training.parallel import free_port


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        if "megatron.core.parallel_state" in sys.modules:
            sys.modules["megatron.core.parallel_state"].destroy_model_parallel()
        dist.destroy_process_group()


def spawn_gloo(fn: Callable, world_size: int, *args) -> None:
    """Runs ``fn(rank, world_size, *args)`` in ``world_size`` processes joined by a gloo group on a free port.
    ``fn`` must be importable (module level). Exceptions in a child are re-raised here."""
    mp.spawn(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)


def init_megatron(tp: int = 1, pp: int = 1, cp: int = 1, vpp: int | None = None, seed: int = 1234) -> None:
    """Megatron parallel state on an initialised default process group (CPU patches applied without CUDA)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from ssa_megatron.megatron.cpu_compat import enable_cpu_compat

    enable_cpu_compat()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp,
        virtual_pipeline_model_parallel_size=vpp,
    )
    from ssa_megatron.megatron import cpu_compat

    if cpu_compat.cpu_compat_enabled():
        torch.manual_seed(seed)
    else:
        model_parallel_cuda_manual_seed(seed)


def tiny_recipe(
    num_layers: int = 2, seq_length: int = 64, tp: int = 1, pp: int = 1, cp: int = 1, alpha: float = 10.0,
    p_full: float = 0.5, precision: str = "fp32", **ssa_overrides,
) -> RecipeConfig:
    """A model small enough for CPU tests: hidden 64, 4 query heads, 2 KV heads, block 16, budget 2 blocks."""
    recipe = RecipeConfig(
        name="test",
        model=ModelConfig(num_layers=num_layers, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                          num_query_groups=2, vocab_size=128, seq_length=seq_length),
        ssa=SSAConfig(block_size=16, top_k=2, alpha=alpha, p_full=p_full, **ssa_overrides),
        parallel=ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, context_parallel=cp),
        train=TrainConfig(precision=precision, micro_batch_size=2, global_batch_size=2),
    )
    recipe.validate()
    return recipe
