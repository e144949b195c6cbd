"""In-loop evaluation: held-out perplexity of the Megatron model under full and under sparse inference.

It runs inside the training job on the training parallel layout (Megatron's forward-only schedule, the loop's
``forward_step``), every ``train.eval_interval`` steps and at the end. Evaluation of a saved model (HF model:
perplexity at chosen budgets, budget sweeps, attention statistics) is ``ssa_megatron.eval``, which sits above
training in the import layering, so the loop cannot call it.
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from ssa_megatron.config import RecipeConfig
from ssa_megatron.megatron.mode import force_mode
from ssa_megatron.training.step import forward_step, reduce_lm_losses, to_device


class HeldOutEval:
    """``train.eval_batches`` held-out micro-batches, the same ones at every evaluation (the stream's position
    when this is built is replayed each time)."""

    def __init__(self, loader, recipe: RecipeConfig, dims):
        self.loader = loader
        self.start = loader.state_dict()
        self.recipe = recipe
        self.dims = dims

    def run(self, model) -> dict[str, float]:
        """``eval/loss_{full,sparse}`` and ``eval/ppl_{full,sparse}`` of the model chunks (train mode restored)."""
        self.loader.load_state_dict(self.start)
        recipe, num_microbatches = self.recipe, self.recipe.train.eval_batches
        batches = [to_device(next(self.loader), self.dims.device) for _ in range(num_microbatches)]
        forward_backward = get_forward_backward_func()
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
                lm = reduce_lm_losses(reports, self.dims)
                out[f"eval/loss_{mode}"] = lm["loss/lm"]
                out[f"eval/ppl_{mode}"] = lm["loss/ppl"]
        finally:
            for chunk in model:
                chunk.train()
        return out
