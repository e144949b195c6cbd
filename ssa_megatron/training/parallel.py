"""Process groups: torch.distributed + Megatron's parallel_state from the recipe (TP × CP × DP × PP).

Launch-agnostic: a plain ``python``/``ssa-train`` process is world size 1; under torchrun (or srun exporting
RANK/WORLD_SIZE/LOCAL_RANK) the usual ``env://`` variables are read. NCCL on GPU, gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from ssa_megatron.config import RecipeConfig, TrainConfig


@dataclass(frozen=True)
class ParallelDims:
    """Where this process sits. ``dp`` excludes CP (Megatron's data-parallel group without context parallel)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    tp: int
    pp: int
    cp: int
    dp: int
    vpp: int | None
    dp_rank: int
    tp_rank: int
    pp_rank: int
    cp_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def pick_device(train: TrainConfig) -> torch.device:
    """``train.device``: 'auto' picks CUDA when a GPU is visible."""
    if train.uses_cuda():
        if not torch.cuda.is_available():
            raise ValueError("train.device='cuda' but no CUDA device is visible")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_parallel(recipe: RecipeConfig) -> ParallelDims:
    """Initialises torch.distributed (if needed) and Megatron's model-parallel groups; seeds the RNGs."""
    device = pick_device(recipe.train)
    if dist.is_initialized():  # a caller (a test harness, a notebook) set up the process group already
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        # Megatron's RoPE and RNG tracker ask torch.cuda for a device; the Megatron integration shims that.
        from ssa_megatron.megatron import cpu_compat

        cpu_compat.enable_cpu_compat()
    if not dist.is_initialized():
        if world_size == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
            # A lone process (not torchrun): its own rendezvous on a free local port, whatever the environment
            # inherited, so concurrent or back-to-back runs never collide.
            os.environ["MASTER_ADDR"] = "127.0.0.1"
            os.environ["MASTER_PORT"] = str(free_port())
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=recipe.train.distributed_timeout_minutes),
            device_id=device if device.type == "cuda" else None,
        )
    par = recipe.parallel
    model_parallel = par.tensor_parallel * par.pipeline_parallel * par.context_parallel
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not a multiple of parallel.tensor_parallel x pipeline_parallel x "
            f"context_parallel = {par.tensor_parallel} x {par.pipeline_parallel} x {par.context_parallel}"
        )
    if device.type == "cpu" and par.pipeline_parallel > 1:
        raise ValueError(
            f"parallel.pipeline_parallel={par.pipeline_parallel}: pipeline schedules need CUDA "
            "(Megatron allocates their buffers on the GPU); use 1 on CPU"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=par.tensor_parallel,
        pipeline_model_parallel_size=par.pipeline_parallel,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline_parallel,
        context_parallel_size=par.context_parallel,
        distributed_timeout_minutes=recipe.train.distributed_timeout_minutes,
    )
    seed_everything(recipe.train.seed, device)
    return ParallelDims(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=device,
        tp=par.tensor_parallel,
        pp=par.pipeline_parallel,
        cp=par.context_parallel,
        dp=parallel_state.get_data_parallel_world_size(),
        vpp=par.virtual_pipeline_parallel,
        dp_rank=parallel_state.get_data_parallel_rank(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        cp_rank=parallel_state.get_context_parallel_rank(),
    )


def seed_everything(seed: int, device: torch.device) -> None:
    """Same seed for parameters that are replicated; Megatron's tracker derives the TP-sharded streams."""
    # PP stages own different layers, so they get different default streams (as in Megatron-LM).
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(stage_seed)
    if device.type == "cuda":
        tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def init_single_process(seed: int = 1234) -> None:
    """Megatron parallel state for one process (tp = pp = cp = 1) where no recipe drives the layout: checkpoint
    conversion. A gloo group of world size 1 is created unless one exists; without CUDA the CPU patches apply."""
    from ssa_megatron.megatron import cpu_compat

    cpu_compat.enable_cpu_compat()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel()
    device = torch.device("cpu") if cpu_compat.cpu_compat_enabled() else torch.device("cuda")
    seed_everything(seed, device)


def destroy_parallel() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
