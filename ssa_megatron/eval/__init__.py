"""Evaluation with the HF model: perplexity under full and sparse inference at chosen budgets, budget sweeps
(table + plot) and per-layer attention statistics (sparsity, entropy, KL(full‖sparse), sink mass).

A model is an HF folder or a Megatron checkpoint, read through ``ssa_megatron.training.checkpoint`` and converted in
memory. The held-out evaluation inside a training run (Megatron model, training parallel layout) is
``ssa_megatron.training.evaluate``: the loop cannot import this package, which sits above training."""

from ssa_megatron.eval.data import eval_batches
from ssa_megatron.eval.perplexity import METRICS, attention_statistics, load_model, perplexity
from ssa_megatron.eval.sweep import budget_sweep, plot_sweep, write_table

__all__ = ["eval_batches", "load_model", "perplexity", "attention_statistics", "budget_sweep", "write_table",
           "plot_sweep", "METRICS"]
