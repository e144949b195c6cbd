"""Cached decoding for ``SSALlamaForCausalLM``: KV-cache layers that keep SSA's pooled block keys, and the attention
of one new token that reads them (docs/hf_eval.md, "Fast decoding").

**Cache layers.** ``SSALlamaConfig.layer_types`` names every layer ``ssa_attention``, and the two classes here
register themselves under that name with transformers (``CacheLayerMixin._layer_type``), so that
``DynamicCache(config=...)`` (what ``generate()`` and the forward make by default) holds :class:`SSADynamicLayer`
and ``StaticCache(config=..., max_cache_len=...)`` (``generate(cache_implementation="static")``) holds
:class:`SSAStaticLayer`. Both store keys and values as transformers' layers do, plus ``pooled [b, HKV, blocks, D]``:
the pooled key of every block (docs/ssa.md rule 1, pooled as ``reference.pool_block_keys`` does: a direct sum in
``scoring_dtype``, divided by the block size, rounded to the key dtype). A block's pooled key is written when the
``update`` that completes it runs, so a new token scores O(T / block_size) cached pooled keys instead of re-pooling
all T cached keys.

**One-token attention** (:func:`decode_attention`, a query at position t = length - 1 of its row):
- sparse: the candidates are the blocks before the token's own block (all complete, one document per row); each
  is scored on the cached pooled keys as ``reference.block_scores`` scores; the own block (partial, attended
  causally), the ``sink_blocks`` first and ``local_blocks`` preceding blocks are kept first; the best-scoring rest
  fills ``top_k``, ties to the later block (rule 3, as ``reference.select_blocks`` ranks). Only the selected
  blocks' keys and values are gathered and attended: O(top_k · block_size) reads per KV head. This is the
  reference's selection restated for one query in block units and written for speed (fused products, one
  ``topk``; on CUDA in bf16/fp16, the Triton kernels of ``decode_triton.py``, which also attend);
  tests/test_hf_decoding.py holds it to the full forward through the reference;
- full: causal attention over the first ``length`` cached keys. On a static cache this is, on CUDA in bf16/fp16,
  the split-KV Triton kernels of ``decode_triton.py``; elsewhere FlexAttention with a block mask built from the
  cache length, which ``torch.compile`` turns into a split-KV decoding kernel.

**The new token's RoPE and cache update** on a static cache, on CUDA in bf16/fp16: one Triton kernel
(:func:`append_token`), or in sparse mode none of its own, as the selection's first kernel does the same work
(:func:`append_and_attend`).

Everything in the static path is a fixed-shape tensor operation with no host synchronisation, so a decode step
compiles with ``fullgraph=True`` and can be captured in a CUDA graph (``torch.compile(mode="reduce-overhead")``,
which ``generate()`` applies on CUDA with a static cache). Compile it with ``dynamic=False``: see
:func:`full_decode`. Prefill and every other call go through the model's
general path (``ssa_attention``), which reads the valid keys of the cache.

This file is copied into every gated export beside ``modeling.py`` (``ssa_megatron.hf.export.REMOTE_CODE``); like
it, it imports the package only when it is ``ssa_megatron.hf.decoding``, else the copied ``reference.py``.
"""

from __future__ import annotations

import importlib
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from transformers.cache_utils import DynamicLayer, StaticLayer

from .decode_triton import (
    append_by_kernels,
    full_attend_by_kernels,
    select_by_kernels,
    sparse_attend_by_kernels,
    use_kernels,
)

IN_PACKAGE = __name__.startswith("ssa_megatron.")
if IN_PACKAGE:  # importlib, not an import statement, which transformers' remote-code check would demand
    _reference = importlib.import_module("ssa_megatron.ssa.reference")
    apply_gate, scoring_dtype = _reference.apply_gate, _reference.scoring_dtype
else:  # an export folder: ssa_megatron/ssa/reference.py is copied beside this file
    from .reference import apply_gate, scoring_dtype

LAYER_TYPE = "ssa_attention"
KV_TILE = 128
"""Key tile of the full-mode block mask; static buffers are a multiple of it (and of the block size)."""


def pool_blocks(keys: Tensor, block_size: int) -> Tensor:
    """``[b, HKV, n·block_size, D] -> [b, HKV, n, D]``: each block's pooled key (``reference.pool_block_keys``'s
    rule: direct sum in ``scoring_dtype``, divided by the block size, rounded to the key dtype)."""
    blocks = keys.unflatten(2, (-1, block_size))
    return (blocks.sum(3, dtype=scoring_dtype(keys.dtype)) / block_size).to(keys.dtype)


def _check_block_size(layer, block_size: int | None) -> int:
    if block_size is None:
        raise ValueError(f"{type(layer).__name__}.update: ssa_block_size must be given (the attention passes it)")
    if layer.block_size is not None and block_size != layer.block_size:
        raise ValueError(f"{type(layer).__name__}: ssa_block_size={block_size} differs from the {layer.block_size} "
                         "this cache was filled with; start a new cache after set_attention_mode(block_size=...)")
    return block_size


class SSADynamicLayer(DynamicLayer):
    """A growing KV-cache layer (transformers' ``DynamicLayer``) that also keeps the pooled keys of its complete
    blocks, ``pooled [b, HKV, length // block_size, D]``."""

    _layer_type = LAYER_TYPE

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.pooled: Tensor | None = None
        self.block_size: int | None = None

    def update(self, key_states: Tensor, value_states: Tensor, *args, ssa_block_size: int | None = None, **kwargs
               ) -> tuple[Tensor, Tensor]:
        block_size = _check_block_size(self, ssa_block_size)
        keys, values = super().update(key_states, value_states)
        if self.pooled is None:
            self.block_size = block_size
            self.pooled = keys.new_zeros(*keys.shape[:2], 0, keys.shape[3])
        have, complete = self.pooled.shape[2], keys.shape[2] // block_size
        if complete > have:  # the blocks this update completed
            new = pool_blocks(keys[:, :, have * block_size:complete * block_size], block_size)
            self.pooled = torch.cat([self.pooled, new], dim=2)
        return keys, values

    def length(self) -> int:
        return self.keys.shape[2]

    def reset(self) -> None:
        super().reset()
        self.pooled, self.block_size = None, None

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.pooled is not None:
            self.pooled = self.pooled[:, :, :self.keys.shape[2] // self.block_size]

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.pooled is not None:
            self.pooled = self.pooled.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: Tensor) -> None:
        super().batch_select_indices(indices)
        if self.pooled is not None:
            self.pooled = self.pooled[indices]

    def reorder_cache(self, beam_idx: Tensor) -> None:
        super().reorder_cache(beam_idx)
        if self.pooled is not None:
            self.pooled = self.pooled.index_select(0, beam_idx.to(self.pooled.device))


class SSAStaticLayer(StaticLayer):
    """A preallocated KV-cache layer (transformers' ``StaticLayer``, written in place, static addresses for CUDA
    graphs) with ``pooled [b, HKV, max_cache_len // block_size, D]``. ``max_cache_len`` is rounded up to a multiple
    of the block size and of :data:`KV_TILE` when the buffers are allocated.

    Each ``update`` re-pools every block its new tokens touch, from the cache; a block's entry is final once the
    update that completes it has run, and entries of incomplete blocks are never scored (a token scores only the
    blocks before its own). This needs no branch on the length, so a decode step stays one fixed graph. The
    one-token kernel of :func:`append_token` writes a block's entry only when its token completes the block.

    ``tiles [1, 1, 1, max_cache_len // KV_TILE]`` (int32, 0, 1, ...) are the key tiles of full mode's block mask,
    made once here: built inside a compiled step, they cost a kernel per layer and step. ``tickets`` (one int32
    zero) is the counter with which the kernel that advances the length finds its last program: the one-token update
    kernel (:func:`append_token`), or a sparse step's attention kernel (:func:`append_and_attend`).
    """

    _layer_type = LAYER_TYPE

    def __init__(self, max_cache_len: int, **kwargs):
        super().__init__(max_cache_len=max_cache_len, **kwargs)
        self.pooled: Tensor | None = None
        self.tiles: Tensor | None = None
        self.tickets: Tensor | None = None
        self.block_size: int | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        tile = math.lcm(KV_TILE, self.block_size)
        self.max_cache_len = -(-self.max_cache_len // tile) * tile
        super().lazy_initialization(key_states, value_states)
        b, hkv, _, d = self.keys.shape
        self.pooled = self.keys.new_zeros(b, hkv, self.max_cache_len // self.block_size, d)
        tiles = torch.arange(self.max_cache_len // KV_TILE, dtype=torch.int32, device=self.keys.device)
        self.tiles = tiles.view(1, 1, 1, -1).clone()  # its own storage, for mark_static_address
        self.tickets = torch.zeros(1, dtype=torch.int32, device=self.keys.device)
        if not torch.compiler.is_compiling():  # as StaticLayer does for its buffers: cudagraphs need fixed addresses
            for buffer in (self.pooled, self.tiles, self.tickets):
                torch._dynamo.mark_static_address(buffer)

    def update(self, key_states: Tensor, value_states: Tensor, *args, ssa_block_size: int | None = None, **kwargs
               ) -> tuple[Tensor, Tensor]:
        self.block_size = _check_block_size(self, ssa_block_size)
        keys, values = super().update(key_states, value_states)
        s, bs = key_states.shape[2], self.block_size
        start = self.cumulative_length - s  # position of the first new token (a 0-d tensor: no host sync)
        touched = (s - 1 + bs - 1) // bs + 1  # most blocks s consecutive tokens can touch
        blocks = (start // bs + torch.arange(touched, device=keys.device)).clamp(max=self.pooled.shape[2] - 1)
        positions = (blocks[:, None] * bs + torch.arange(bs, device=keys.device)).flatten()
        self.pooled.index_copy_(2, blocks, pool_blocks(keys.index_select(2, positions), bs))
        return keys, values

    def length(self) -> Tensor:
        return self.cumulative_length

    def reset(self) -> None:
        super().reset()
        if self.pooled is not None:
            self.pooled.zero_()

    def reorder_cache(self, beam_idx: Tensor) -> None:
        super().reorder_cache(beam_idx)
        if self.pooled is not None:
            self.pooled.copy_(self.pooled.index_select(0, beam_idx.to(self.pooled.device)))


SSA_LAYERS = (SSADynamicLayer, SSAStaticLayer)


def top_k_later_first(scores: Tensor, selectable: Tensor, top_k: int) -> Tensor:
    """Exact top-k along the last dim among ``selectable`` entries, ties to the later index (``select_blocks``'s
    ranking). Returns ``[..., top_k]`` indices (in no particular order), -1 where fewer are selectable.

    Float32 scores (the scoring precision of every input dtype but float64) are ranked by one ``topk`` over int64
    keys ``(order-preserving int32 of the score) << 32 | index``: unique keys, so ties go to the later index with no
    sort. Float64 scores take a stable sort over the reversed indices. Selectable entries score above -inf (as
    ``block_scores`` leaves the candidates)."""
    n = scores.shape[-1]
    if scores.dtype == torch.float32:
        bits = (scores + 0.0).view(torch.int32)  # + 0.0: -0.0 becomes +0.0, which it equals
        ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)  # monotone in the float
        keys = (ordered << 32) + torch.arange(n, device=scores.device)
        keys = keys.masked_fill(~selectable, torch.iinfo(torch.int64).min)
        if n < top_k:
            keys = F.pad(keys, (0, top_k - n), value=torch.iinfo(torch.int64).min)
        best = _largest(keys, top_k)
        return torch.where(best == torch.iinfo(torch.int64).min, -1, best & 0xFFFFFFFF)
    scores = scores.masked_fill(~selectable, -math.inf)
    order = torch.sort(torch.flip(scores, dims=[-1]), dim=-1, descending=True, stable=True).indices[..., :top_k]
    chosen = n - 1 - order  # a stable sort over reversed indices keeps the later one first on ties
    chosen = torch.where(torch.gather(torch.flip(selectable, dims=[-1]), -1, order), chosen, -1)
    return F.pad(chosen, (0, top_k - chosen.shape[-1]), value=-1) if chosen.shape[-1] < top_k else chosen


SORT_CHUNK = 128
"""Keys per sort of the compiled top-k. Inductor writes a sort of at most 512 keys as one Triton kernel, but on an
H200 a batch-32 decode step with 512-key sorts did not compile within 70 s, twice; with 128-key sorts it compiles
in 53 s and runs in 2.329 ms against 2.520 with ``topk`` (docs/benchmarks.md, runs AF and AG)."""


def _largest(keys: Tensor, k: int) -> Tensor:
    """The ``k`` largest of distinct ``keys`` along the last dim (at least ``k`` of them), in no particular order.

    Eager: ``topk``. Compiled: a tournament of sorts of at most :data:`SORT_CHUNK` keys, each keeping its chunk's
    ``k`` largest (a superset of the overall ``k`` largest), until one sort is left. Inductor writes each such sort
    as one Triton kernel fused with the code that computes the keys; ``topk`` stays a library call whose radix
    select takes 15-18 us on an H200 whether it ranks 2 rows or 64 (docs/benchmarks.md, session 7): at batch 1 the
    largest kernel of a sparse decode step after the weight GEMMs."""
    if not torch.compiler.is_compiling() or k >= SORT_CHUNK // 2:  # a round would keep half its keys or more
        return torch.topk(keys, k, dim=-1, sorted=False).values  # unsorted: no sort kernel
    while keys.shape[-1] > SORT_CHUNK:
        keys = F.pad(keys, (0, -keys.shape[-1] % SORT_CHUNK), value=torch.iinfo(torch.int64).min)
        chunks = keys.unflatten(-1, (-1, SORT_CHUNK))
        keys = torch.sort(chunks, dim=-1, descending=True).values[..., :k].flatten(-2)
    return torch.sort(keys, dim=-1, descending=True).values[..., :k]


def round_to(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Float32 ``x`` rounded to the nearest ``dtype`` value (bfloat16 or float16, ties to even), returned in float32:
    ``x.to(dtype).float()``, computed with integer operations on the bits.

    Why: compiled, Inductor fuses the op that produced a bf16 tensor (RoPE for the query) into the one that reads
    it and computes both in float32, dropping the rounding to bf16 between them (on CPU, torch 2.11, also with
    ``emulate_precision_casts``). A query cast by ``.to`` would then score in float32 when compiled and in bf16
    eagerly. Integer operations are not elided. NaN inputs may come out as infinities."""
    drop = 16 if dtype == torch.bfloat16 else 13  # the mantissa bits float32 has beyond dtype's
    bits = x.view(torch.int32)
    bits = (bits + ((1 << (drop - 1)) - 1) + ((bits >> drop) & 1)) & -(1 << drop)
    out = bits.view(torch.float32)
    if dtype == torch.float16:  # float16's narrower exponent: subnormals below 2^-14, infinity above 65504
        out = torch.where(x.abs() < 2.0 ** -14, torch.round(x * 2.0 ** 24) * 2.0 ** -24, out)
        out = torch.where(out.abs() > 65504, out.sign() * math.inf, out)
    return out


def _operand(x: Tensor) -> Tensor:
    """``x`` in ``scoring_dtype``, holding exactly ``x.dtype`` values also when compiled (:func:`round_to`): the
    precision contract's input-dtype operands (docs/ssa.md "Precision of the selection")."""
    if x.dtype in (torch.bfloat16, torch.float16):
        return round_to(x.to(torch.float32), x.dtype)
    return x.to(scoring_dtype(x.dtype))


def _products(a: Tensor, b: Tensor, kernel_operands: bool = False) -> Tensor:
    """``a @ b.T`` over the last dim in float32: ``a [..., M, D]`` float32, ``b [..., N, D]``.

    - CUDA, ``kernel_operands``, ``b`` bf16/fp16: ``a`` rounded to ``b``'s dtype, then one tensor-core GEMM with
      float32 output (``bmm(out_dtype=float32)``): the Triton kernels' ``tl.dot`` contract, which the training runs
      on a GPU. For a query from :func:`_operand` the rounding is exact (exact products, float32 sums, "Precision of
      the selection"); for attention probabilities it is the sparse kernel's ``p.to(v.dtype)``. The GEMM reads
      ``b`` once, where the products below read it once per query head of the group: at batch 32 that made the
      block scoring the largest kernel of a sparse step (docs/benchmarks.md, run AB).
    - Otherwise, compiled: products and a sum, which Inductor fuses with the cast (and with a gather that produced
      ``b``) into one pass over ``b``; a matmul would first write ``b`` out in float32. ``a`` is not rounded: the
      reference's (CPU) contract.
    - Otherwise, eager: the matmul, far cheaper than the products there."""
    if kernel_operands and b.is_cuda and b.dtype in (torch.bfloat16, torch.float16):
        lead = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        a3 = a.to(b.dtype).expand(*lead, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
        b3 = b.expand(*lead, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
        return torch.bmm(a3, b3.transpose(-1, -2), out_dtype=torch.float32).view(*lead, a.shape[-2], b.shape[-2])
    if torch.compiler.is_compiling():
        return (a[..., :, None, :] * b[..., None, :, :].to(a.dtype)).sum(-1)
    return a @ b.to(a.dtype).transpose(-1, -2)


def select_decode_blocks(q: Tensor, pooled: Tensor, length: Tensor | int, config, scale: float) -> Tensor:
    """The blocks one new token attends to in sparse mode, ``[b, HKV, top_k]`` block numbers (-1 padded).

    ``q [b, HQ, 1, D]`` at position ``length - 1``; ``pooled [b, HKV, n, D]`` with ``n`` above the token's own block
    number; entries from the own block on are ignored. The scores are ``reference.block_scores``'s (docs/ssa.md
    rule 2 and "Precision of the selection": input-dtype operands, float32 products and sums): ``group_softmax``
    sums each group head's softmax of ``scale · q·k̄`` over the candidates, ``dot`` averages ``q·k̄``."""
    if use_kernels(q, pooled):  # CUDA, bf16/fp16: the same selection as three Triton kernels
        return select_by_kernels(q, pooled, torch.as_tensor(length, device=q.device), config, scale)
    b, hkv, n, d = pooled.shape
    bs = config.ssa_block_size
    own = (length - 1) // bs
    j = torch.arange(n, device=pooled.device)
    candidates = j < own  # complete blocks strictly before the own block
    exact = q.dtype == pooled.dtype  # the query then holds the pooled keys' dtype exactly
    logits = _products(_operand(q.reshape(b, hkv, -1, d)), pooled, kernel_operands=exact)  # [b, HKV, G, n]
    if config.ssa_score == "group_softmax":
        probs = torch.softmax((scale * logits).masked_fill(~candidates, -math.inf), dim=-1)
        scores = torch.where(candidates, probs, 0.0).sum(dim=2)
    else:  # "dot"
        scores = logits.mean(dim=2)
    scores = scores.masked_fill(~candidates, -math.inf)  # [b, HKV, n]
    forced = candidates & ((j < config.ssa_sink_blocks) | (j >= own - config.ssa_local_blocks))
    scores = torch.where(forced | (j == own), math.inf, scores)
    selectable = (candidates | (j == own)).expand_as(scores)
    return top_k_later_first(scores, selectable, config.ssa_top_k)


def sparse_decode(q: Tensor, keys: Tensor, values: Tensor, pooled: Tensor, length: Tensor | int, config,
                  scale: float, gate: Tensor | None = None) -> Tensor:
    """Sparse attention of one new token per row over the cache, gated by the logits ``gate [b, 1, HQ]`` if given.
    ``q [b, HQ, 1, D]``, ``keys/values [b, HKV, L, D]`` (the first ``length`` valid). Returns ``[b, HQ, 1, D]``."""
    if use_kernels(q, keys):  # CUDA, bf16/fp16: select, gather, attend and gate in three Triton kernels
        return sparse_attend_by_kernels(q, keys, values, pooled, torch.as_tensor(length, device=q.device), config,
                                        scale, gate)
    b, hq, _, d = q.shape
    hkv, bs = keys.shape[1], config.ssa_block_size
    idx = select_decode_blocks(q, pooled, length, config, scale)  # [b, HKV, K]
    pos = idx[..., None].long() * bs + torch.arange(bs, device=q.device)  # [b, HKV, K, bs]
    valid = ((idx[..., None] >= 0) & (pos < length)).flatten(2)  # causal inside the own block
    pos = pos.flatten(2).clamp(0, keys.shape[2] - 1)[..., None].expand(-1, -1, -1, d)
    qg = _operand(q.reshape(b, hkv, hq // hkv, d))  # query head h reads KV head h // G
    exact = q.dtype == keys.dtype
    logits = scale * _products(qg, torch.gather(keys, 2, pos), kernel_operands=exact)
    logits = logits.masked_fill(~valid[:, :, None], -math.inf)
    probs = torch.softmax(logits, dim=-1)  # [b, HKV, G, K·bs]
    out = _products(probs, torch.gather(values, 2, pos).transpose(-1, -2), kernel_operands=exact)  # [b, HKV, G, D]
    return _gated(out.reshape(b, hq, 1, d).to(q.dtype), gate)


def _gated(out: Tensor, gate: Tensor | None) -> Tensor:
    """``out [b, HQ, 1, D]`` times ``sigmoid(gate [b, 1, HQ])`` (``reference.apply_gate``)."""
    return out if gate is None else apply_gate(out.transpose(1, 2), gate).transpose(1, 2)


def full_decode(q: Tensor, keys: Tensor, values: Tensor, length: Tensor, tiles: Tensor, scale: float,
                gate: Tensor | None = None) -> Tensor:
    """Causal attention of one new token per row over the first ``length`` keys of a static buffer, through
    FlexAttention: the block mask lists the :data:`KV_TILE`-key ``tiles`` (``SSAStaticLayer.tiles``) up to
    ``length`` (fixed shapes, values from the 0-d ``length`` tensor), so the compiled kernel reads only those.
    ``q [b, HQ, 1, D]`` -> ``[b, HQ, 1, D]``, gated by the logits ``gate [b, 1, HQ]`` where given.

    No query-direction blocks (``compute_q_blocks=False``): only a backward reads them, and computing them costs a
    sort kernel per layer and step. Inductor lowers this to its split-KV decoding kernel only when the batch and
    head sizes are static; compile the step with ``dynamic=False`` (a recompile for a second batch size otherwise
    makes the batch symbolic, and the main FlexAttention kernel then walks all keys of a row in one program).

    On CUDA in bf16/fp16 the split-KV Triton kernels of ``decode_triton.py`` attend instead: FlexAttention's
    decoding kernel and the 6 kernels Inductor writes around it took about 20 us per layer at batch 1 and 32k on an
    H200, for 17 MB of keys and values (docs/benchmarks.md, session 9)."""
    if use_kernels(q, keys):
        return full_attend_by_kernels(q, keys, values, torch.as_tensor(length, device=q.device), scale, gate)
    kv_num_blocks = ((length + KV_TILE - 1) // KV_TILE).to(torch.int32).view(1, 1, 1)

    def causal(b, h, q_idx, kv_idx):
        return kv_idx < length

    mask = BlockMask.from_kv_blocks(kv_num_blocks, tiles, BLOCK_SIZE=KV_TILE, mask_mod=causal,
                                    seq_lengths=(1, keys.shape[2]), compute_q_blocks=False)
    q = q.contiguous()  # a view of the projection's [b, 1, HQ·D] output; Inductor's CPU template wants it dense
    if torch.compiler.is_compiling():
        return _gated(flex_attention(q, keys, values, block_mask=mask, scale=scale, enable_gqa=True), gate)
    with warnings.catch_warnings():  # eager (tests, an uncompiled static cache): the unfused path is intended
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return _gated(flex_attention(q, keys, values, block_mask=mask, scale=scale, enable_gqa=True), gate)


def decode_attention(q: Tensor, layer, config, scale: float, gate: Tensor | None = None) -> Tensor | None:
    """The attention of one new token per row, ``q [b, HQ, 1, D]`` -> ``[b, HQ, 1, D]``, gated by the logits ``gate
    [b, 1, HQ]`` where given, from an SSA cache layer that already holds the token's key and value (the decode kernels
    gate as they write their output); None where the general path must run instead: a cache layer
    of another kind, full mode on a dynamic cache (the backend's full attention is already one pass over the keys),
    or a non-default selection rule (``ssa_selection`` / ``ssa_normaliser``, when the configuration has them)."""
    if not isinstance(layer, SSA_LAYERS) or q.shape[2] != 1 or not _default_selection(config):
        return None
    length = layer.length()
    if config.ssa_mode == "full":
        if not isinstance(layer, SSAStaticLayer):
            return None
        return full_decode(q, layer.keys, layer.values, length, layer.tiles, scale, gate)
    pooled = layer.pooled
    if isinstance(layer, SSADynamicLayer):  # room for the own block's (unused) entry
        pooled = F.pad(pooled, (0, 0, 0, 1))
    return sparse_decode(q, layer.keys, layer.values, pooled, length, config, scale, gate)


def _default_selection(config) -> bool:
    """Whether the configuration selects by the default rule, the one the decode paths implement (``ssa_selection``
    and ``ssa_normaliser``, where the configuration has them)."""
    return (getattr(config, "ssa_selection", "exact"), getattr(config, "ssa_normaliser", "earlier_blocks")) == (
        "exact", "earlier_blocks")


def _appendable(cache, layer_idx: int, q: Tensor, cos: Tensor, block_size: int):
    """The cache layer that the append kernel can take one new token per row into (an :class:`SSAStaticLayer` that
    a prefill has initialised, holding CUDA bf16/fp16 buffers, in a cache that does not offload), else None."""
    if q.shape[1] != 1 or getattr(cache, "offloading", False) or layer_idx >= len(cache.layers):
        return None
    layer = cache.layers[layer_idx]
    if (not isinstance(layer, SSAStaticLayer) or not layer.is_initialized or cos.shape[-1] != layer.keys.shape[-1]
            or not use_kernels(q, layer.keys)):
        return None
    layer.block_size = _check_block_size(layer, block_size)
    return layer


def append_and_attend(cache, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, config,
                      scale: float, gate: Tensor | None = None) -> Tensor | None:
    """A sparse-mode decode step's RoPE, cache update and attention in three kernels
    (``decode_triton.sparse_attend_by_kernels`` with ``append``): what :func:`append_token` then
    :func:`decode_attention` compute in four. Arguments as theirs; returns the attention ``[b, HQ, 1, D]``, or None
    where those two must run instead (full mode, another selection rule, or a cache :func:`append_token` does not
    take)."""
    if config.ssa_mode != "sparse" or not _default_selection(config):
        return None
    layer = _appendable(cache, layer_idx, q, cos, config.ssa_block_size)
    if layer is None:
        return None
    return sparse_attend_by_kernels(q, layer.keys, layer.values, layer.pooled, layer.cumulative_length, config,
                                    scale, gate, append=(k, v, cos, sin, layer.tickets))


def append_token(cache, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor,
                 block_size: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """Llama's RoPE and ``cache.update`` of one new token per row as one kernel
    (``decode_triton.append_by_kernels``), where Inductor would launch five per layer: on an :class:`SSAStaticLayer`
    that a prefill has initialised, holding CUDA bf16/fp16 buffers, in a cache that does not offload. ``q``, ``k``,
    ``v`` are the unrotated projections ``[b, 1, H·D]``, ``cos``/``sin [b, 1, D]`` the rotary embedding. Returns
    what ``apply_rotary_pos_emb`` and ``cache.update`` return (the rotated query ``[b, HQ, 1, D]``, the layer's keys
    and values), or None where those must run instead."""
    layer = _appendable(cache, layer_idx, q, cos, block_size)
    if layer is None:
        return None
    q = append_by_kernels(q, k, v, cos, sin, layer.keys, layer.values, layer.pooled, layer.cumulative_length,
                          layer.tickets, block_size)
    return q, layer.keys, layer.values


def valid_keys(layer, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """The cached keys and values that hold tokens: a static layer returns its whole buffer, of which the first
    ``cumulative_length`` are filled (one host synchronisation; the general path only)."""
    if isinstance(layer, StaticLayer):
        n = int(layer.cumulative_length)
        return keys[:, :, :n], values[:, :, :n]
    return keys, values
