"""Typed recipe schema: dataclasses with defaults, YAML loading, ``a.b=c`` overrides and validation.

A recipe is a YAML file whose top-level keys are the sections of :class:`RecipeConfig`. A recipe may name a
``base`` recipe (path relative to itself) whose values it overrides, so baselines are small overlays.
Every value is checked against its declared type; unknown keys and bad values raise ``ValueError`` naming the
key, the value and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

ScoreFn = Literal["group_softmax", "dot"]
GateKind = Literal["per_head", "none"]
AttentionMode = Literal["full", "sparse"]
Backend = Literal["auto", "reference", "triton"]
Selection = Literal["exact", "authors_chunked"]
Normaliser = Literal["earlier_blocks", "authors"]
ModeSampling = Literal["per_microbatch", "per_layer"]
Alignment = Literal["bidirectional", "sparsity_only", "commitment_only"]


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, also reading exponent numbers without a dot or sign (``1e-3``, ``3e5``) as floats,
    as YAML 1.2 does; PyYAML (YAML 1.1) reads them as strings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"))


def load_yaml(text: str, what: str) -> Any:
    """Parses YAML with :class:`_Loader`; a syntax error becomes one ValueError line naming ``what``."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{what}: not valid YAML: {problem}{where}") from None


def _reject_non_finite(section: Any, prefix: str) -> None:
    """NaN and infinity mean nothing in any float field of the recipe: one line naming the first such field."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        values = value if isinstance(value, tuple) else (value,)
        if any(isinstance(x, float) and not math.isfinite(x) for x in values):
            raise ValueError(f"{prefix}.{f.name}={value!r}: must be a finite number (not NaN or infinity)")


@dataclass
class SSAConfig:
    """SSA attention semantics (docs/ssa.md rules 1-11). Budgets are in blocks; receptive field = top_k * block_size."""

    block_size: int = 16
    """Tokens per key block (selection and scoring granularity); a power of two >= 16."""
    top_k: int = 16
    """Blocks each query attends to in sparse mode, its own block included."""
    score: ScoreFn = "group_softmax"
    """Block score: group-summed softmax of q·k̄ (the authors' code) or the mean raw dot (MoBA)."""
    selection: Selection = "exact"
    """Which scored blocks the top-k keeps. exact: the best top_k - 1 earlier blocks (rule 3, the paper).
    authors_chunked: the authors' kernel: the best block_size/2 blocks of the older block_size-block chunks plus the
    best of the query's newest chunk, then the top_k best of those (9-16 blocks at BS = K = 16; docs/ssa.md
    "Deviations from the paper and the authors' code")."""
    normaliser: Normaliser = "earlier_blocks"
    """group_softmax's per-head softmax normaliser. earlier_blocks: the scored blocks (rule 2). authors: also the
    own block when the query is its last token (the authors' kernel: complete blocks up to the query)."""
    sink_blocks: int = 0
    """First blocks always kept (count toward top_k)."""
    local_blocks: int = 0
    """Blocks just before the query's own block always kept (count toward top_k)."""
    p_full: float = 0.5
    """Probability that a micro-batch runs full attention forward (else sparse)."""
    mode_sampling: ModeSampling = "per_microbatch"
    """per_microbatch: one mode for all layers of a micro-batch (rule 6). per_layer: every layer draws its own mode
    (the paper's "Random each layer" ablation, reported to diverge)."""
    alpha: float = 10.0
    """Weight of the alignment loss relative to the token-mean LM loss. 0 disables the counterpart branch."""
    smooth_l1_beta: float = 1.0
    alignment: Alignment = "bidirectional"
    """Alignment loss terms (rule 7). bidirectional: sparsity + commitment. sparsity_only: only the term that moves
    the full branch toward the (stopped) sparse output; commitment_only: only the term that moves the sparse branch
    toward the (stopped) full output (the paper's one-direction ablations, reported to diverge)."""
    gate: GateKind = "per_head"
    """Per-head sigmoid gate on both attention outputs, from the layer's normalized input."""
    document_mask: bool = False
    """Keep packed documents apart (each with its own block grid) in both branches."""
    inference_mode: AttentionMode = "sparse"
    """Attention used when not training (evaluation, HF inference)."""
    inference_top_k: Optional[int] = None
    """Budget override at inference (None: top_k)."""
    inference_block_size: Optional[int] = None
    """Block size override at inference (None: block_size)."""
    backend: Backend = "auto"
    """auto: Triton kernels on CUDA, the reference elsewhere."""
    overlap_branches: bool = True
    """When both branches are computed on CUDA (training, alpha > 0), run the selection and the sparse branch on a
    second stream while the full branch runs. Speed only: the results are bitwise the same."""

    def validate(self, prefix: str = "ssa") -> None:
        _reject_non_finite(self, prefix)
        for name in ("block_size", "inference_block_size"):
            value = getattr(self, name)
            if value is not None and (not _is_power_of_two(value) or value < 16):
                raise ValueError(f"{prefix}.{name}={value!r}: must be a power of two >= 16")
        for name in ("top_k", "inference_top_k"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{prefix}.{name}={value!r}: the budget must be at least 1 block")
        for name in ("sink_blocks", "local_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"{prefix}.{name}={getattr(self, name)!r}: must be >= 0")
        budget = self.top_k if self.inference_top_k is None else min(self.top_k, self.inference_top_k)
        if self.sink_blocks + self.local_blocks + 1 > budget:
            raise ValueError(
                f"{prefix}.sink_blocks + {prefix}.local_blocks + 1 (own block) = "
                f"{self.sink_blocks + self.local_blocks + 1} exceeds the budget top_k={budget}"
            )
        if self.selection == "authors_chunked":
            if self.sink_blocks or self.local_blocks:
                raise ValueError(f"{prefix}.selection='authors_chunked' forces no blocks (the authors' kernel has "
                                 f"none): sink_blocks={self.sink_blocks} and local_blocks={self.local_blocks} "
                                 "must be 0")
            for top_k, block_size in ((self.top_k, self.block_size), (self.for_inference().top_k,
                                                                      self.for_inference().block_size)):
                if top_k > block_size:
                    raise ValueError(f"{prefix}.selection='authors_chunked' keeps at most block_size blocks (the "
                                     f"authors' kernel sorts block_size candidates): top_k={top_k} exceeds "
                                     f"block_size={block_size}")
        if not 0.0 <= self.p_full <= 1.0:
            raise ValueError(f"{prefix}.p_full={self.p_full!r}: must be in [0, 1]")
        if self.alpha < 0:
            raise ValueError(f"{prefix}.alpha={self.alpha!r}: must be >= 0")
        if self.smooth_l1_beta <= 0:
            raise ValueError(f"{prefix}.smooth_l1_beta={self.smooth_l1_beta!r}: must be > 0")

    def for_inference(self) -> "SSAConfig":
        """The configuration used when not training: budget and block-size overrides applied."""
        return dataclasses.replace(
            self,
            top_k=self.inference_top_k or self.top_k,
            block_size=self.inference_block_size or self.block_size,
        )

    @property
    def receptive_field(self) -> int:
        return self.top_k * self.block_size


@dataclass
class RopeScalingConfig:
    """RoPE frequency scaling for a longer context than the one trained on (docs/ssa.md, length extrapolation).

    ``llama3`` is Llama 3.1's rule (transformers' ``rope_type: llama3``): wavelengths shorter than
    ``original_max_position_embeddings / high_freq_factor`` keep their frequency, those longer than
    ``original_max_position_embeddings / low_freq_factor`` are divided by ``factor``, and those between are
    interpolated smoothly."""

    type: Literal["none", "llama3"] = "none"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    """The context the model was trained at before scaling."""

    def validate(self, prefix: str = "model.rope_scaling") -> None:
        _reject_non_finite(self, prefix)
        if self.type == "none":
            return
        if self.factor < 1.0:
            raise ValueError(f"{prefix}.factor={self.factor!r}: must be >= 1")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(f"{prefix}.low_freq_factor={self.low_freq_factor!r}, high_freq_factor="
                             f"{self.high_freq_factor!r}: need 0 < low_freq_factor < high_freq_factor")
        if self.original_max_position_embeddings < 1:
            raise ValueError(f"{prefix}.original_max_position_embeddings={self.original_max_position_embeddings!r}: "
                             "must be >= 1")


@dataclass
class NSAConfig:
    """The NSA baseline's attention (``model.attention: nsa``, recipes/nsa.yaml): fla-core's native sparse
    attention (compressed blocks, selected blocks, sliding window), each branch gated per head (docs/ssa.md).

    fla-core 0.6.0's selection kernel needs ``block_size >= 2 * block_counts`` (block_counts rounded up to a power of
    two), so the authors' 16 blocks of 16 tokens cannot run on it; the default keeps their 256 selected tokens as 8
    blocks of 32."""

    block_size: int = 32
    """Tokens per compressed / selected block (a power of two >= 16)."""
    block_counts: int = 8
    """Blocks each query selects (the first, its own and the previous block among them)."""
    window_size: int = 128
    """Sliding-window branch: the query and the window_size - 1 tokens before it (0: no window branch)."""

    def validate(self, prefix: str = "nsa") -> None:
        _reject_non_finite(self, prefix)
        if not _is_power_of_two(self.block_size) or self.block_size < 16:
            raise ValueError(f"{prefix}.block_size={self.block_size!r}: must be a power of two >= 16")
        if self.block_counts < 1:
            raise ValueError(f"{prefix}.block_counts={self.block_counts!r}: must be >= 1")
        rounded = 1 << (self.block_counts - 1).bit_length()
        if self.block_size < 2 * rounded:
            raise ValueError(f"{prefix}.block_size={self.block_size} < 2 x {prefix}.block_counts={self.block_counts} "
                             f"(rounded up to {rounded}): fla-core's NSA selection kernel needs block_size >= 2 x "
                             "block_counts; raise block_size or lower block_counts")
        if self.window_size < 0:
            raise ValueError(f"{prefix}.window_size={self.window_size!r}: must be >= 0 (0: no sliding window)")


@dataclass
class ModelConfig:
    """Llama-style decoder shape."""

    num_layers: int = 2
    hidden_size: int = 128
    ffn_hidden_size: int = 512
    num_attention_heads: int = 4
    num_query_groups: int = 2
    """KV heads (GQA); must divide num_attention_heads."""
    vocab_size: int = 4096
    """Padded vocabulary; must cover the tokenizer's vocabulary."""
    seq_length: int = 256
    rope_theta: float = 500000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    """RoPE frequency scaling (type none: plain RoPE with rope_theta)."""
    norm_epsilon: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    scaled_output_init: bool = True
    """Megatron's default: the output projections of attention (linear_proj) and MLP (linear_fc2) start with
    std init_std / sqrt(2 * num_layers); false: init_std like every other weight (the authors' HF init). The LM head,
    embeddings and the gate use init_std either way."""
    attention: Literal["ssa", "nsa"] = "ssa"
    """The core attention: SSA (the ssa section) or the NSA baseline (the nsa section; fla-core, the 'nsa' extra,
    CUDA only)."""
    transformer_impl: Literal["local", "transformer_engine"] = "local"
    """Modules around the SSA core attention: megatron-core's own (any install, CPU too) or Transformer Engine's
    fused norm+linear layers (CUDA, the 'te' extra). The core attention is SSA's either way."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self, prefix: str = "model") -> None:
        _reject_non_finite(self, prefix)
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "vocab_size", "seq_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{prefix}.{name}={getattr(self, name)!r}: must be >= 1")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"{prefix}.hidden_size={self.hidden_size} is not divisible by "
                f"{prefix}.num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"{prefix}.num_query_groups={self.num_query_groups} must divide "
                f"{prefix}.num_attention_heads={self.num_attention_heads}"
            )
        self.rope_scaling.validate(f"{prefix}.rope_scaling")


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline_parallel: Optional[int] = None
    """Interleaved 1F1B: model chunks per pipeline rank."""
    context_parallel: int = 1
    cp_comm_type: Literal["all_gather", "a2a"] = "all_gather"
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    overlap_grad_reduce: bool = True

    def validate(self, prefix: str = "parallel") -> None:
        _reject_non_finite(self, prefix)
        for name in ("tensor_parallel", "pipeline_parallel", "context_parallel"):
            if getattr(self, name) < 1:
                raise ValueError(f"{prefix}.{name}={getattr(self, name)!r}: must be >= 1")
        if self.virtual_pipeline_parallel is not None and self.virtual_pipeline_parallel < 2:
            raise ValueError(f"{prefix}.virtual_pipeline_parallel={self.virtual_pipeline_parallel!r}: "
                             "must be None or >= 2")


@dataclass
class DataConfig:
    """Where training tokens come from and how they are read (ssa_megatron/data, docs/data.md)."""

    train_shards: str = "builtin:stdlib"
    """A shard directory written by tools/prepare_data.py, a brace-expandable shard pattern
    (``/data/train-{000000..000127}.tar``; meta.json must sit beside the shards) or ``builtin:stdlib`` (the
    embedded default: the running interpreter's standard library, tokenized into the cache directory on first
    use). With format megatron: a Megatron blend, ``"0.7 /data/a 0.3 /data/b"`` (weight, then a .bin/.idx path
    prefix or a directory written by prepare_data --format megatron) or one prefix/directory."""
    format: Literal["auto", "webdataset", "megatron"] = "auto"
    """webdataset: shards made by tools/prepare_data.py. megatron: Megatron .bin/.idx indexed datasets, read
    through megatron.core.datasets (blends, data.split). auto: megatron when train_shards is a weighted blend or
    names .idx/.bin prefixes or a --format megatron directory, else webdataset."""
    valid_shards: Optional[str] = None
    """Held-out shards; None: the held-out split (``valid-*.tar``) of train_shards. With format megatron: a
    blend or prefix of held-out data; None: the ``valid`` prefixes beside train_shards, or data.split."""
    split: Optional[str] = None
    """Format megatron only: Megatron's split string (``"98,2,0"``: train, valid, test shares of each prefix's
    documents) to hold out part of train_shards; not with valid_shards."""
    tokenizer: Optional[str] = None
    """A tokenizer.json; None: the tokenizer.json beside the data (shards, or the first prefix of a blend), and
    with builtin data a byte-level BPE trained on the embedded corpus."""
    cache_dir: str = "~/.cache/ssa_megatron"
    num_workers: int = 1
    """DataLoader worker processes per rank (0: read in the training process). The sample order depends on it,
    so resuming needs the same value."""
    skip_corrupt_shards: bool = False
    """Skip (and count in the logs) unreadable shards instead of stopping."""
    verify_checksums: bool = True
    """Check each shard's sha256 against meta.json when reading it (cheap next to training)."""
    shuffle_shards: int = 4
    """Shards each reader loads and shuffles together; memory is this many shards per worker."""
    valid_fraction: float = 0.02
    """Share of documents held out (by content hash) when the pipeline builds shards itself (builtin data)."""
    builtin_max_mb: float = 16.0
    """Cap on the standard-library text of the embedded corpus (the full library is ~11-12 MB)."""
    seed: int = 1234

    def validate(self, prefix: str = "data") -> None:
        _reject_non_finite(self, prefix)
        if self.num_workers < 0:
            raise ValueError(f"{prefix}.num_workers={self.num_workers!r}: must be >= 0")
        if self.shuffle_shards < 1:
            raise ValueError(f"{prefix}.shuffle_shards={self.shuffle_shards!r}: must be >= 1")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"{prefix}.valid_fraction={self.valid_fraction!r}: must be in [0, 1)")
        if self.builtin_max_mb <= 0:
            raise ValueError(f"{prefix}.builtin_max_mb={self.builtin_max_mb!r}: must be > 0")
        if self.split is not None:
            parts = str(self.split).replace(",", " ").split()
            try:
                shares = [float(x) for x in parts]
            except ValueError:
                shares = []
            if len(shares) not in (2, 3) or not all(0 <= x < float("inf") for x in shares) or min(shares[:2]) <= 0:
                raise ValueError(f"{prefix}.split={self.split!r}: must be 'train,valid[,test]' shares >= 0 with "
                                 "train and valid > 0, e.g. '98,2,0' (or unset)")


@dataclass
class OptimConfig:
    """AdamW with decoupled weight decay, global-norm gradient clipping and a warmup + decay LR schedule."""

    lr: float = 1e-3
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float = 0.0
    """Learning rate at the last step (cosine/linear decay end point)."""
    warmup_fraction: float = 0.01
    """Share of train.steps spent in linear warmup from 0 (ignored when warmup_steps is set)."""
    warmup_steps: Optional[int] = None
    """Warmup length in optimizer steps; None: round(warmup_fraction * train.steps)."""
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    """Shape of the decay from lr to min_lr over the steps after warmup."""
    on_steps_change: Literal["keep", "restretch"] = "keep"
    """A resumed run whose train.steps differs from the steps its checkpoint's schedule spans. keep: the schedule
    stays as it was (warmup and decay end at the same steps); a longer run holds the decay's final LR (min_lr)
    after the original end, a shorter one stops before the decay ends. restretch: the decay is recomputed to end at
    the new train.steps (the warmup already run stays). keep is the default because restretching moves the LR at
    the resume step back up the curve (recipes/tiny.yaml's 80 steps extended to 90 at step 70: 4.1e-4 -> 6.7e-4),
    a jump on weights that were annealing, and because the LR of the steps already run stays what it was. Restretch on
    purpose, early in a run, to get one full decay over the longer run."""
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    """Decoupled weight decay; biases and norm weights are exempt (Megatron's default grouping)."""
    grad_clip: float = 1.0
    """Clip the global gradient L2 norm to this value; 0 disables clipping."""

    def validate(self, prefix: str = "optim") -> None:
        _reject_non_finite(self, prefix)
        if self.lr <= 0:
            raise ValueError(f"{prefix}.lr={self.lr!r}: must be > 0")
        if not 0.0 <= self.min_lr <= self.lr:
            raise ValueError(f"{prefix}.min_lr={self.min_lr!r}: must be in [0, optim.lr={self.lr}]")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"{prefix}.warmup_fraction={self.warmup_fraction!r}: must be in [0, 1)")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"{prefix}.warmup_steps={self.warmup_steps!r}: must be None or >= 0")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"{prefix}.betas={self.betas!r}: each must be in [0, 1)")
        if self.eps <= 0:
            raise ValueError(f"{prefix}.eps={self.eps!r}: must be > 0")
        if self.weight_decay < 0:
            raise ValueError(f"{prefix}.weight_decay={self.weight_decay!r}: must be >= 0")
        if self.grad_clip < 0:
            raise ValueError(f"{prefix}.grad_clip={self.grad_clip!r}: must be >= 0 (0 disables clipping)")


@dataclass
class TrainConfig:
    """The training loop: batch geometry, precision, recompute, logging and evaluation cadence."""

    steps: int = 100
    """Optimizer steps of the whole run (the LR schedule spans them)."""
    micro_batch_size: int = 1
    """Sequences per forward pass on one data-parallel rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step, across data-parallel ranks and gradient accumulation; must be a multiple
    of micro_batch_size x data-parallel size (checked at start-up, when the world size is known)."""
    seed: int = 1234
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Parameter/compute dtype; bf16 and fp16 keep fp32 master weights in the optimizer. CPU runs use fp32."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recompute: selective = core attention only; full = whole layers (recompute_num_layers)."""
    recompute_num_layers: int = 1
    """With recompute=full: layers per recomputed chunk (Megatron's uniform method)."""
    loss_chunk_tokens: int = 0
    """0: Megatron's output layer and cross entropy (logits of the whole micro-batch). N > 0: the output layer and
    loss N tokens at a time, recomputing each chunk's logits in backward (ssa_megatron/megatron/output_loss.py): the
    same loss, and memory for one chunk's logits instead of several logits-sized buffers."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """auto: CUDA (NCCL) when a GPU is visible, else CPU (gloo)."""
    fused_ops: bool = True
    """On CUDA: Megatron's native (torch.compile) SwiGLU and cross-entropy fusions, a torch.compile'd RoPE and
    torch's fused AdamW kernel. Ignored on CPU, where torch.compile would need a C++ toolchain."""
    log_interval: int = 10
    """Console/TensorBoard logging every this many steps."""
    metrics_interval: int = 50
    """Attention-sparsity statistics (costly: O(T²)) every this many steps; 0 disables."""
    eval_interval: int = 0
    """Held-out perplexity (full and sparse inference) every this many steps and at the end; 0 disables."""
    eval_batches: int = 4
    """Micro-batches per evaluation and mode."""
    run_dir: str = "runs/default"
    """Checkpoints (checkpoints/), TensorBoard logs (tensorboard/) and the resolved recipe go here."""
    progress_bar: bool = True
    """tqdm progress bar on the console (rank 0)."""
    wandb: Optional[bool] = None
    """Weights & Biases logging. None (auto): when wandb is installed and WANDB_API_KEY or WANDB_MODE is set;
    true: required; false: off."""
    wandb_project: str = "ssa_megatron"
    exit_signal_handler: bool = True
    """On SIGTERM/SIGUSR1 (SLURM pre-timeout), finish the step, save a checkpoint and exit cleanly."""
    distributed_timeout_minutes: int = 30

    def uses_cuda(self) -> bool:
        """Whether ``device`` resolves to a GPU (``auto``: when one is visible)."""
        import torch  # here only: the schema itself does not need torch

        return self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available())

    def validate(self, prefix: str = "train") -> None:
        _reject_non_finite(self, prefix)
        for name in ("steps", "micro_batch_size", "global_batch_size", "log_interval", "eval_batches",
                     "recompute_num_layers", "distributed_timeout_minutes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{prefix}.{name}={getattr(self, name)!r}: must be >= 1")
        for name in ("metrics_interval", "eval_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"{prefix}.{name}={getattr(self, name)!r}: must be >= 0 (0 disables)")
        if self.loss_chunk_tokens < 0:
            raise ValueError(f"{prefix}.loss_chunk_tokens={self.loss_chunk_tokens!r}: must be >= 0 (0: Megatron's "
                             "output layer and loss; N: the loss N tokens at a time)")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"{prefix}.global_batch_size={self.global_batch_size} must be a multiple of "
                f"{prefix}.micro_batch_size={self.micro_batch_size}"
            )
        if not self.run_dir:
            raise ValueError(f"{prefix}.run_dir={self.run_dir!r}: must be a non-empty path")


@dataclass
class CheckpointConfig:
    """Megatron dist-checkpointing (torch_dist) checkpoints under ``<run_dir>/checkpoints``."""

    interval: int = 100
    """Save every this many steps (and at the end of the run); 0: only at the end."""
    keep_last: int = 3
    """Checkpoints kept on disk; older ones are deleted after a newer one is complete."""
    resume: bool = True
    """Resume from the run directory's latest checkpoint when one exists."""
    dir: Optional[str] = None
    """Checkpoint directory; None: ``<train.run_dir>/checkpoints``."""
    load: Optional[str] = None
    """A checkpoint to initialise from (model weights only) when the run has none of its own."""
    save_at_end: bool = True
    allow_changes: bool = False
    """Resume even though model.* or ssa.* training settings differ from the run directory's recipe.yaml (``ssa-train
    --allow-changes``). Without it such a resume stops with one line naming the keys; settings that change the
    parameter shapes are refused either way (ssa_megatron/training/run_dir.py)."""
    optimizer_format: Literal["fully_reshardable", "dp_reshardable"] = "fully_reshardable"
    """How Megatron's distributed optimizer state is written. fully_reshardable: per-parameter tensors (gathered
    on data-parallel rank 0 while saving), so a run can resume under another TP/PP/DP layout; dp_reshardable:
    every rank writes its own buffers (faster, less memory), resumable only with the same TP/PP. Resuming reads
    the format a checkpoint was written in."""

    def validate(self, prefix: str = "checkpoint") -> None:
        _reject_non_finite(self, prefix)
        if self.interval < 0:
            raise ValueError(f"{prefix}.interval={self.interval!r}: must be >= 0 (0: only at the end)")
        if self.keep_last < 1:
            raise ValueError(f"{prefix}.keep_last={self.keep_last!r}: must be >= 1")


@dataclass
class RecipeConfig:
    name: str = "unnamed"
    model: ModelConfig = field(default_factory=ModelConfig)
    ssa: SSAConfig = field(default_factory=SSAConfig)
    nsa: NSAConfig = field(default_factory=NSAConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate(f.name)
        if self.model.seq_length % (2 * self.parallel.context_parallel * self.ssa.block_size):
            raise ValueError(
                f"model.seq_length={self.model.seq_length}: must be a multiple of "
                f"2 * parallel.context_parallel * ssa.block_size = "
                f"{2 * self.parallel.context_parallel * self.ssa.block_size}"
            )
        if self.model.attention == "nsa":
            self._check_nsa()
        if self.model.num_query_groups % self.parallel.tensor_parallel:
            raise ValueError(
                f"parallel.tensor_parallel={self.parallel.tensor_parallel} must divide "
                f"model.num_query_groups={self.model.num_query_groups} (selection is per KV head and rank-local)"
            )


    def _check_nsa(self) -> None:
        """What fla-core's NSA kernels accept, each in one line naming the keys."""
        m = self.model
        group = m.num_attention_heads // m.num_query_groups
        if group < 16 or not _is_power_of_two(group):
            raise ValueError(f"model.attention=nsa: fla-core's NSA kernels need num_attention_heads / num_query_groups "
                             f"to be a power of two >= 16 (query heads per KV head, a kernel tile); got "
                             f"{m.num_attention_heads} / {m.num_query_groups} = {group}")
        if m.head_dim > 256:
            raise ValueError(f"model.attention=nsa: head_dim={m.head_dim} (hidden_size / num_attention_heads); "
                             "fla-core's NSA kernels take at most 256")
        if self.parallel.context_parallel > 1:
            raise ValueError(f"model.attention=nsa: parallel.context_parallel={self.parallel.context_parallel}; "
                             "the NSA baseline runs without context parallelism")


# --------------------------------------------------------------------------------------------------------------
# Generic loading: dict -> dataclass with type checks.

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks ``value`` against the annotation ``tp`` and returns it converted (ints to floats, lists to tuples)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ValueError(f"{key}={value!r}: must be one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if len(errors) == 1 else f"{key}={value!r}: expected {_type_name(tp)}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{key}={value!r}: expected a list of {len(args)} values")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{key}={value!r}: expected a mapping of {tp.__name__} fields")
        return from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}={value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)  # 1e5 reads as a float
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}={value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key}={value!r}: expected a number")
        if not math.isfinite(value):
            raise ValueError(f"{key}={value!r}: must be a finite number (not NaN or infinity)")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{key}={value!r}: expected a string")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Builds dataclass ``cls`` from ``data``, rejecting unknown keys and mistyped values."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ValueError(f"unknown key {full!r}; allowed: {', '.join(sorted(names))}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Plain-YAML-serialisable dict of a (nested) dataclass."""
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return list(v)
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_recipe_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ValueError(f"recipe {path}: 'base' chain loops back to itself")
    if not path.is_file():
        raise ValueError(f"recipe {str(path)!r} does not exist")
    data = load_yaml(path.read_text(), f"recipe {str(path)!r}") or {}
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path}: expected a mapping at the top level, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    return _deep_merge(_read_recipe_tree(path.parent / base, seen + (path,)), data)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Applies ``a.b=c`` overrides; values are parsed as YAML (``train.steps=20``, ``optim.betas=[0.9,0.99]``,
    ``optim.lr=1e-3``)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected the form section.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if not all(parts):
            raise ValueError(f"override {item!r}: empty key component")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = load_yaml(raw, f"override {item!r}")
    return data


def resolve_recipe(name_or_path: str) -> Path:
    """A recipe path, or a bare name looked up in the repository's ``recipes/`` folder
    (``tiny`` → recipes/tiny.yaml)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    bundled = Path(__file__).resolve().parent.parent / "recipes" / f"{name_or_path}.yaml"
    if bundled.exists():
        return bundled
    raise ValueError(f"recipe {name_or_path!r}: no such file, and no recipes/{name_or_path}.yaml")


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> RecipeConfig:
    """Loads, overrides and validates a recipe."""
    data = _read_recipe_tree(resolve_recipe(str(name_or_path)))
    data = apply_overrides(data, overrides or [])
    cfg = from_dict(RecipeConfig, data)
    cfg.validate()
    return cfg


def ssa_config_from_dict(data: dict) -> SSAConfig:
    cfg = from_dict(SSAConfig, data, "ssa")
    cfg.validate()
    return cfg
