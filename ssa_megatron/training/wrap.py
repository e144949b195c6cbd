"""Model chunks for training: build the GPT model per (virtual) pipeline stage, then apply precision and
data parallelism to it.

- Model construction itself is ``ssa_megatron.megatron.model.build_gpt_model`` (one place, the SSA layer spec;
  it also maps ``train.precision`` and ``train.recompute`` onto the TransformerConfig).
- bf16/fp16: Megatron's ``Float16Module`` (casts inputs and the loss); the optimizer keeps fp32 master weights.
- CUDA: Megatron's ``DistributedDataParallel`` with bucketed gradient reduce-scatter/all-reduce overlapped with
  the backward pass; the schedule hooks (``no_sync_func``,
  ``finalize_model_grads_func``) are installed on the model config as Megatron-LM does.
- CPU (gloo): Megatron's DDP needs CUDA streams, so ``CPUDataParallel`` all-reduces gradients once per step.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.transformer.module import Float16Module

from ssa_megatron.config import RecipeConfig


def build_model_chunks(recipe: RecipeConfig, dims) -> list[torch.nn.Module]:
    from ssa_megatron.megatron.model import build_gpt_model

    chunks = []
    for vp_stage in range(dims.vpp or 1):
        stage = vp_stage if dims.vpp else None
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage)
        model = build_gpt_model(recipe, pre, post, vp_stage=stage)
        model.to(dims.device)
        chunks.append(model)
    return chunks


def wrap_for_training(chunks: list[torch.nn.Module], recipe: RecipeConfig, dims) -> list[torch.nn.Module]:
    config = chunks[0].config
    if recipe.train.precision in ("bf16", "fp16"):
        chunks = [Float16Module(config, c) for c in chunks]
    if dims.device.type != "cuda":
        if recipe.parallel.sequence_parallel:
            raise ValueError("parallel.sequence_parallel=true needs CUDA (Megatron's DDP); set it false on CPU")
        wrapped = [CPUDataParallel(c) for c in chunks]
        config.finalize_model_grads_func = finalize_cpu_grads
        config.no_sync_func = None
        return wrapped
    par = recipe.parallel
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=par.overlap_grad_reduce,
        use_distributed_optimizer=par.distributed_optimizer,
        # The distributed optimizer all-gathers updated params inside optimizer.step() (not overlapped with the
        # next forward): parameters are then always current when a checkpoint is written or evaluation runs,
        # at the cost of one un-overlapped bf16 all-gather per step.
        overlap_param_gather=False,
        average_in_collective=True,
        bucket_size=max(40_000_000, 1_000_000 * dims.dp) if par.overlap_grad_reduce else None,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        # Only the first chunk is bucketed (Megatron-LM: the later chunks' grads are ready together).
        chunk_ddp_config = ddp_config if (i == 0 and dims.pp_rank == 0) else dataclasses.replace(ddp_config, bucket_size=None)
        wrapped.append(DistributedDataParallel(config=config, ddp_config=chunk_ddp_config, module=chunk,
                                               disable_bucketing=i > 0))
    for model in wrapped:
        model.broadcast_params()
    if par.overlap_grad_reduce:
        config.no_sync_func = [m.no_sync for m in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
        config.grad_sync_func = [m.start_grad_sync for m in wrapped] if len(wrapped) > 1 else wrapped[0].start_grad_sync
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


class CPUDataParallel(torch.nn.Module):
    """The slice of Megatron's DDP interface the schedules, optimizer and checkpointer use, for gloo runs."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module
        self.config = getattr(module, "config", None)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        yield

    def zero_grad_buffer(self) -> None:
        for p in self.module.parameters():
            p.grad = None

    def finish_grad_sync(self, force_all_reduce: bool = False) -> None:
        """Averages gradients over the data-parallel (× context-parallel) group."""
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        size = dist.get_world_size(group)
        if size == 1:
            return
        for p in self.module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=group)
                p.grad.div_(size)

    def sharded_state_dict(self, prefix: str = "", *args, **kwargs):
        return self.module.sharded_state_dict(prefix, *args, **kwargs)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True):
        return self.module.load_state_dict(state_dict, strict=strict)


def finalize_cpu_grads(model_chunks, num_tokens=None, pg_collection=None, force_all_reduce=False) -> None:
    """``finalize_model_grads`` for CPU runs (pp = 1, no sequence parallel): the DP gradient average."""
    if num_tokens is not None:
        raise ValueError("calculate_per_token_loss is not supported on CPU runs (the loop uses the mean loss)")
    for chunk in model_chunks:
        chunk.finish_grad_sync()
