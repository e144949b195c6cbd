"""A decode step's kernels (one new token per row; CUDA, bf16/fp16 models): its attention in both modes, the static
cache's one-token update, and at batch 1 the decoder layers' projections with their norms and residual additions.
Sparse mode: the block selection and the attention over the selected blocks in three kernels
(:func:`sparse_attend_by_kernels`, what :func:`decoding.sparse_decode` computes, with the scores never leaving
float32 and the top-k done in the same passes; on a static cache the first also appends the new token and the last
advances the length, what :func:`decoding.append_and_attend` runs), or the selection alone
(:func:`select_by_kernels`, what :func:`decoding.select_decode_blocks` computes, also three kernels). Full mode on
a static cache: split-KV attention over the first ``length`` keys (:func:`full_attend_by_kernels`, what
:func:`decoding.full_decode` computes with FlexAttention elsewhere).

Why kernels: compiled by Inductor, the same selection is a scoring GEMM, a memset cuBLAS adds before it, a
softmax-statistics reduction, a group-sum reduction and three sort rounds per layer, 7-8 launches whose tuned
configurations also vary from one compile to the next. On an H200 at batch 32 and 32k context they took 45-70 us
per layer, the largest part of a sparse decode step after the weight GEMMs (docs/benchmarks.md, session 8).

The selection's kernels, for ``R = b * HKV`` rows (a batch entry's KV head and its ``G`` query heads) and ``n``
pooled blocks in ``S = ceil(n / BLOCK_N)`` chunks:

1. ``_logits_kernel`` (grid R x S): ``logits [R, G, n] = q · k̄`` in float32 from the model-dtype query and pooled
   keys (``tl.dot``: exact products, float32 sums, the training kernels' contract and docs/ssa.md "Precision of the
   selection"), and for ``group_softmax`` each chunk's softmax statistics (max and sum of ``exp``) per query head
   over the chunk's candidates;
2. ``_chunk_top_k_kernel`` (grid R x S): the chunk's scores from the combined statistics (``group_softmax``: the
   sum over the group of each head's softmax; ``dot``: the mean of ``q · k̄``), the forced blocks (own, sink,
   local) at +inf, and the chunk's ``top_k`` largest (score, block) keys;
3. the ``top_k`` largest of the chunks' survivors: ``_top_k_kernel`` (grid R) stores them for
   :func:`select_by_kernels`; in a decode step the attention kernel takes them itself, in registers.

Both top-k steps are one jit helper (``_largest``, ``tl.topk``'s bitonic partial sort).

Ranking keys are those of ``decoding.top_k_later_first``: ``(order-preserving int32 of the score) << 32 | block``,
unique, so ties go to the later block with no sort; -1 pads where fewer blocks are selectable.

The attention (``_sparse_attention_kernel``, grid R) takes the ``top_k`` largest of its row's chunk survivors,
gathers the ``top_k · block_size`` selected keys and values of the row at once and attends its ``G`` query heads to
them, causal inside the own block, with the sparse training kernel's precision: float32 scores and softmax, the
probabilities rounded to the values' dtype for ``tl.dot``. In torch operations this was a gather, two GEMMs and a
softmax, 4 launches per layer; a sparse decode step's RoPE, cache update, selection and attention are now 3 launches
per layer in all.

Full mode (``_full_split_kernel``, grid R x ranges; ``_full_combine_kernel``, grid R x G): each program attends a
row's group to one range of keys with an online softmax and keeps its float32 partial (max, sum, weighted values);
the combine weighs a row's partials per query head. Compiled FlexAttention took 22 us per layer at batch 1 and 267 at
batch 32 (1B shape, 32k, H200), in its decoding kernel and 6 kernels Inductor writes around it; these take 12.8 and
128 (docs/benchmarks.md, session 9). Both modes' attention kernels multiply their output by the gate's sigmoid.

Around the attention: :func:`append_by_kernels` (``_append_kernel``, grid b x HKV) is RoPE and a static cache's
update for the new token, which Inductor wrote as five kernels per layer (full mode; sparse mode's first selection
kernel does the same work, ``_append_token``); :func:`linear_by_kernel` (``_gemv_kernel``) is the one-row product
of a decoder layer's weight, with the RMSNorm before it or the residual addition after it, and of the LM head's,
where cuBLAS's kernels read the 1B shape's small weights at 1.5-2.5 TB/s and Inductor launched the norms as kernels
of their own (docs/benchmarks.md, sessions 10 to 12).

Inside a compiled step, each entry point (:func:`linear_by_kernel`, :func:`sparse_attend_by_kernels`,
:func:`append_by_kernels`, :func:`full_attend_by_kernels`) is one custom op (:func:`_custom_op`), whose kernels
Inductor neither traces nor lowers; uncompiled code calls the same functions directly.

This file is copied into every gated export beside ``decoding.py`` (``ssa_megatron.hf.export.REMOTE_CODE``). It
imports triton inside ``try`` (transformers' remote-code check skips those imports), so an export loads where
triton is missing, and :func:`use_kernels` then says no.
"""

from __future__ import annotations

import collections
import re

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch build: decoding.py selects with torch operations
    triton = None

BLOCK_N = 128
"""Pooled blocks per program of kernels 1 and 2."""
TOP_K_WARPS = 1
"""Warps of the two top-k kernels (kernel 2, and kernel 3 of :func:`select_by_kernels`) where their grid has
``FEW_PROGRAMS`` programs or more (batch 32 on the 1B shape: 1,088): their bitonic top-k over 128-512 keys is a chain
of compare-and-swap steps, which one warp does in registers and shuffles; with more warps, the steps across warps go
through shared memory with a barrier each."""
TOP_K_WARPS_FEW = 4
"""Their warps where the grid has fewer programs than ``FEW_PROGRAMS`` (batch 1: 34), which leave most SMs idle and
are each faster with more warps: the selection took 7.9 us with 4 warps and 10.1 with 1 at batch 1, and 17.9 against
18.6 at batch 32, where the sparse step's three kernels took 21.3 against 20.2 (H200, docs/benchmarks.md, session
11)."""
FEW_PROGRAMS = 132
"""An H100's or H200's SM count: a grid below it runs in one wave with SMs to spare."""
SCORE_WARPS = 2
"""Warps of kernel 1 (the scoring) where its grid has ``FEW_PROGRAMS`` programs or more (batch 32: 1,088): each
program's product is one 16 x 128 x 64 ``tl.dot``, and more programs fit an SM with fewer warps. A sparse step's
three kernels took 18.48 us at batch 32 against 19.69 with 4 warps and 21.00 with 8 (H200, docs/benchmarks.md,
session 17, run BU)."""
SCORE_WARPS_FEW = 4
"""Kernel 1's warps where its grid has fewer programs (batch 1: 34): 10.70 us for the three kernels against 11.10
with 2 warps (the same run)."""
SPARSE_WARPS = 8
"""Warps of the sparse attention kernel, as many as before it took the selection's final top-k: its gather of
``top_k · block_size`` keys and values (256 x 64 on the 1B shape) and its two ``tl.dot`` want them; the top-k's
steps across warps go through shared memory. With 4 warps the three kernels took 11.10 us against 11.22 at batch 1
(within the spread between runs) and 20.46 against 20.20 at batch 32 (H200, docs/benchmarks.md, session 11,
run AY)."""


def use_kernels(q: Tensor, cached: Tensor) -> bool:
    """Whether these kernels decode for ``q`` and the cached ``cached`` (pooled keys, keys): CUDA tensors in
    bfloat16 or float16 (the dtypes whose products ``tl.dot`` computes exactly) for both, and triton installed."""
    return (triton is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
            and cached.dtype == q.dtype)


def _stride0(x: Tensor) -> int:
    """``x``'s stride along its first dimension, 0 where that dimension is broadcast (size 1)."""
    return x.stride(0) if x.shape[0] > 1 else 0


def _padded(n: int) -> int:
    """``n`` rounded up to a power of two, at least 16: a ``tl.dot`` operand's dimension."""
    return max(16, triton.next_power_of_2(n))


def _top_k_length(n: int) -> int:
    """``n`` rounded up to a power of two, at least 2: a length ``tl.topk`` takes (with k = 1 its sort reduces the
    keys to a scalar and fails)."""
    return max(2, triton.next_power_of_2(n))


def _rows(q: Tensor, *cached: Tensor) -> tuple[Tensor, ...]:
    """``q [b, HQ, 1, D]`` as ``[b, HQ, D]``, and each of ``cached``, with a unit stride in the last dimension, which
    the kernels' pointer arithmetic assumes."""
    return tuple(x if x.stride(-1) == 1 else x.contiguous() for x in (q[:, :, 0], *cached))


def _top_k_warps(programs: int) -> int:
    """Warps of a top-k kernel launched as ``programs`` programs (``TOP_K_WARPS_FEW``'s rule)."""
    return TOP_K_WARPS_FEW if programs < FEW_PROGRAMS else TOP_K_WARPS


def _score_warps(programs: int) -> int:
    """Warps of kernel 1 launched as ``programs`` scoring programs (``SCORE_WARPS_FEW``'s rule)."""
    return SCORE_WARPS_FEW if programs < FEW_PROGRAMS else SCORE_WARPS


_OP_NAMESPACE = "ssa_decode_" + re.sub(r"\W", "_", __name__)
"""The namespace of this file's custom ops: one per copy of the file (the package's, and each export's under
``transformers_modules``), so that both load in one process."""


def _custom_op(name: str, impl, mutates_args: tuple[str, ...], fake):
    """``impl`` registered as the custom op ``name``, which a compiled decode step calls in place of tracing its
    kernels: Inductor then neither lowers nor re-generates them, which took most of a step's compilation (at batch
    32 its first steps took 19 and 12 s instead of 39 and 66 s in full and sparse mode, with the same step time;
    docs/benchmarks.md, session 14, run BL). A second load of this file under the same module name registers them
    again, in place of the first (torch allows it). None where torch has no ``custom_op`` or registering fails: a
    compiled step then traces the kernels."""
    if triton is None or not hasattr(torch.library, "custom_op"):
        return None
    try:
        op = torch.library.custom_op(f"{_OP_NAMESPACE}::{name}", impl, mutates_args=mutates_args)
    except RuntimeError:
        return None
    op.register_fake(fake)
    return op


def _call(op, impl, *args):
    """``op(*args)`` while torch.compile traces (where the op exists), else ``impl(*args)``, without the
    dispatcher's overhead that an uncompiled step would pay at each call."""
    return op(*args) if op is not None and torch.compiler.is_compiling() else impl(*args)


def _chunk_survivors(q: Tensor, pooled: Tensor, length: Tensor, config, scale: float,
                     append: tuple | None = None) -> Tensor:
    """Kernels 1 and 2 of the selection: ``q [b, HQ, D]`` (:func:`_rows`) at position ``length - 1`` (a 0-d int64
    tensor), ``pooled [b, HKV, n, D]`` with a unit last stride; returns ``[b · HKV, chunks · top_k]`` int64 ranking
    keys, each chunk's ``top_k`` largest (int64 min padded), whose ``top_k`` largest are the selection. With
    ``append = (k, v, cos, sin, rotated, keys, values)`` (:func:`_new_token`'s tensors and the cache's), ``q`` is
    unrotated, the token at position ``length``, and kernel 1 also appends it, as :func:`append_by_kernels` does
    but for the length, which the attention kernel advances (:func:`_sparse_attention`), writing the rotated query
    into ``rotated``: one more program per row does that while the others score (each rotating the queries for
    itself), so the append adds no time to the scoring's."""
    b, hq, d = q.shape
    hkv, n = pooled.shape[1], pooled.shape[2]
    if append is None:
        append_args = [q] * 7 + [0] * 11  # never read
    else:
        k, v, cos, sin, rotated, keys, values = append
        append_args = [k, v, cos, sin, keys, values, rotated, k.stride(0), v.stride(0), _stride0(cos),
                       _stride0(sin), *keys.stride()[:3], *values.stride()[:3], keys.shape[2]]
    g, top_k = hq // hkv, config.ssa_top_k
    rows, chunks = b * hkv, triton.cdiv(n, BLOCK_N)
    group_p, dim_p = _padded(g), _padded(d)
    softmax = config.ssa_score == "group_softmax"
    logits = torch.empty(rows, g, n, device=q.device, dtype=torch.float32)
    stats = torch.empty(rows, chunks, 2, group_p, device=q.device, dtype=torch.float32)
    survivors = torch.empty(rows, chunks * top_k, device=q.device, dtype=torch.int64)
    appender = 0 if append is None else 1  # one more program per row appends (an int: chunks may be a SymInt)
    _logits_kernel[(rows, chunks + appender)](
        q, pooled, length, logits, stats, q.stride(0), q.stride(1), pooled.stride(0), pooled.stride(1),
        pooled.stride(2), n, chunks, *append_args, SCALE=scale, HKV=hkv, G=g, D=d, BS=config.ssa_block_size,
        GROUP_P=group_p, DIM_P=dim_p, BLOCK_N=BLOCK_N, SOFTMAX=softmax, APPEND=append is not None,
        BS_P=triton.next_power_of_2(config.ssa_block_size), num_warps=_score_warps(rows * chunks))
    _chunk_top_k_kernel[(rows, chunks)](
        length, logits, stats, survivors, n, chunks, SCALE=scale, G=g, BS=config.ssa_block_size,
        SINK=config.ssa_sink_blocks, LOCAL=config.ssa_local_blocks, TOP_K=top_k, TOP_K_P=_top_k_length(top_k),
        CHUNKS_P=triton.next_power_of_2(chunks), GROUP_P=group_p, BLOCK_N=BLOCK_N, SOFTMAX=softmax,
        PENDING=append is not None, num_warps=_top_k_warps(rows * chunks))
    return survivors


def select_by_kernels(q: Tensor, pooled: Tensor, length: Tensor, config, scale: float) -> Tensor:
    """``decoding.select_decode_blocks`` by the kernels: ``q [b, HQ, 1, D]`` at position ``length - 1`` (a 0-d
    int64 tensor on ``q``'s device), ``pooled [b, HKV, n, D]``; returns ``[b, HKV, top_k]`` int64 block numbers
    in no particular order, -1 padded."""
    b, hkv, top_k = q.shape[0], pooled.shape[1], config.ssa_top_k
    q, pooled = _rows(q, pooled)
    survivors = _chunk_survivors(q, pooled, length, config, scale)
    chosen = torch.empty(b, hkv, top_k, device=q.device, dtype=torch.int64)
    _top_k_kernel[(b * hkv,)](survivors, chosen, survivors.shape[1], TOP_K=top_k,
                              TOP_K_P=_top_k_length(top_k),
                              SURVIVORS_P=_top_k_length(survivors.shape[1]), num_warps=_top_k_warps(b * hkv))
    return chosen


def sparse_attend_by_kernels(q: Tensor, keys: Tensor, values: Tensor, pooled: Tensor, length: Tensor, config,
                             scale: float, gate: Tensor | None = None, append: tuple | None = None) -> Tensor:
    """``decoding.sparse_decode`` by the kernels: the attention of ``q [b, HQ, 1, D]`` (at position ``length - 1``,
    a 0-d int64 tensor) to the blocks of ``keys``/``values [b, HKV, L, D]`` that the selection picks from ``pooled
    [b, HKV, n, D]``, times ``sigmoid(gate)`` where gate logits ``[b, 1, HQ]`` are given; returns ``[b, HQ, 1, D]``
    in ``q``'s dtype. Three kernels: the selection's first two, then the attention, which takes the chunk
    survivors' ``top_k`` largest itself.

    With ``append = (k, v, cos, sin, tickets)``, the token is not in the cache yet: ``q [b, 1, HQ·D]`` and
    ``k``/``v [b, 1, HKV·D]`` are the unrotated projections; the first kernel also does what
    :func:`append_by_kernels` does to ``keys``, ``values`` and ``pooled``, and the attention kernel advances
    ``length`` (counted in ``tickets``): a decode step's RoPE, cache update and attention in three kernels, where the
    append kernel made four."""
    selection = (scale, config.ssa_block_size, config.ssa_top_k, config.ssa_sink_blocks, config.ssa_local_blocks,
                 config.ssa_score)
    if append is None:
        out = _call(_SPARSE_OP, _sparse, q, keys, values, pooled, length, gate, *selection)
    else:
        out = _call(_SPARSE_APPEND_OP, _sparse_append, q, *append, keys, values, pooled, length, gate, *selection)
    return out[:, :, None]


_Selection = collections.namedtuple("_Selection", "ssa_block_size ssa_top_k ssa_sink_blocks ssa_local_blocks "
                                    "ssa_score")
"""The configuration fields the selection kernels read, as a custom op's arguments bring them."""


def _sparse(q: Tensor, keys: Tensor, values: Tensor, pooled: Tensor, length: Tensor, gate: Tensor | None,
            scale: float, block_size: int, top_k: int, sink: int, local: int, score: str) -> Tensor:
    """:func:`sparse_attend_by_kernels` without ``append``, flat (a custom op's arguments); ``[b, HQ, D]``."""
    config = _Selection(block_size, top_k, sink, local, score)
    q, keys, values, pooled = _rows(q, keys, values, pooled)
    survivors = _chunk_survivors(q, pooled, length, config, scale)
    return _sparse_attention(q, keys, values, survivors, length, gate, scale, config)


def _sparse_append(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, tickets: Tensor, keys: Tensor,
                   values: Tensor, pooled: Tensor, length: Tensor, gate: Tensor | None, scale: float,
                   block_size: int, top_k: int, sink: int, local: int, score: str) -> Tensor:
    """:func:`sparse_attend_by_kernels` with ``append``, flat (a custom op's arguments); ``[b, HQ, D]``."""
    config = _Selection(block_size, top_k, sink, local, score)
    b, d = q.shape[0], keys.shape[-1]
    q, k, v, cos, sin, rotated = _new_token(q, k, v, cos, sin, keys, values, pooled)
    survivors = _chunk_survivors(q.view(b, -1, d), pooled, length, config, scale,
                                 (k, v, cos, sin, rotated, keys, values))
    return _sparse_attention(rotated, keys, values, survivors, length, gate, scale, config,
                             tickets)  # rotated by kernel 1


def _sparse_attention(q: Tensor, keys: Tensor, values: Tensor, survivors: Tensor, length: Tensor,
                      gate: Tensor | None, scale: float, config, tickets: Tensor | None = None) -> Tensor:
    """The sparse attention kernel over the selection's chunk survivors: ``q [b, HQ, D]``; returns ``[b, HQ, D]``.
    With ``tickets`` (a step that appends: its token at position ``length``), the kernel also advances the length
    once all its programs have read it: 64 tickets on the counter at batch 32 on the 1B shape, where the scoring
    kernel, which advanced it before, took 1,088 (27 us more per step; H200, docs/benchmarks.md, session 15, run
    BO)."""
    b, hq, d = q.shape
    hkv, top_k, bs = keys.shape[1], config.ssa_top_k, config.ssa_block_size
    g = hq // hkv
    out = torch.empty(b, hq, d, device=q.device, dtype=q.dtype)
    gate_ptr, gate_sb, gate_sh = _gate_args(gate, out)
    _sparse_attention_kernel[(b * hkv,)](
        q, keys, values, survivors, length, tickets if tickets is not None else length, out, gate_ptr,
        survivors.shape[1], q.stride(0), q.stride(1),
        keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
        gate_sb, gate_sh, SCALE=scale, HKV=hkv, G=g, D=d, BS=bs, TOP_K=top_k, TOP_K_P=_top_k_length(top_k),
        SURVIVORS_P=_top_k_length(survivors.shape[1]), GROUP_P=_padded(g), DIM_P=_padded(d),
        KEYS_P=_padded(top_k * bs), GATE=gate is not None, PENDING=tickets is not None, num_warps=SPARSE_WARPS)
    return out


def _heads_like(q: Tensor, keys: Tensor) -> Tensor:
    """A custom op's output of the attention of ``q`` (``[b, HQ, 1, D]``, or ``[b, 1, HQ·D]`` unrotated) over
    ``keys [b, HKV, L, D]`` without its data: ``[b, HQ, D]``."""
    d = keys.shape[-1]
    return q.new_empty(q.shape[0], q.shape[1] if q.dim() == 4 else q.shape[-1] // d, d)


_SPARSE_OP = _custom_op("sparse_attend", _sparse, (), lambda q, keys, *rest: _heads_like(q, keys))
_SPARSE_APPEND_OP = _custom_op("sparse_append_attend", _sparse_append,
                               ("tickets", "keys", "values", "pooled", "length"),
                               lambda q, k, v, cos, sin, tickets, keys, *rest: _heads_like(q, keys))


def _gate_args(gate: Tensor | None, out: Tensor) -> tuple[Tensor, int, int]:
    """The gate logits ``[b, 1, HQ]`` (a slice of the fused projection's output) as a kernel's pointer and strides;
    ``out`` and zeros stand in where the model has no gate (the kernel then never reads it)."""
    return (gate, gate.stride(0), gate.stride(2)) if gate is not None else (out, 0, 0)


def append_by_kernels(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, keys: Tensor, values: Tensor,
                      pooled: Tensor, length: Tensor, tickets: Tensor, block_size: int) -> Tensor:
    """RoPE of one new token per row and its cache update, in one kernel: what Llama's ``apply_rotary_pos_emb`` and
    ``SSAStaticLayer.update`` do for one token, where Inductor launches five kernels per layer.

    ``q [b, 1, HQ·D]``, ``k``/``v [b, 1, HKV·D]``: the unrotated projections (slices of the fused projection's
    output). ``cos``/``sin [b or 1, 1, D]``: the token's rotary embedding. Writes the rotated key and the value at
    position ``length`` of ``keys``/``values [b, HKV, L, D]``; the pooled key of the block the token completes, if
    it completes one, into ``pooled [b, HKV, L / block_size, D]`` (``decoding.pool_blocks``'s rule over the block's
    cached keys with the new one; an incomplete block's entry is left alone, as ``SSADynamicLayer`` has none); and
    ``length + 1`` into ``length`` (a 0-d int64 tensor) once every program has read it, by the last program to
    finish, counted in ``tickets`` (an int32 zero that it resets). Returns the rotated query ``[b, HQ, 1, D]``.

    The rotation is computed in float32 from the model-dtype inputs and rounded once, as Inductor computes it in a
    compiled step."""
    return _call(_APPEND_OP, _append, q, k, v, cos, sin, keys, values, pooled, length, tickets, block_size)[:, :, None]


def _append(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, keys: Tensor, values: Tensor, pooled: Tensor,
            length: Tensor, tickets: Tensor, block_size: int) -> Tensor:
    """:func:`append_by_kernels`, returning the rotated query as ``[b, HQ, D]`` (a custom op's output)."""
    b, hkv, _, d = keys.shape
    hq = q.shape[-1] // d
    q, k, v, cos, sin, out = _new_token(q, k, v, cos, sin, keys, values, pooled)
    _append_kernel[(b, hkv)](
        q, k, v, cos, sin, keys, values, pooled, length, tickets, out, q.stride(0), k.stride(0), v.stride(0),
        _stride0(cos), _stride0(sin), keys.stride(0),
        keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2), pooled.stride(0),
        pooled.stride(1), pooled.stride(2), keys.shape[2], pooled.shape[2], HKV=hkv, G=hq // hkv, D=d,
        BS=block_size, GROUP_P=_padded(hq // hkv), DIM_P=_padded(d), BS_P=triton.next_power_of_2(block_size),
        num_warps=4)
    return out


_APPEND_OP = _custom_op("append", _append, ("keys", "values", "pooled", "length", "tickets"),
                        lambda q, k, v, cos, sin, keys, *rest: _heads_like(q, keys))


def _new_token(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, keys: Tensor, values: Tensor,
               pooled: Tensor) -> tuple[Tensor, ...]:
    """The append's inputs (:func:`append_by_kernels`) with unit last strides, and the rotated query's buffer
    ``[b, HQ, D]``: ``(q, k, v, cos, sin, out)``. The cache buffers are written in place, so they are checked."""
    q, k, v, cos, sin = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, cos, sin))
    for name, x in (("keys", keys), ("values", values), ("pooled", pooled)):  # written in place: no copy
        if x.stride(-1) != 1:
            raise ValueError(f"append_by_kernels: {name} has stride {x.stride(-1)} in its last dimension; the "
                             "cache buffers are written in place and need 1")
    d = keys.shape[-1]
    return q, k, v, cos, sin, torch.empty(q.shape[0], q.shape[-1] // d, d, device=q.device, dtype=q.dtype)


GEMV_SETTING = (4, 512, 3, 4)
"""The one-row GEMV's launch setting: output features per program (512 programs for a 2048-feature output, enough
loads in flight to keep HBM busy), input features per step of its loop, pipeline stages, warps. The fastest or
within 1 % of it for the 1B shape's q|k|v|g, o and gate|up weights (K = 2048) in two sweeps of 126 settings on an
H200 (docs/benchmarks.md, sessions 10 and 11)."""
GEMV_SETTING_LONG = (8, 1024, 4, 4)
"""The setting for rows of at least ``GEMV_LONG_K`` input features (the down projection, K = 8192): 10.5 us there,
where ``GEMV_SETTING`` took 13.0 (session 11's sweep)."""
GEMV_LONG_K = 4096
GEMV_SETTING_NORM = (4, 512, 3, 2)
"""The setting for products with the RMSNorm fused in (q|k|v|g and gate|up), whose programs each also read the
norm's weight: the least sum of their two times in session 11's sweep of 54 settings (4.92 and 18.36 us, where
``GEMV_SETTING`` took 4.97 and 20.71; H200, docs/benchmarks.md)."""


def _gemv_setting(k: int, norm: bool) -> tuple[int, int, int, int]:
    """The launch setting of a product over ``k`` input features, with the RMSNorm fused in or not."""
    return GEMV_SETTING_LONG if k >= GEMV_LONG_K else GEMV_SETTING_NORM if norm else GEMV_SETTING


ROWS_MAX = 32
"""The most rows (a decode step's batch) that :func:`linear_by_kernel` takes; more go to cuBLAS, whose GEMMs are
no longer bound by reading the weight once."""
ROWS_SETTING = (64, 128, 4, 8)
"""The multi-row product's launch setting: output features per program, input features per step of its loop,
pipeline stages, warps. From session 13's sweep of 48 settings at 32 rows of the 1B shape on an H200
(docs/benchmarks.md): the fastest for o with its residual (6.70 us, where cuBLAS and a separate addition took 7.65);
the LM head then takes 128.1 us against cuBLAS's 129.4."""
ROWS_SETTING_NORM = (64, 64, 5, 8)
"""The setting for products with the RMSNorm fused in (q|k|v|g): the fastest in session 15's sweep of 12 settings at
32 rows, 8.25 us where (128, 128, 4, 8), which it shared with gate|up before, took 8.90 and cuBLAS with a separate
norm 9.52 (H200, docs/benchmarks.md, run BP)."""
ROWS_SETTING_SWIGLU_OUT = (128, 128, 4, 8)
"""The setting for products with the RMSNorm fused in and SwiGLU's activation on their output (gate|up): the fastest
in the same sweep, 19.89 us where cuBLAS with a separate norm and activation took 29.61."""
ROWS_SETTING_LONG = (64, 128, 5, 8)
"""The setting for rows of at least ``GEMV_LONG_K`` input features: the down projection with the residual, whose
input (SwiGLU's activation, applied by the gate|up product) goes from memory to the tensor cores. The fastest in
session 15's sweeps, of 12 settings at 32 rows and of 8 at 8 and 16: 12.44 us at 32 rows, where session 13's
(128, 64, 4, 8) took 14.67 and cuBLAS with a separate addition 16.35 (H200, docs/benchmarks.md)."""
ROWS_PROGRAMS = 132
"""Programs the multi-row product aims at where its output blocks are fewer (one per SM of an H100 or H200): it
then splits each block's input features into ranges (split-K), one program each, so that every SM reads the
weight. The fastest of 132 and 264 for all four decoder weights in session 13's sweep."""

SPLIT_TICKETS = 1024
"""Counters a module keeps for its split products (:func:`linear_by_kernel`'s ``tickets``): one per output block,
and only products with fewer blocks than ``ROWS_PROGRAMS`` are split."""


def _rows_setting(k: int, norm: bool, swiglu_out: bool) -> tuple[int, int, int, int]:
    """The multi-row product's launch setting for ``k`` input features, with the RMSNorm fused in or not, with
    SwiGLU's activation on its output or not."""
    if k >= GEMV_LONG_K:
        return ROWS_SETTING_LONG
    if swiglu_out:
        return ROWS_SETTING_SWIGLU_OUT
    return ROWS_SETTING_NORM if norm else ROWS_SETTING


def _rows_launch(n: int, k: int, norm: bool, tickets: int,
                 swiglu_out: bool = False) -> tuple[tuple[int, int, int, int], int, int, int]:
    """The multi-row product's launch for an ``[n, k]`` weight, with the RMSNorm fused in or not, given ``tickets``
    counters (0: none), with SwiGLU's activation on its output or not: its setting, output blocks, programs per
    block (splits) and input features per program."""
    setting = _rows_setting(k, norm, swiglu_out)
    block_n, block_k = setting[:2]
    blocks = triton.cdiv(n // 2, block_n // 2) if swiglu_out else triton.cdiv(n, block_n)
    splits = 1
    if blocks <= tickets:
        splits = max(1, min(ROWS_PROGRAMS // blocks, triton.cdiv(k, block_k)))
    span = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    return setting, blocks, triton.cdiv(k, span), span


def use_linear_kernel(x: Tensor, weight: Tensor, *others: Tensor | None) -> bool:
    """Whether :func:`linear_by_kernel` computes ``x @ weight.T``: at most ``ROWS_MAX`` rows (a decode step), CUDA,
    bf16/fp16, ``weight [N, K]`` with a unit stride along K, ``others`` (a norm's weight, a residual; None for absent
    ones) in ``x``'s dtype on its device, and no gradient wanted (the kernels have no backward)."""
    others = [t for t in others if t is not None]
    return (use_kernels(x, weight) and x.numel() <= ROWS_MAX * x.shape[-1] and weight.stride(-1) == 1
            and all(t.dtype == x.dtype and t.device == x.device for t in others)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, *others))))


def linear_by_kernel(x: Tensor, weight: Tensor, swiglu: bool = False, norm: Tensor | None = None,
                     eps: float = 0.0, residual: Tensor | None = None, tickets: Tensor | None = None,
                     swiglu_out: bool = False) -> Tensor:
    """``residual + rms_norm(x) @ weight [N, K]^T`` for the rows of ``x [..., K]`` (at most ``ROWS_MAX``), in ``x``'s
    dtype with float32 sums, as one kernel. Every part but the product is optional:

    - ``norm``: Llama's RMSNorm of ``x`` with this weight and ``eps`` first. The sum of squares is taken in the
      product's pass over ``x`` and its reciprocal root scales the sums at the end, so the norm costs no pass of its
      own.
    - ``swiglu``: ``x`` holds ``[gate | up]`` (2K features) and the input is ``silu(gate) * up``, each rounded to
      ``x``'s dtype as the eager operations round it: Llama's MLP with its activation fused in.
    - ``residual [..., N]``: added to the product rounded to ``x``'s dtype, as the decoder layer adds it.
    - ``swiglu_out`` (without ``swiglu`` or ``residual``): ``weight`` holds the rows ``[gate | up]`` and the output
      is ``silu(gate) * up`` (``N / 2`` features), rounded as ``swiglu``'s input is. At two rows or more the
      multi-row kernel applies it to its output (each program's block holds the gate and up rows of the same
      features), so that the down projection's input goes from memory to the tensor cores with no pass through
      registers; one row is the GEMV, then the activation in torch (the MLP uses ``swiglu`` there instead).

    So a decoder layer's norms and residual additions run inside its projections, where a compiled step launched
    a kernel for each.

    One row (batch 1) is a GEMV (``_gemv_kernel``): each program reduces ``BLOCK_N`` weight rows with no ``tl.dot``;
    the normalised input is not rounded to ``x``'s dtype between the norm's operations (eager rounds it; a compiled
    norm does not). On the 1B shape on an H200 the plain product took 4.2-4.4 us against cuBLAS's 6.0-6.1 for the
    q|k|v|g and o weights, and 10.5 us against 17.5 for silu-and-multiply plus the down projection
    (docs/benchmarks.md, sessions 10 and 11).

    Two rows or more (``_rows_kernel``): each program multiplies ``BLOCK_N`` weight rows by all rows with ``tl.dot``
    (transposed, so that the weight tile is the operand that Hopper's wgmma reads from shared memory), the input
    times the norm's weight rounded to ``x``'s dtype for it. Where the weight has fewer output blocks than
    ``ROWS_PROGRAMS``, each block's input features are split among several programs, given ``tickets`` (int32 zeros,
    one per output block at least, reset by the kernel): each program stores its float32 partial sums, and the last
    of a block to take its ticket adds them in a fixed order and finishes the block, so the result does not depend on
    the programs' order. Without ``tickets`` a block is one program. At 32 rows of the 1B shape on an H200 the four
    decoder products took 53.8 us per layer with their norms, activation and residuals, where cuBLAS and separate
    kernels took 64.0; a batch-32 decode step launches 123 kernels instead of 254 (docs/benchmarks.md, session 13)."""
    if swiglu_out and (swiglu or residual is not None):
        raise ValueError("linear_by_kernel: swiglu_out=True takes neither swiglu=True nor a residual (the MLP's "
                         "gate|up product has neither)")
    if _LINEAR_OP is None or not torch.compiler.is_compiling():
        return _linear(x, weight, swiglu, norm, eps, residual, tickets, swiglu_out)
    if tickets is None:  # the op's mutated argument is a tensor: an empty one for none
        tickets = torch.empty(0, device=x.device, dtype=torch.int32)
    return _LINEAR_OP(x, weight, swiglu, norm, eps, residual, tickets, swiglu_out)


def _linear(x: Tensor, weight: Tensor, swiglu: bool, norm: Tensor | None, eps: float, residual: Tensor | None,
            tickets: Tensor, swiglu_out: bool) -> Tensor:
    """:func:`linear_by_kernel`, with its arguments all given (``tickets`` empty or None for none)."""
    n, k = weight.shape
    if swiglu_out and x.numel() == x.shape[-1]:  # one row: the GEMV, then the activation as eager computes it
        gate, up = _linear(x, weight, False, norm, eps, None, tickets, False).chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up
    out = torch.empty(*x.shape[:-1], n // 2 if swiglu_out else n, device=x.device, dtype=x.dtype)
    x = x.reshape(-1, x.shape[-1]).contiguous()  # unit strides (a copy only where x has others)
    norm_ptr = norm.contiguous() if norm is not None else x  # x stands in where the kernel never reads
    res_ptr = residual.reshape(-1, n).contiguous() if residual is not None else x
    m = x.shape[0]
    if m == 1:
        block_n, block_k, stages, warps = _gemv_setting(k, norm is not None)
        _gemv_kernel[(triton.cdiv(n, block_n),)](
            x, weight, out, norm_ptr, res_ptr, n, k, weight.stride(0), eps, SWIGLU=swiglu, NORM=norm is not None,
            RESIDUAL=residual is not None, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, num_warps=warps)
        return out
    (block_n, block_k, stages, warps), blocks, splits, span = _rows_launch(
        n, k, norm is not None, tickets.numel() if tickets is not None else 0, swiglu_out)
    block_m, split = _padded(m), splits > 1
    # Without a split, x stands in for the buffers the kernel then never touches: an output tensor passed twice would
    # look, to a compiled step's functionalisation, like two outputs written.
    partial = torch.empty(splits, block_m, blocks * block_n, device=x.device, dtype=torch.float32) if split else x
    squares = torch.empty(blocks, splits, block_m, device=x.device, dtype=torch.float32) if split else x
    _rows_kernel[(blocks, splits)](
        x, weight, out, norm_ptr, res_ptr, partial, squares, tickets if split else x, m, n, k, span,
        weight.stride(0), eps, SWIGLU=swiglu, NORM=norm is not None, RESIDUAL=residual is not None,
        SWIGLU_OUT=swiglu_out, SPLITS=splits, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages,
        num_warps=warps)
    return out


def _linear_like(x: Tensor, weight: Tensor, swiglu: bool, norm: Tensor | None, eps: float,
                 residual: Tensor | None, tickets: Tensor, swiglu_out: bool) -> Tensor:
    """The linear custom op's output without its data."""
    return x.new_empty(*x.shape[:-1], weight.shape[0] // 2 if swiglu_out else weight.shape[0])


_LINEAR_OP = _custom_op("linear", _linear, ("tickets",), _linear_like)


FULL_BLOCK_N = 128
"""Keys per tile of the full-mode split kernel."""
FULL_WARPS = 4
"""Warps of the full-mode split kernel."""
FULL_PROGRAMS = 264
"""Programs the full-mode split kernel aims at: 2 per SM of an H100 or H200 (132 SMs). A shape-only constant, so a
compiled step's grid stays fixed: batch x KV heads rows, each split into ``FULL_PROGRAMS // rows`` key ranges.
These three were the fastest of 12 settings at the 1B shape and 32k on an H200 at batch 32, and within 4 % of the
fastest at batch 1 (docs/benchmarks.md, session 9); more programs make the combine longer at batch 1."""


def full_attend_by_kernels(q: Tensor, keys: Tensor, values: Tensor, length: Tensor, scale: float,
                           gate: Tensor | None = None) -> Tensor:
    """Causal attention of ``q [b, HQ, 1, D]`` (at position ``length - 1``, a 0-d int64 tensor) over the first
    ``length`` keys of the static buffers ``keys``/``values [b, HKV, L, D]``, times ``sigmoid(gate)`` where gate
    logits ``[b, 1, HQ]`` are given; returns ``[b, HQ, 1, D]`` in ``q``'s dtype. Split-KV: each program attends a row's
    group to one key range and keeps the float32 partial (max, sum, weighted values); a second kernel combines a
    row's ranges and gates. Ranges past ``length`` return at once."""
    return _call(_FULL_OP, _full_attend, q, keys, values, length, gate, scale)[:, :, None]


def _full_attend(q: Tensor, keys: Tensor, values: Tensor, length: Tensor, gate: Tensor | None,
                 scale: float) -> Tensor:
    """:func:`full_attend_by_kernels`, returning ``[b, HQ, D]`` (a custom op's output)."""
    b, hq, _, d = q.shape
    hkv, capacity = keys.shape[1], keys.shape[2]
    g, rows = hq // hkv, b * hkv
    tiles = triton.cdiv(capacity, FULL_BLOCK_N)
    per_split = triton.cdiv(tiles, min(tiles, max(1, FULL_PROGRAMS // rows)))  # tiles per key range
    splits = triton.cdiv(tiles, per_split)
    q, keys, values = _rows(q, keys, values)
    group_p, dim_p = _padded(g), _padded(d)
    partial = torch.empty(rows, splits, group_p, dim_p, device=q.device, dtype=torch.float32)
    stats = torch.empty(rows, splits, 2, group_p, device=q.device, dtype=torch.float32)
    _full_split_kernel[(rows, splits)](
        q, keys, values, length, partial, stats, q.stride(0), q.stride(1), keys.stride(0), keys.stride(1),
        keys.stride(2), values.stride(0), values.stride(1), values.stride(2), SCALE=scale, HKV=hkv, G=g, D=d,
        GROUP_P=group_p, DIM_P=dim_p, BLOCK_N=FULL_BLOCK_N, PER_SPLIT=per_split, num_warps=FULL_WARPS,
        num_stages=3)
    out = torch.empty(b, hq, d, device=q.device, dtype=q.dtype)
    gate_ptr, gate_sb, gate_sh = _gate_args(gate, out)
    _full_combine_kernel[(rows, g)](partial, stats, out, gate_ptr, splits, gate_sb, gate_sh, HKV=hkv, G=g, D=d,
                                    GROUP_P=group_p, DIM_P=dim_p, GATE=gate is not None,
                                    SPLITS_TILE=min(256, triton.next_power_of_2(splits)), num_warps=8)
    return out


_FULL_OP = _custom_op("full_attend", _full_attend, (), lambda q, keys, *rest: _heads_like(q, keys))


if triton is not None:

    @triton.jit
    def _own_block(length, BS: tl.constexpr, PENDING: tl.constexpr):
        """The new token's block number: its position is ``length - 1``, or with ``PENDING`` (a sparse step that
        appends, whose length advances in its last kernel) ``length``."""
        return (length if PENDING else length - 1) // BS

    @triton.jit
    def _group_queries(q_ptr, bi, h, q_sb, q_sh, G: tl.constexpr, D: tl.constexpr, GROUP_P: tl.constexpr,
                       DIM_P: tl.constexpr):
        """The ``G`` query heads that read KV head ``h`` of batch entry ``bi``, as ``[GROUP_P, DIM_P]`` (zero
        padded)."""
        g = tl.arange(0, GROUP_P)
        d = tl.arange(0, DIM_P)
        return tl.load(q_ptr + bi * q_sb + (h * G + g)[:, None] * q_sh + d[None, :],
                       mask=(g < G)[:, None] & (d < D)[None, :], other=0.0)

    @triton.jit
    def _gate(gate_ptr, bi, heads, gate_sb, gate_sh, mask):
        """``sigmoid`` of query ``heads``' gate logits of batch entry ``bi``, in float32 (docs/ssa.md rule 5)."""
        logit = tl.load(gate_ptr + bi * gate_sb + heads * gate_sh, mask=mask, other=0.0)
        return tl.sigmoid(logit.to(tl.float32))

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, out_ptr, norm_ptr, res_ptr, n, k, w_sn, eps, SWIGLU: tl.constexpr,
                     NORM: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     STAGES: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)  # summed over K once, at the end
        squares = tl.zeros((BLOCK_K,), tl.float32)  # the norm's sum of squares of x, likewise
        for start in tl.range(0, k, BLOCK_K, num_stages=STAGES):
            cols = start + tl.arange(0, BLOCK_K)
            inside = cols < k
            if SWIGLU:
                gate = tl.load(x_ptr + cols, mask=inside, other=0.0).to(tl.float32)
                up = tl.load(x_ptr + k + cols, mask=inside, other=0.0).to(tl.float32)
                x = _swiglu(gate, up, x_ptr.dtype.element_ty).to(tl.float32)
            else:
                x = tl.load(x_ptr + cols, mask=inside, other=0.0).to(tl.float32)
            if NORM:  # the norm's weight now, its 1 / rms once the pass has summed the squares
                squares += x * x
                x *= tl.load(norm_ptr + cols, mask=inside, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * w_sn + cols[None, :], mask=(rows < n)[:, None] & inside[None, :],
                        other=0.0, eviction_policy="evict_first")  # read once per step: keep L2 for the rest
            acc += w.to(tl.float32) * x[None, :]
        out = tl.sum(acc, 1)
        if NORM:
            out *= tl.math.rsqrt(tl.sum(squares, 0) / k + eps)
        if RESIDUAL:
            out = (tl.load(res_ptr + rows, mask=rows < n, other=0.0).to(tl.float32)
                   + out.to(out_ptr.dtype.element_ty).to(tl.float32))
        tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty), mask=rows < n)

    @triton.jit
    def _rows_kernel(x_ptr, w_ptr, out_ptr, norm_ptr, res_ptr, partial_ptr, squares_ptr, tickets_ptr, m, n, k, span,
                     w_sn, eps, SWIGLU: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr,
                     SWIGLU_OUT: tl.constexpr, SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
        # The transposed product, weight [BLOCK_N, BLOCK_K] times input [BLOCK_K, BLOCK_M]: the weight is tl.dot's
        # first operand, whose 64 rows or more let Hopper's wgmma run it from shared memory, as cp.async fills it.
        block, split = tl.program_id(0), tl.program_id(1)
        rows = tl.arange(0, BLOCK_M)
        if SWIGLU_OUT:  # weight [gate | up] (n = 2F): the gate rows of BLOCK_N / 2 features, then their up rows
            r = tl.arange(0, BLOCK_N)
            feature = block * (BLOCK_N // 2) + r % (BLOCK_N // 2)
            cols = tl.where(r < BLOCK_N // 2, feature, feature + n // 2)
            valid = feature < n // 2
        else:
            cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
            valid = cols < n
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        squares = tl.zeros((BLOCK_M,), tl.float32)  # the norm's sums of squares over this program's features
        start = split * span
        for first in tl.range(start, tl.minimum(start + span, k), BLOCK_K, num_stages=STAGES):
            feats = first + tl.arange(0, BLOCK_K)
            inside = feats < k
            mask = inside[:, None] & (rows < m)[None, :]
            if SWIGLU:
                gate = tl.load(x_ptr + rows[None, :] * 2 * k + feats[:, None], mask=mask, other=0.0).to(tl.float32)
                up = tl.load(x_ptr + rows[None, :] * 2 * k + k + feats[:, None], mask=mask, other=0.0)
                x = _swiglu(gate, up, x_ptr.dtype.element_ty)
            else:
                x = tl.load(x_ptr + rows[None, :] * k + feats[:, None], mask=mask, other=0.0)
            if NORM:  # the norm's weight now, its 1 / rms once the squares are summed
                xf = x.to(tl.float32)
                squares += tl.sum(xf * xf, 0)
                x = (xf * tl.load(norm_ptr + feats, mask=inside, other=0.0).to(tl.float32)[:, None]).to(
                    x_ptr.dtype.element_ty)
            w = tl.load(w_ptr + cols[:, None] * w_sn + feats[None, :], mask=valid[:, None] & inside[None, :],
                        other=0.0, eviction_policy="evict_first")  # read once per step
            acc = tl.dot(w, x, acc)
        if SPLITS > 1:
            acc, squares, last = _sum_splits(acc, squares, partial_ptr, squares_ptr, tickets_ptr, block, split, rows,
                                             SPLITS, BLOCK_M, BLOCK_N)
            if last:
                _finish_rows(acc, squares, out_ptr, res_ptr, rows, block, m, n, k, eps, NORM, RESIDUAL, SWIGLU_OUT,
                             BLOCK_M, BLOCK_N)
                tl.store(tickets_ptr + block, 0)  # for the next launch
        else:
            _finish_rows(acc, squares, out_ptr, res_ptr, rows, block, m, n, k, eps, NORM, RESIDUAL, SWIGLU_OUT,
                         BLOCK_M, BLOCK_N)

    @triton.jit
    def _swiglu(gate, up, dtype: tl.constexpr):
        """``silu(gate) * up`` in ``dtype`` (the model's), rounded after each operation as the eager operations
        round; ``gate`` in float32."""
        act = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
        return (act * up.to(tl.float32)).to(dtype)

    @triton.jit
    def _sum_splits(acc, squares, partial_ptr, squares_ptr, tickets_ptr, block, split, rows, SPLITS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Split-K's reduction: stores this program's float32 sums and takes the block's ticket. The block's last
        program to take it (``last``) gets the sums of all its ``SPLITS`` programs, added in split order so that the
        result does not depend on the programs' order; it is then to finish the block and reset the ticket. The
        loop is unrolled (``SPLITS`` a constant), so that its loads are all in flight at once rather than one L2
        round trip each."""
        width = tl.num_programs(0) * BLOCK_N  # the partial sums' row: every block's columns
        cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(partial_ptr + (split * BLOCK_M + rows)[None, :] * width + cols[:, None], acc)
        tl.store(squares_ptr + (block * SPLITS + split) * BLOCK_M + rows, squares)
        tl.debug_barrier()  # every thread's stores before the ticket (its release covers them)
        last = tl.atomic_add(tickets_ptr + block, 1, sem="acq_rel") == SPLITS - 1
        if last:
            acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
            squares = tl.zeros((BLOCK_M,), tl.float32)
            for i in tl.static_range(SPLITS):  # .cg: from L2, where the other programs' stores are
                acc += tl.load(partial_ptr + (i * BLOCK_M + rows)[None, :] * width + cols[:, None],
                               cache_modifier=".cg")
                squares += tl.load(squares_ptr + (block * SPLITS + i) * BLOCK_M + rows, cache_modifier=".cg")
        return acc, squares, last

    @triton.jit
    def _finish_rows(acc, squares, out_ptr, res_ptr, rows, block, m, n, k, eps, NORM: tl.constexpr,
                     RESIDUAL: tl.constexpr, SWIGLU_OUT: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
        """Block ``block`` of the multi-row product (``[BLOCK_N, BLOCK_M]``, output features by rows) from its
        float32 sums: the norm's ``1 / rms``; with ``SWIGLU_OUT`` the activation of its gate and up halves (each
        rounded to the output dtype first, as the product's output is rounded before the eager activation), which
        leaves ``BLOCK_N / 2`` features of ``n / 2``; the residual; the store."""
        dtype = out_ptr.dtype.element_ty
        if NORM:
            acc *= tl.math.rsqrt(squares / k + eps)[None, :]
        if SWIGLU_OUT:
            gate, up = tl.split(tl.permute(tl.reshape(acc, (2, BLOCK_N // 2, BLOCK_M)), (1, 2, 0)))
            acc = _swiglu(gate.to(dtype).to(tl.float32), up.to(dtype), dtype).to(tl.float32)
            cols = block * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
            width = n // 2
        else:
            cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
            width = n
        mask = (cols < width)[:, None] & (rows < m)[None, :]
        if RESIDUAL:
            acc = (tl.load(res_ptr + rows[None, :] * width + cols[:, None], mask=mask, other=0.0).to(tl.float32)
                   + acc.to(dtype).to(tl.float32))
        tl.store(out_ptr + rows[None, :] * width + cols[:, None], acc.to(dtype), mask=mask)

    @triton.jit
    def _rotated(x_ptr, rows, row_mask, d, cos, sin, D: tl.constexpr):
        """Llama's RoPE of the ``[rows, D]`` vectors at ``x_ptr + rows`` (row offsets) in float32: ``x · cos +
        rotate_half(x) · sin``, where ``rotate_half`` is ``(-x[D/2:], x[:D/2])``."""
        first = d < D // 2
        partner = tl.where(first, d + D // 2, d - D // 2)
        mask = row_mask[:, None] & (d < D)[None, :]
        x = tl.load(x_ptr + rows[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
        x_half = tl.load(x_ptr + rows[:, None] + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        return x * cos[None, :] + tl.where(first, -x_half, x_half) * sin[None, :]

    @triton.jit
    def _append_token(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, keys_ptr, values_ptr, pooled_ptr, out_ptr, bi, h,
                      length, q_sb, k_sb, v_sb, cos_sb, sin_sb, ks_b, ks_h, ks_n, vs_b, vs_h, vs_n, ps_b, ps_h, ps_n,
                      capacity, blocks, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                      GROUP_P: tl.constexpr, DIM_P: tl.constexpr, BS_P: tl.constexpr):
        """The new token of batch entry ``bi`` and KV head ``h``, at position ``length``: its query heads rotated
        into ``out``, its key rotated and its value into the cache, and the pooled key of the block it completes."""
        d = tl.arange(0, DIM_P)
        dim = d < D
        one = tl.arange(0, 1)
        cos = tl.load(cos_ptr + bi * cos_sb + d, mask=dim, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + bi * sin_sb + d, mask=dim, other=0.0).to(tl.float32)
        # The query heads of the group, rotated and rounded to the model dtype.
        g = tl.arange(0, GROUP_P)
        heads = h * G + g
        q = _rotated(q_ptr, bi * q_sb + heads * D, g < G, d, cos, sin, D)
        tl.store(out_ptr + (bi * G * HKV + heads)[:, None] * D + d[None, :],
                 q.to(out_ptr.dtype.element_ty), mask=(g < G)[:, None] & dim[None, :])
        # The key, rotated, and the value, at position length (a full buffer is not written).
        key = _rotated(k_ptr, bi * k_sb + h * D + one, one == 0, d, cos, sin, D).to(keys_ptr.dtype.element_ty)
        fits = (one < 1)[:, None] & dim[None, :] & (length < capacity)
        tl.store(keys_ptr + bi * ks_b + h * ks_h + length * ks_n + d[None, :], key, mask=fits)
        value = tl.load(v_ptr + bi * v_sb + h * D + d[None, :], mask=(one < 1)[:, None] & dim[None, :])
        tl.store(values_ptr + bi * vs_b + h * vs_h + length * vs_n + d[None, :], value, mask=fits)
        # The pooled key of the block this token completes: its cached keys with the new one in its place. Only
        # then: an incomplete block's entry is never scored, and reading the block at every token would lengthen
        # each step's chain of dependent loads.
        if length % BS == BS - 1:
            block = tl.minimum(length // BS, blocks - 1)
            t = tl.arange(0, BS_P)
            pos = block * BS + t
            inside = (t < BS) & (pos < capacity)
            cached = tl.load(keys_ptr + bi * ks_b + h * ks_h + pos[:, None] * ks_n + d[None, :],
                             mask=inside[:, None] & dim[None, :], other=0.0)
            cached = tl.where((pos == length)[:, None], key, cached).to(tl.float32)
            tl.store(pooled_ptr + bi * ps_b + h * ps_h + block * ps_n + d, (tl.sum(cached, 0) / BS).to(
                pooled_ptr.dtype.element_ty), mask=dim)

    @triton.jit
    def _advance_length(length_ptr, tickets_ptr, length):
        """Writes ``length + 1`` once every program of the grid has read the old length: the last program to take a
        ticket does it (the atomic orders each program's reads before its ticket) and resets the count."""
        ticket = tl.atomic_add(tickets_ptr, 1)
        if ticket == tl.num_programs(0) * tl.num_programs(1) - 1:
            tl.store(length_ptr, length + 1)
            tl.store(tickets_ptr, 0)

    @triton.jit
    def _append_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, keys_ptr, values_ptr, pooled_ptr, length_ptr,
                       tickets_ptr, out_ptr, q_sb, k_sb, v_sb, cos_sb, sin_sb, ks_b, ks_h, ks_n,
                       vs_b, vs_h, vs_n, ps_b, ps_h, ps_n, capacity, blocks, HKV: tl.constexpr, G: tl.constexpr,
                       D: tl.constexpr, BS: tl.constexpr, GROUP_P: tl.constexpr, DIM_P: tl.constexpr,
                       BS_P: tl.constexpr):
        length = tl.load(length_ptr)
        _append_token(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, keys_ptr, values_ptr, pooled_ptr, out_ptr,
                      tl.program_id(0), tl.program_id(1), length, q_sb, k_sb, v_sb, cos_sb, sin_sb, ks_b, ks_h, ks_n,
                      vs_b, vs_h, vs_n, ps_b, ps_h, ps_n, capacity, blocks, HKV, G, D, BS, GROUP_P, DIM_P, BS_P)
        _advance_length(length_ptr, tickets_ptr, length)

    @triton.jit
    def _logits_kernel(q_ptr, k_ptr, length_ptr, logits_ptr, stats_ptr, q_sb, q_sh, k_sb, k_sh, k_sn, n, chunks,
                       new_k_ptr, new_v_ptr, cos_ptr, sin_ptr, keys_ptr, values_ptr, out_ptr, new_k_sb,
                       new_v_sb, cos_sb, sin_sb, ks_b, ks_h, ks_n, vs_b, vs_h, vs_n, capacity,
                       SCALE: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                       GROUP_P: tl.constexpr, DIM_P: tl.constexpr, BLOCK_N: tl.constexpr, SOFTMAX: tl.constexpr,
                       APPEND: tl.constexpr, BS_P: tl.constexpr):
        row, chunk = tl.program_id(0), tl.program_id(1)
        bi, h = row // HKV, row % HKV
        if APPEND:  # q unrotated, the token at position length
            length = tl.load(length_ptr)
            if chunk == chunks:  # a program of its own appends the token, beside the chunks' scoring (the own
                # block's pooled key, which it may write, is not scored)
                _append_token(q_ptr, new_k_ptr, new_v_ptr, cos_ptr, sin_ptr, keys_ptr, values_ptr, k_ptr, out_ptr,
                              bi, h, length, q_sb, new_k_sb, new_v_sb, cos_sb, sin_sb, ks_b, ks_h, ks_n, vs_b, vs_h,
                              vs_n, k_sb, k_sh, k_sn, capacity, n, HKV, G, D, BS, GROUP_P, DIM_P, BS_P)
            else:  # each scoring program rotates the group's queries itself
                g = tl.arange(0, GROUP_P)
                d = tl.arange(0, DIM_P)
                cos = tl.load(cos_ptr + bi * cos_sb + d, mask=d < D, other=0.0).to(tl.float32)
                sin = tl.load(sin_ptr + bi * sin_sb + d, mask=d < D, other=0.0).to(tl.float32)
                q = _rotated(q_ptr, bi * q_sb + (h * G + g) * q_sh, g < G, d, cos, sin, D)
                _score_chunk(q.to(q_ptr.dtype.element_ty), _own_block(length, BS, True), k_ptr, logits_ptr,
                             stats_ptr, row, chunk, chunks, bi, h, k_sb, k_sh, k_sn, n, SCALE, G, D, GROUP_P, DIM_P,
                             BLOCK_N, SOFTMAX)
        else:  # q rotated, the token at position length - 1
            _score_chunk(_group_queries(q_ptr, bi, h, q_sb, q_sh, G, D, GROUP_P, DIM_P),
                         _own_block(tl.load(length_ptr), BS, False),
                         k_ptr, logits_ptr, stats_ptr, row, chunk, chunks, bi, h, k_sb, k_sh, k_sn, n, SCALE, G, D,
                         GROUP_P, DIM_P, BLOCK_N, SOFTMAX)

    @triton.jit
    def _score_chunk(q, own, k_ptr, logits_ptr, stats_ptr, row, chunk, chunks, bi, h, k_sb, k_sh, k_sn, n,
                     SCALE: tl.constexpr, G: tl.constexpr, D: tl.constexpr, GROUP_P: tl.constexpr,
                     DIM_P: tl.constexpr, BLOCK_N: tl.constexpr, SOFTMAX: tl.constexpr):
        """Kernel 1's work for one chunk: the logits of the group's queries ``q [GROUP_P, DIM_P]`` against the
        chunk's pooled keys, and for ``group_softmax`` the chunk's statistics over its candidates (the blocks
        before ``own``, the new token's block)."""
        g = tl.arange(0, GROUP_P)
        d = tl.arange(0, DIM_P)
        j = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.load(k_ptr + bi * k_sb + h * k_sh + j[:, None] * k_sn + d[None, :],
                    mask=(j < n)[:, None] & (d < D)[None, :], other=0.0)
        logits = tl.dot(q, tl.trans(k))  # [GROUP_P, BLOCK_N] float32
        tl.store(logits_ptr + (row * G + g)[:, None] * n + j[None, :], logits,
                 mask=(g < G)[:, None] & (j < n)[None, :])
        if SOFTMAX:  # this chunk's softmax statistics per query head
            candidate = j < own
            z = tl.where(candidate[None, :], logits * SCALE, -float("inf"))
            top = tl.max(z, 1)
            total = tl.sum(tl.exp(z - tl.where(top == -float("inf"), 0.0, top)[:, None]), 1)
            base = stats_ptr + (row * chunks + chunk) * 2 * GROUP_P
            tl.store(base + g, top)
            tl.store(base + GROUP_P + g, total)

    @triton.jit
    def _largest(keys, TOP_K: tl.constexpr, TOP_K_P: tl.constexpr, AS_BLOCKS: tl.constexpr):
        """The ``TOP_K`` largest of the distinct ``keys [N]`` (N a power of two), largest first, as
        ``[min(TOP_K_P, N)]`` (``TOP_K_P``: :func:`_top_k_length` of ``TOP_K``): the keys themselves (int64 min
        past the ``TOP_K``-th and where fewer exist), or with ``AS_BLOCKS`` their block numbers (-1 there).
        ``tl.topk`` is a bitonic partial sort, about ``log2(N) · log2(TOP_K_P)`` compare-and-swap steps, where
        ``TOP_K`` rounds of max-and-remove were ``TOP_K`` reductions over all ``N`` keys."""
        K: tl.constexpr = min(TOP_K_P, keys.shape[0])
        best = tl.topk(keys, K)
        best = tl.where(tl.arange(0, K) < TOP_K, best, -9223372036854775808)
        if AS_BLOCKS:
            best = tl.where(best == -9223372036854775808, -1, best & 0xFFFFFFFF)
        return best

    @triton.jit
    def _store_largest(keys, out_ptr, TOP_K: tl.constexpr, TOP_K_P: tl.constexpr, AS_BLOCKS: tl.constexpr):
        """Stores :func:`_largest` at ``out_ptr``, ``TOP_K`` entries; fewer ``keys`` than ``TOP_K`` leave the rest
        int64 min (-1 with ``AS_BLOCKS``)."""
        K: tl.constexpr = min(TOP_K_P, keys.shape[0])
        i = tl.arange(0, K)
        tl.store(out_ptr + i, _largest(keys, TOP_K, TOP_K_P, AS_BLOCKS), mask=i < TOP_K)
        if TOP_K_P > K:
            rest = tl.arange(0, TOP_K_P)
            pad = tl.full([TOP_K_P], -1 if AS_BLOCKS else -9223372036854775808, tl.int64)
            tl.store(out_ptr + rest, pad, mask=(rest >= K) & (rest < TOP_K))

    @triton.jit
    def _chunk_top_k_kernel(length_ptr, logits_ptr, stats_ptr, out_ptr, n, chunks, SCALE: tl.constexpr,
                            G: tl.constexpr, BS: tl.constexpr, SINK: tl.constexpr, LOCAL: tl.constexpr,
                            TOP_K: tl.constexpr, TOP_K_P: tl.constexpr, CHUNKS_P: tl.constexpr,
                            GROUP_P: tl.constexpr, BLOCK_N: tl.constexpr, SOFTMAX: tl.constexpr,
                            PENDING: tl.constexpr):
        row, chunk = tl.program_id(0), tl.program_id(1)
        g = tl.arange(0, GROUP_P)
        j = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
        own = _own_block(tl.load(length_ptr), BS, PENDING)
        candidate = j < own
        logits = tl.load(logits_ptr + (row * G + g)[:, None] * n + j[None, :],
                         mask=(g < G)[:, None] & (j < n)[None, :], other=0.0)
        if SOFTMAX:  # softmax over all candidates per head: combine the chunks' statistics
            c = tl.arange(0, CHUNKS_P)
            base = stats_ptr + row * chunks * 2 * GROUP_P
            mask = (c < chunks)[:, None]
            tops = tl.load(base + c[:, None] * 2 * GROUP_P + g[None, :], mask=mask, other=-float("inf"))
            sums = tl.load(base + c[:, None] * 2 * GROUP_P + GROUP_P + g[None, :], mask=mask, other=0.0)
            top = tl.max(tops, 0)
            safe = tl.where(top == -float("inf"), 0.0, top)
            total = tl.sum(sums * tl.exp(tops - safe[None, :]), 0)
            total = tl.where(total == 0.0, 1.0, total)  # a head with no candidate: its probabilities are masked
            probs = tl.exp(logits * SCALE - safe[:, None]) / total[:, None]
            scores = tl.sum(tl.where((g < G)[:, None] & candidate[None, :], probs, 0.0), 0)
        else:  # "dot": the group's mean of q · k̄
            scores = tl.sum(logits, 0) / G
        scores = tl.where(candidate, scores, -float("inf"))
        forced = candidate & ((j < SINK) | (j >= own - LOCAL))
        scores = tl.where(forced | (j == own), float("inf"), scores)
        bits = tl.where(scores == 0.0, 0.0, scores).to(tl.float32).to(tl.int32, bitcast=True)  # -0.0 is +0.0
        ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)  # monotone in the score
        keys = (ordered << 32) + j
        keys = tl.where((candidate | (j == own)) & (j < n), keys, -9223372036854775808)
        _store_largest(keys, out_ptr + (row * chunks + chunk) * TOP_K, TOP_K, TOP_K_P, False)

    @triton.jit
    def _survivors(keys_ptr, row, count, SURVIVORS_P: tl.constexpr):
        """Row ``row``'s ``count`` chunk survivors (kernel 2's output), as ``[SURVIVORS_P]`` (int64 min padded)."""
        i = tl.arange(0, SURVIVORS_P)
        return tl.load(keys_ptr + row * count + i, mask=i < count, other=-9223372036854775808)

    @triton.jit
    def _top_k_kernel(keys_ptr, out_ptr, count, TOP_K: tl.constexpr, TOP_K_P: tl.constexpr,
                      SURVIVORS_P: tl.constexpr):
        row = tl.program_id(0)
        _store_largest(_survivors(keys_ptr, row, count, SURVIVORS_P), out_ptr + row * TOP_K, TOP_K, TOP_K_P, True)

    @triton.jit
    def _sparse_attention_kernel(q_ptr, k_ptr, v_ptr, survivors_ptr, length_ptr, tickets_ptr, out_ptr, gate_ptr,
                                 count, q_sb, q_sh, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, gate_sb, gate_sh,
                                 SCALE: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                                 BS: tl.constexpr, TOP_K: tl.constexpr, TOP_K_P: tl.constexpr,
                                 SURVIVORS_P: tl.constexpr, GROUP_P: tl.constexpr, DIM_P: tl.constexpr,
                                 KEYS_P: tl.constexpr, GATE: tl.constexpr, PENDING: tl.constexpr):
        row = tl.program_id(0)
        length = tl.load(length_ptr)
        bi, h = row // HKV, row % HKV
        g = tl.arange(0, GROUP_P)
        d = tl.arange(0, DIM_P)
        # The selection's last step (what _top_k_kernel stores for select_by_kernels), kept in registers.
        chosen = _largest(_survivors(survivors_ptr, row, count, SURVIVORS_P), TOP_K, TOP_K_P, True)  # [TOP_K_P]
        t = tl.arange(0, KEYS_P)  # the t-th gathered key: token t % BS of selected block t // BS
        slot = t // BS
        block = tl.where(slot < TOP_K, tl.gather(chosen, tl.minimum(slot, TOP_K_P - 1), 0), -1)
        pos = block * BS + t % BS
        valid = (block >= 0) & (pos <= (length if PENDING else length - 1))  # causal inside the own block
        pos = tl.where(valid, pos, 0)
        dim = (d < D)[None, :]
        q = _group_queries(q_ptr, bi, h, q_sb, q_sh, G, D, GROUP_P, DIM_P)
        k = tl.load(k_ptr + bi * k_sb + h * k_sh + pos[:, None] * k_sn + d[None, :], mask=valid[:, None] & dim,
                    other=0.0)
        v = tl.load(v_ptr + bi * v_sb + h * v_sh + pos[:, None] * v_sn + d[None, :], mask=valid[:, None] & dim,
                    other=0.0)
        s = tl.where(valid[None, :], tl.dot(q, tl.trans(k)) * SCALE, -float("inf"))  # [GROUP_P, KEYS_P] float32
        p = tl.exp(s - tl.max(s, 1)[:, None])  # the own block's new token is always valid: a finite max
        p = p / tl.sum(p, 1)[:, None]
        out = tl.dot(p.to(v.dtype), v)
        if GATE:
            out *= _gate(gate_ptr, bi, h * G + g, gate_sb, gate_sh, g < G)[:, None]
        tl.store(out_ptr + (bi * HKV * G + h * G + g)[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=(g < G)[:, None] & dim)
        if PENDING:  # the step's append: the length advances once every program of the step has read it
            _advance_length(length_ptr, tickets_ptr, length)


    @triton.jit
    def _full_split_kernel(q_ptr, k_ptr, v_ptr, length_ptr, partial_ptr, stats_ptr, q_sb, q_sh, k_sb, k_sh, k_sn,
                           v_sb, v_sh, v_sn, SCALE: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr,
                           D: tl.constexpr, GROUP_P: tl.constexpr, DIM_P: tl.constexpr, BLOCK_N: tl.constexpr,
                           PER_SPLIT: tl.constexpr):
        row, split = tl.program_id(0), tl.program_id(1)
        bi, h = row // HKV, row % HKV
        g = tl.arange(0, GROUP_P)
        d = tl.arange(0, DIM_P)
        dim = (d < D)[None, :]
        length = tl.load(length_ptr)
        q = _group_queries(q_ptr, bi, h, q_sb, q_sh, G, D, GROUP_P, DIM_P)
        # Base-2 exponents: the scale and log2(e) folded into one factor. Every tile the loop visits starts below
        # length, so each row's running max is finite from the first tile on (padded group rows score 0).
        top = tl.full((GROUP_P,), -float("inf"), tl.float32)
        total = tl.zeros((GROUP_P,), tl.float32)
        acc = tl.zeros((GROUP_P, DIM_P), tl.float32)
        start = split * PER_SPLIT * BLOCK_N
        end = tl.minimum(start + PER_SPLIT * BLOCK_N, length)
        for first in range(start, end, BLOCK_N):
            pos = first + tl.arange(0, BLOCK_N)
            valid = pos < length
            k = tl.load(k_ptr + bi * k_sb + h * k_sh + pos[:, None] * k_sn + d[None, :], mask=valid[:, None] & dim,
                        other=0.0)
            v = tl.load(v_ptr + bi * v_sb + h * v_sh + pos[:, None] * v_sn + d[None, :], mask=valid[:, None] & dim,
                        other=0.0)
            z = tl.where(valid[None, :], tl.dot(q, tl.trans(k)) * (SCALE * 1.4426950408889634), -float("inf"))
            new_top = tl.maximum(top, tl.max(z, 1))
            p = tl.exp2(z - new_top[:, None])
            alpha = tl.exp2(top - new_top)
            total = total * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            top = new_top
        base = row * tl.num_programs(1) + split
        tl.store(partial_ptr + (base * GROUP_P + g)[:, None] * DIM_P + d[None, :], acc)
        tl.store(stats_ptr + base * 2 * GROUP_P + g, top)
        tl.store(stats_ptr + base * 2 * GROUP_P + GROUP_P + g, total)

    @triton.jit
    def _full_combine_kernel(partial_ptr, stats_ptr, out_ptr, gate_ptr, splits, gate_sb, gate_sh, HKV: tl.constexpr,
                             G: tl.constexpr, D: tl.constexpr, GROUP_P: tl.constexpr, DIM_P: tl.constexpr,
                             GATE: tl.constexpr, SPLITS_TILE: tl.constexpr):
        """One query head's output from its row's key ranges, in one pass (a single tile of ranges up to 256 of
        them, else rescaled online as the split kernel does): ranges past the length carry a -inf max and weigh 0;
        the first range always holds key 0, so the overall max is finite."""
        row, head = tl.program_id(0), tl.program_id(1)
        d = tl.arange(0, DIM_P)
        top = -float("inf")
        total = tl.zeros((SPLITS_TILE,), tl.float32)
        acc = tl.zeros((SPLITS_TILE, DIM_P), tl.float32)
        for first in range(0, splits, SPLITS_TILE):
            i = first + tl.arange(0, SPLITS_TILE)
            base = (row * splits + i) * 2 * GROUP_P + head
            m = tl.load(stats_ptr + base, mask=i < splits, other=-float("inf"))
            new_top = tl.maximum(top, tl.max(m, 0))
            alpha = tl.exp2(top - new_top)
            w = tl.exp2(m - new_top)
            total = total * alpha + w * tl.load(stats_ptr + base + GROUP_P, mask=i < splits, other=0.0)
            part = tl.load(partial_ptr + (((row * splits + i) * GROUP_P + head) * DIM_P)[:, None] + d[None, :],
                           mask=(i < splits)[:, None], other=0.0)
            acc = acc * alpha + w[:, None] * part
            top = new_top
        out = tl.sum(acc, 0) / tl.sum(total, 0)
        if GATE:
            out *= _gate(gate_ptr, row // HKV, row % HKV * G + head, gate_sb, gate_sh, True)
        tl.store(out_ptr + (row * G + head) * D + d, out.to(out_ptr.dtype.element_ty), mask=d < D)
