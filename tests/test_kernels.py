"""ssa_kernels vs the reference on CPU, through the Triton interpreter (TRITON_INTERPRET=1), fp32.

Tiny shapes: the interpreter runs programs one after another in Python. Everything is compared to the float64
reference (ssa_megatron.ssa.reference): selection exactly (up to floating-point near-ties, checked by score),
attention outputs, LSE and all gradients.
"""

import importlib
import math
import os
import sys

import pytest
import torch

from helpers.numerics import rel_err

_PREVIOUS = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # Triton reads it when the kernels are decorated (import time)


def _load_kernels():
    """Imports ssa_kernels in interpreter mode (reloads it if a test before us imported it compiled)."""
    import ssa_kernels
    from ssa_kernels import sparse
    if type(sparse._sparse_fwd_kernel).__name__ != "InterpretedFunction":
        for name in ("_common", "_interpreter", "select", "sparse", "full", "gate"):
            importlib.reload(sys.modules[f"ssa_kernels.{name}"])
        importlib.reload(ssa_kernels)
    return ssa_kernels


K = _load_kernels()
from ssa_kernels import full as kfull  # noqa: E402
from ssa_kernels import select as ksel  # noqa: E402
from ssa_megatron.ssa import reference as R  # noqa: E402

# Leave the process environment as we found it for other test modules; our tests set it themselves.
if _PREVIOUS is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _PREVIOUS


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


# ----------------------------------------------------------------------------------------------------------
# Selection


def reference_scores(q, k, block_size, score, sink, local, cu_seqlens, q_positions):
    """The reference's ranking scores [b, HKV, sq, skv] in float64 (+inf forced/own, -inf elsewhere)."""
    q, k = q.double(), k.double()
    sq, b, hq, d = q.shape
    skv = k.shape[0]
    q_pos = R.default_q_positions(q_positions, sq, skv, q.device)
    doc_start = R.document_starts(cu_seqlens, b, skv, q.device)
    k_bar, is_start = R.pool_block_keys(k, doc_start, block_size)
    q_doc = doc_start[:, q_pos]
    own = q_doc + (q_pos - q_doc) // block_size * block_size
    p = torch.arange(skv)
    same_doc = doc_start[:, None, :] == q_doc[:, :, None]
    cand = is_start[:, None, :] & same_doc & (p[None, None, :] < own[:, :, None])
    s = R.block_scores(q, k_bar, cand, score, d ** -0.5)
    forced = (p[None, None, :] < q_doc[:, :, None] + sink * block_size) | (
        p[None, None, :] >= own[:, :, None] - local * block_size)
    s = torch.where(cand[:, None] & forced[:, None], torch.full_like(s, math.inf), s)
    return torch.where((p[None, None, :] == own[:, :, None])[:, None], torch.full_like(s, math.inf), s)


def assert_selection_matches(idx, cnt, q, k, block_size, top_k, score="group_softmax", sink=0, local=0,
                             cu_seqlens=None, q_positions=None, rtol=1e-4):
    ref_idx, ref_cnt = R.select_blocks(q.double(), k.double(), block_size, top_k, score, sink, local,
                                       cu_seqlens, q_positions)
    assert idx.shape == ref_idx.shape and idx.dtype == torch.int32
    assert torch.equal(cnt, ref_cnt), "counts differ"
    # ascending, -1 padded, valid prefix of length counts
    valid = idx >= 0
    assert torch.equal(valid.sum(-1).to(torch.int32), cnt)
    assert torch.equal(valid, torch.arange(top_k)[None, None, None, :] < cnt[..., None]), "valid entries not a prefix"
    assert bool((idx[~valid] == -1).all()), "padding is not -1"
    assert bool(((idx[..., 1:] > idx[..., :-1]) | ~valid[..., 1:]).all()), "not strictly ascending"
    if torch.equal(idx, ref_idx):
        return
    scores = reference_scores(q, k, block_size, score, sink, local, cu_seqlens, q_positions)
    bad = (idx != ref_idx).any(-1).nonzero().tolist()
    for bb, hh, tt in bad:
        ours = set(idx[bb, hh, tt][idx[bb, hh, tt] >= 0].tolist())
        theirs = set(ref_idx[bb, hh, tt][ref_idx[bb, hh, tt] >= 0].tolist())
        sc = scores[bb, hh, tt]
        kth = min(sc[list(theirs)].tolist())
        for p in ours ^ theirs:
            assert math.isfinite(sc[p].item()), f"forced/invalid block {p} differs at {(bb, hh, tt)}"
            assert abs(sc[p].item() - kth) <= rtol * max(1.0, abs(kth)), (
                f"block {p} (score {sc[p].item()}) vs k-th score {kth} at {(bb, hh, tt)}")
    assert len(bad) <= max(2, idx.shape[2] // 20), f"too many near-tie disagreements: {len(bad)}"


SELECT_CASES = [
    # sq, skv, b, hq, hkv, d, bs, top_k, score, sink, local, docs, qpos
    (70, 70, 1, 4, 4, 16, 16, 3, "group_softmax", 0, 0, None, None),      # G=1
    (70, 70, 1, 4, 2, 16, 16, 2, "dot", 0, 0, None, None),                # G=2
    (100, 100, 2, 8, 2, 32, 16, 4, "group_softmax", 0, 0, None, None),    # G=4, b=2
    (60, 60, 1, 16, 1, 16, 16, 3, "group_softmax", 0, 0, None, None),     # G=16
    (60, 60, 1, 16, 1, 16, 16, 3, "dot", 0, 0, None, None),
    (10, 10, 1, 2, 1, 16, 16, 4, "group_softmax", 0, 0, None, None),      # T < one block
    (90, 90, 1, 6, 2, 16, 16, 20, "group_softmax", 0, 0, None, None),     # G=3, budget > available
    (150, 150, 1, 4, 2, 16, 32, 3, "group_softmax", 1, 1, None, None),    # BS 32, sink + local
    (200, 200, 1, 2, 1, 16, 64, 2, "dot", 0, 1, None, None),              # BS 64
    (90, 90, 1, 4, 2, 16, 16, 3, "group_softmax", 1, 0, [0, 30, 77, 90], None),   # documents
    (40, 100, 1, 4, 2, 16, 16, 3, "group_softmax", 0, 0, None, "zigzag"),  # CP query subset
    (40, 100, 2, 4, 2, 16, 16, 3, "dot", 0, 0, [0, 45, 100, 170, 200], "zigzag"),
    (60, 300, 1, 2, 1, 16, 16, 18, "group_softmax", 0, 0, None, None),    # K-1 = 17 -> 32-wide top-k
]


def _qpos(kind, sq, skv):
    if kind is None:
        return None
    half = sq // 2
    return torch.cat([torch.arange(10, 10 + half), torch.arange(skv - (sq - half), skv)])


def select_with(q, k, block_size, top_k, score="group_softmax", sink=0, local=0, cu_seqlens=None,
                q_positions=None, **launch):
    """select_blocks with launch parameters ``launch`` (select_config keys) in place of production's."""
    sel = ksel.prepare_selection(q, k, block_size, top_k, score, sink, local, cu_seqlens, q_positions)
    return ksel.launch_selection(sel, {**ksel.select_config(sel.g, top_k), **launch})


@pytest.mark.parametrize("case", SELECT_CASES)
def test_select_blocks_matches_reference(case):
    sq, skv, b, hq, hkv, d, bs, top_k, score, sink, local, docs, qpos = case
    q = torch.randn(sq, b, hq, d)
    k = torch.randn(skv, b, hkv, d)
    cu = torch.tensor(docs) if docs is not None else None
    qp = _qpos(qpos, sq, skv)
    idx, cnt = K.select_blocks(q, k, bs, top_k, score, sink, local, cu, qp)
    assert_selection_matches(idx, cnt, q, k, bs, top_k, score, sink, local, cu, qp)


TOPK_VARIANTS = [  # the top-k algorithms of the selection kernel, each forced at every budget
    {},                                # what production launches for the budget
    {"BUCKET_R": 0, "FILTER": True},   # streaming, threshold filter: one-by-one insertions and merges
    {"BUCKET_R": 0, "FILTER": False},  # streaming, every chunk merged
    {"BUCKET_R": 8},                   # bucketed, overflowing tiles recomputed
    {"BUCKET_R": 2},                   # bucketed with buckets too small: most tiles recomputed
]


@pytest.mark.parametrize("launch", TOPK_VARIANTS)
@pytest.mark.parametrize("score,top_k", [("group_softmax", 16), ("dot", 5), ("group_softmax", 33)])
def test_select_topk_paths_over_many_chunks(launch, score, top_k):
    """Several chunks of pooled keys per query: every top-k algorithm gives the reference's selection."""
    bs, skv, sq = 4, 4 * 200, 24
    q = torch.randn(sq, 1, 4, 16)
    k = torch.randn(skv, 1, 2, 16)
    qp = torch.cat([torch.arange(300, 300 + sq // 2), torch.arange(skv - sq // 2, skv)])
    idx, cnt = select_with(q, k, bs, top_k, score, 1, 1, q_positions=qp, **launch)
    assert_selection_matches(idx, cnt, q, k, bs, top_k, score, 1, 1, None, qp)


def test_select_bucket_overflow_is_detected_and_recomputed():
    """The bucketed top-k keeps BUCKET_R keys per bucket; when a bucket would have to keep more (here: 2 per bucket
    for a top-15), the bucketed launch alone is wrong, every tile it got wrong is flagged, and the flagged tiles'
    exact recomputation repairs them."""
    bs, skv, sq = 4, 4 * 200, 24
    q = torch.randn(sq, 1, 4, 16)
    k = torch.randn(skv, 1, 2, 16)
    sel = ksel.prepare_selection(q, k, bs, 16)
    launch = {**ksel.select_config(sel.g, 16), "BUCKET_R": 2}
    alone = torch.empty(1, 2, sq, 16, dtype=torch.int32)
    overflow = torch.zeros(2, math.ceil(sq / launch["BQ"]), dtype=torch.int32)
    ksel._launch_select_kernel(sel, launch, alone, torch.empty(1, 2, sq, dtype=torch.int32), overflow)
    idx, cnt = ksel.launch_selection(sel, launch)
    ref, _ = ksel.launch_selection(sel, {**launch, "BUCKET_R": 0})
    wrong = (alone != ref).any(-1)  # [b, HKV, sq]
    flagged = overflow.view(1, 2, -1).repeat_interleave(launch["BQ"], dim=2)[..., :sq].bool()
    assert wrong.any(), "the test needs overflowing buckets"
    assert not (wrong & ~flagged).any(), "a tile that dropped a winner was not flagged"
    assert torch.equal(idx, ref)
    assert_selection_matches(idx, cnt, q, k, bs, 16)


def _exact(*shape):
    """Small integers as float32: every sum of their products is exact, so identical blocks score exactly alike in
    any summation order. With random floats that holds on a GPU, but not in the interpreter, whose ``tl.dot`` is
    numpy's matmul: OpenBLAS's edge micro-kernels round identical columns differently on some CPUs (AVX2 EPYC)."""
    return torch.randint(-3, 4, shape).float()


def test_select_ties_go_to_later_block():
    # identical keys in every block -> all scores tie; the latest blocks must win
    sq, bs = 80, 16
    k = _exact(bs, 1, 1, 16).repeat(sq // bs, 1, 1, 1)
    q = _exact(sq, 1, 2, 16)
    for score in ("group_softmax", "dot"):
        ref, rc = R.select_blocks(q.double(), k.double(), bs, 3, score)
        for launch in TOPK_VARIANTS:
            idx, cnt = select_with(q, k, bs, 3, score, **launch)
            assert torch.equal(idx, ref) and torch.equal(cnt, rc)
    # many tied blocks over several chunks (BS 4: 250 blocks)
    k = _exact(4, 1, 1, 16).repeat(250, 1, 1, 1)
    q = _exact(6, 1, 2, 16)
    ref, rc = R.select_blocks(q.double(), k.double(), 4, 20, "dot")
    for launch in TOPK_VARIANTS:
        idx, cnt = select_with(q, k, 4, 20, "dot", **launch)
        assert torch.equal(idx, ref) and torch.equal(cnt, rc)


def test_select_strided_inputs_and_scale():
    qkv = torch.randn(64, 1, 6, 16)  # fused projection output, sliced: non-contiguous views
    q, k = qkv[:, :, :4], qkv[:, :, 4:6]
    idx, cnt = K.select_blocks(q, k, 16, 2, softmax_scale=0.3)
    ref, rc = R.select_blocks(q.double(), k.double(), 16, 2, softmax_scale=0.3)
    assert torch.equal(idx, ref) and torch.equal(cnt, rc)


# ----------------------------------------------------------------------------------------------------------
# Sparse attention


SPARSE_CASES = [
    # sq, skv, b, hq, hkv, d, bs, top_k, docs, qpos
    (40, 40, 1, 2, 2, 16, 16, 2, None, None),          # G=1
    (45, 45, 1, 4, 2, 32, 16, 2, None, None),          # G=2, awkward T
    (40, 40, 2, 4, 1, 16, 16, 2, None, None),          # G=4, b=2
    (36, 36, 1, 16, 1, 16, 16, 2, None, None),         # G=16
    (30, 30, 1, 3, 1, 16, 16, 2, None, None),          # G=3 (not a power of two)
    (12, 12, 1, 2, 1, 16, 16, 3, None, None),          # T < one block, budget > available
    (70, 70, 1, 2, 1, 16, 32, 2, None, None),          # BS 32
    (60, 60, 1, 2, 1, 64, 16, 3, [0, 25, 60], None),   # documents, D 64
    (30, 64, 1, 4, 2, 16, 16, 2, None, "zigzag"),      # CP query subset
]


@pytest.mark.parametrize("case", SPARSE_CASES)
def test_sparse_attention_forward_backward(case):
    sq, skv, b, hq, hkv, d, bs, top_k, docs, qpos = case
    q = torch.randn(sq, b, hq, d, requires_grad=True)
    k = torch.randn(skv, b, hkv, d, requires_grad=True)
    v = torch.randn(skv, b, hkv, d, requires_grad=True)
    cu = torch.tensor(docs) if docs is not None else None
    qp = _qpos(qpos, sq, skv)
    idx, _ = R.select_blocks(q.detach(), k.detach(), bs, top_k, cu_seqlens=cu, q_positions=qp)
    # what ssa_attention passes: the regular grid without documents, the general one with them
    out, lse = K.sparse_attention(q, k, v, idx, bs, qp, starts_on_grid=docs is None)
    do, dl = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out * do).sum() + (lse * dl).sum(), (q, k, v))
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ro, rl = R.sparse_attention(qd, kd, vd, idx, bs, qp)
    rgrads = torch.autograd.grad((ro * do.double()).sum() + (rl * dl.double()).sum(), (qd, kd, vd))
    assert out.shape == ro.shape and lse.shape == rl.shape and lse.dtype == torch.float32
    for name, a, r in zip(("out", "lse", "dq", "dk", "dv"), (out, lse) + grads, (ro, rl) + rgrads):
        assert rel_err(a, r) < 1e-5, f"{name}: rel err {rel_err(a, r)}"


def test_sparse_backward_grid_hint_gives_the_same_gradients():
    """starts_on_grid: True (regular grid), False (general grid, what documents use) and None (checked) agree on a
    table without documents, bitwise."""
    q, k, v = (torch.randn(70, 1, h, 16, requires_grad=True) for h in (4, 2, 2))
    idx, _ = R.select_blocks(q.detach(), k.detach(), 16, 3)
    do = torch.randn(70, 1, 4, 16)
    grads = [torch.autograd.grad((K.sparse_attention(q, k, v, idx, 16, starts_on_grid=hint)[0] * do).sum(),
                                 (q, k, v)) for hint in (True, False, None)]
    for other in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], other))


def test_sparse_attention_strided_fp16_and_scale():
    qkv = torch.randn(40, 1, 8, 16)
    q, k, v = (x.half().requires_grad_() for x in (qkv[:, :, :4], qkv[:, :, 4:6], qkv[:, :, 6:8]))
    idx, _ = R.select_blocks(q.detach().double(), k.detach().double(), 16, 2)
    out, lse = K.sparse_attention(q, k, v, idx, 16, softmax_scale=0.2)
    ro, rl = R.sparse_attention(q.double(), k.double(), v.double(), idx, 16, softmax_scale=0.2)
    assert out.dtype == torch.float16
    assert rel_err(out, ro) < 2e-3 and rel_err(lse, rl) < 1e-3
    (out.float().square().sum()).backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def _sparse_grads_vs_reference(q, k, v, idx, bs, qp, leaves, use_out=True, use_lse=True):
    """Kernel vs float64 reference on the same (possibly strided) views of ``leaves``: out, lse and the leaves'
    gradients of <out, dO> + <lse, dL> (either term can be left out: its gradient reaches the kernel as None)."""
    def loss(o, lse, do, dl):
        return (o * do).sum() * use_out + (lse * dl).sum() * use_lse

    out, lse = K.sparse_attention(q, k, v, idx, bs, qp)
    do, dl = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad(loss(out, lse, do, dl), leaves)
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    by_leaf = dict(zip(map(id, leaves), ref_leaves))
    views = [by_leaf[id(x)] if id(x) in by_leaf else None for x in (q, k, v)]
    if None in views:  # q/k/v are views of one fused leaf: take the same views of its float64 copy
        fused = ref_leaves[0]
        hq, hkv = q.shape[2], k.shape[2]
        views = [fused[:, :, :hq], fused[:, :, hq:hq + hkv], fused[:, :, hq + hkv:]]
    ro, rl = R.sparse_attention(*views, idx, bs, qp)
    rgrads = torch.autograd.grad(loss(ro, rl, do.double(), dl.double()), ref_leaves)
    for name, a, r in zip(("out", "lse", "grad 0", "grad 1", "grad 2"), (out, lse) + grads, (ro, rl) + rgrads):
        assert rel_err(a, r) < 1e-5, f"{name}: rel err {rel_err(a, r)}"


def test_sparse_attention_strided_views_gradients():
    """q, k, v as views of one fused projection (non-contiguous in every dim but the last): dQ is written in its
    own layout (it once used q's strides, writing outside dQ)."""
    fused = torch.randn(40, 1, 8, 16, requires_grad=True)
    q, k, v = fused[:, :, :4], fused[:, :, 4:6], fused[:, :, 6:8]
    idx, _ = R.select_blocks(q.detach().double(), k.detach().double(), 16, 2)
    _sparse_grads_vs_reference(q, k, v, idx, 16, None, [fused])


@pytest.mark.parametrize("use_out,use_lse", [(True, False), (False, True)])
def test_sparse_attention_one_output_used(use_out, use_lse):
    """Only out (dLSE arrives as None) or only lse (dO arrives as None) in the loss, queries the last sq of skv
    keys without q_positions (the kernels compute the default positions)."""
    q = torch.randn(24, 1, 4, 16, requires_grad=True)
    k, v = (torch.randn(50, 1, 2, 16, requires_grad=True) for _ in range(2))
    idx, _ = R.select_blocks(q.detach().double(), k.detach().double(), 16, 2)
    _sparse_grads_vs_reference(q, k, v, idx, 16, None, [q, k, v], use_out, use_lse)
    explicit = K.sparse_attention(q, k, v, idx, 16, torch.arange(26, 50))
    assert all(torch.equal(a, b) for a, b in zip(K.sparse_attention(q, k, v, idx, 16), explicit))


def test_sparse_attention_table_with_unused_slots():
    """Unused (-1) slots before, between and after the used ones, rows holding only their own block, and a budget
    that is not a power of two (K = 5): the kernels read each row's used-slot count from the table itself."""
    q, k, v = (torch.randn(48, 1, h, 16, requires_grad=True) for h in (4, 2, 2))
    own = torch.arange(48, dtype=torch.int32) // 16 * 16
    idx = torch.full((1, 2, 48, 5), -1, dtype=torch.int32)
    idx[0, 0, :, 4] = own  # head 0: own block in the last slot,
    idx[0, 0, 20:, 1] = 0  # block 0 in slot 1 from query 20 on (slots 0, 2, 3 unused)
    idx[0, 1, :, 0] = own  # head 1: own block in slot 0, slots 1-4 unused,
    idx[0, 1, 40:, 2] = 16  # block 16 in slot 2 for the last block's queries (slot 1 unused between)
    _sparse_grads_vs_reference(q, k, v, idx, 16, None, [q, k, v])


def test_reverse_index_is_complete_and_ordered():
    idx = torch.tensor([[[[0, 16, -1], [16, -1, -1], [0, 32, 48]],
                         [[0, -1, -1], [0, 16, -1], [16, 48, -1]]]], dtype=torch.int32)  # [1, 2, 3, 3]
    rptr, ridx = K.build_reverse_index(idx, 64)
    def entries(h, p):
        row = h * 64 + p
        return ridx[rptr[row]:rptr[row + 1]].tolist()
    assert entries(0, 0) == [0, 2] and entries(0, 16) == [0, 1] and entries(0, 32) == [2]
    assert entries(1, 0) == [0, 1] and entries(1, 16) == [1, 2] and entries(1, 48) == [2]
    assert entries(0, 1) == [] and int(rptr[-1]) == int((idx >= 0).sum())


# ----------------------------------------------------------------------------------------------------------
# Full attention (CPU path, and the varlen packing used on GPU, with a varlen attention from the reference)


def varlen_by_reference(qf, kf, vf, cu_q, cu_k, max_q, max_k, softmax_scale, causal, return_attn_probs):
    """``flash_attn_varlen_func``'s contract (per sequence: causal, bottom-right aligned; ``lse [h, total_q]``),
    computed with the reference in float64: stands in for the flash kernel the packing feeds on a GPU."""
    assert causal and return_attn_probs
    outs, lses = [], []
    for s in range(len(cu_q) - 1):
        q_rows, k_rows = slice(int(cu_q[s]), int(cu_q[s + 1])), slice(int(cu_k[s]), int(cu_k[s + 1]))
        qs, ks, vs = qf[q_rows], kf[k_rows], vf[k_rows]
        nq, nk = qs.shape[0], ks.shape[0]
        out, lse = R.full_attention(qs[:, None].double(), ks[:, None].double(), vs[:, None].double(),
                                    q_positions=torch.arange(nk - nq, nk), softmax_scale=softmax_scale)
        outs.append(out[:, 0].to(qf.dtype))
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1), None


@pytest.mark.parametrize("docs", [None, [0, 20, 50, 77, 100]])
@pytest.mark.parametrize("qpos", [None, "zigzag", "random"])
def test_full_attention_paths(docs, qpos, monkeypatch):
    q, k, v = torch.randn(30, 2, 4, 16), torch.randn(50, 2, 2, 16), torch.randn(50, 2, 2, 16)
    cu = torch.tensor(docs) if docs is not None else None
    qp = {"zigzag": _qpos("zigzag", 30, 50), "random": torch.randint(0, 50, (30,)), None: None}[qpos]
    ro, rl = R.full_attention(q.double(), k.double(), v.double(), cu, qp)
    o, lse = K.full_attention(q, k, v, cu, qp)
    assert rel_err(o, ro) < 1e-5 and rel_err(lse, rl) < 1e-5
    pos = qp if qp is not None else torch.arange(20, 50)
    monkeypatch.setattr(kfull, "_fa_varlen", varlen_by_reference)
    o2, l2 = kfull._flash_varlen(q, k, v, cu, pos, 16 ** -0.5)
    assert rel_err(o2, ro) < 1e-5 and rel_err(l2, rl) < 1e-5


@pytest.mark.parametrize("seed", range(4))
def test_varlen_runs_cover_every_query_once_and_are_maximal(seed):
    g = torch.Generator().manual_seed(seed)
    b, skv, sq = 2, 64, 40
    cu = torch.unique(torch.cat([torch.tensor([0, skv, 2 * skv]), torch.randint(0, 2 * skv, (5,), generator=g)]))
    if seed % 2:  # zigzag-like chunks with a few isolated positions
        pos = torch.cat([torch.arange(0, 16), torch.arange(40, 60), torch.randint(0, skv, (4,), generator=g)])
    else:
        pos = torch.randint(0, skv, (sq,), generator=g)
    runs = kfull._runs(cu, pos, b, skv)
    for r in range(b):
        bounds = [int(c) - r * skv for c in cu if r * skv <= int(c) < (r + 1) * skv]
        doc_start = [max(x for x in bounds if x <= int(p)) for p in pos]
        covered = []
        for rr, i, n, ks, ke in runs:
            if rr != r:
                continue
            covered += range(i, i + n)
            seg = [int(p) for p in pos[i:i + n]]
            assert seg == list(range(seg[0], seg[0] + n)) and ke == seg[-1] + 1  # consecutive, keys up to the last
            assert all(doc_start[j] == ks for j in range(i, i + n))  # one document, keys from its start
            if i + n < len(pos):  # maximal: the next query breaks the run
                assert int(pos[i + n]) != seg[-1] + 1 or doc_start[i + n] != ks
        assert sorted(covered) == list(range(len(pos)))


def test_varlen_plan_is_made_once_per_layout(monkeypatch):
    """Layers of one micro-batch pass the same cu_seqlens / q_positions objects: the host-side plan (which waits
    for the GPU) is made once; another object or an in-place change makes a new one."""
    calls = []
    runs = kfull._runs
    monkeypatch.setattr(kfull, "_runs", lambda *a: calls.append(1) or runs(*a))
    monkeypatch.setattr(kfull, "_PLANS", [])
    monkeypatch.setattr(kfull, "_fa_varlen", varlen_by_reference)
    q, k, v = torch.randn(30, 2, 4, 16), torch.randn(50, 2, 2, 16), torch.randn(50, 2, 2, 16)
    cu, qp = torch.tensor([0, 20, 50, 77, 100]), _qpos("zigzag", 30, 50)

    def layer(positions):
        return kfull._flash_varlen(q, k, v, cu, positions.int(), 0.25, q_positions=positions, cached=True)

    first = layer(qp)
    for _ in range(3):
        again = layer(qp)
    assert len(calls) == 1 and all(torch.equal(a, b) for a, b in zip(first, again))
    ro, rl = R.full_attention(q.double(), k.double(), v.double(), cu, qp, 0.25)
    assert rel_err(first[0], ro) < 1e-5 and rel_err(first[1], rl) < 1e-5
    layer(qp.clone())  # another tensor with equal values: planned again (identity, not value)
    qp.add_(0)  # in place: a new version
    layer(qp)
    assert len(calls) == 3


# ----------------------------------------------------------------------------------------------------------
# End to end through ssa_attention (backend='triton' under the interpreter) vs backend='reference'


def test_float64_is_refused_by_the_kernels_and_routed_to_the_reference():
    from ssa_megatron.ssa.attention import get_backend
    q, k, v = (torch.randn(20, 1, 2, 16, dtype=torch.float64) for _ in range(3))
    with pytest.raises(ValueError, match=r"q.dtype=torch.float64: ssa_kernels support float16, bfloat16 and float32"):
        K.select_blocks(q, k, 16, 1)
    with pytest.raises(ValueError, match="must share a dtype"):
        K.sparse_attention(q.float(), k.float(), v.half(), torch.zeros(1, 2, 20, 1, dtype=torch.int32), 16)
    with pytest.raises(ValueError, match=r"ssa.backend='triton' takes float16, bfloat16 or float32 inputs"):
        get_backend("triton", torch.device("cpu"), torch.float64)
    assert get_backend("auto", torch.device("cuda"), torch.float64) is R  # even where the kernels would run


def test_ssa_attention_triton_backend_matches_reference():
    from ssa_megatron.config import SSAConfig
    from ssa_megatron.ssa.attention import get_backend, ssa_attention
    assert get_backend("triton", torch.device("cpu")) is K
    cfg_t = SSAConfig(block_size=16, top_k=2, backend="triton")
    cfg_r = SSAConfig(block_size=16, top_k=2, backend="reference")
    q = torch.randn(40, 1, 4, 16, requires_grad=True)
    k = torch.randn(40, 1, 2, 16, requires_grad=True)
    v = torch.randn(40, 1, 2, 16, requires_grad=True)
    gate = torch.randn(40, 1, 4, requires_grad=True)
    res = {}
    for name, cfg in (("t", cfg_t), ("r", cfg_r)):
        out, loss, _ = ssa_attention(q, k, v, gate, cfg, "sparse", training=True)
        g = torch.autograd.grad(out.square().sum() + loss, (q, k, v, gate))
        res[name] = (out, loss) + g
    for a, r in zip(res["t"], res["r"]):
        assert rel_err(a, r) < 1e-4


# ----------------------------------------------------------------------------------------------------------
# Fused gate + alignment loss vs reference.apply_gate + reference.alignment_loss (values and every gradient)


def _gate_align_reference(of, os_, gate, beta, mode):
    gf, gs = R.apply_gate(of, gate), R.apply_gate(os_, gate)
    total, sp, cm = R.alignment_loss(gf, gs, beta)
    return (gf if mode == "full" else gs), total, sp, cm


@pytest.mark.parametrize("mode", ["sparse", "full"])
@pytest.mark.parametrize("beta,shape,with_gate,strided", [
    (1.0, (37, 2, 3, 16), True, False),     # rows not a multiple of the row tile
    (0.05, (20, 1, 4, 64), True, True),     # small beta: both SmoothL1 regimes; permuted (non-contiguous) inputs
    (0.0, (9, 1, 2, 24), True, False),      # beta 0 = L1; D not a power of two
    (1.0, (16, 1, 2, 32), False, False),    # no gate
])
def test_gate_and_align_matches_reference(mode, beta, shape, with_gate, strided):
    sq, b, hq, d = shape
    def make(scale):
        if strided:  # as the full branch returns it: a permuted view of [b, HQ, sq, D]
            return (scale * torch.randn(b, hq, sq, d)).permute(2, 0, 1, 3).requires_grad_()
        return (scale * torch.randn(sq, b, hq, d)).requires_grad_()
    of = make(1.0)
    os_ = (of.detach() + make(0.1 if beta else 1.0).detach()).requires_grad_()  # close: mixed |r| < beta, > beta
    gate = (2 * torch.randn(sq, b, hq)).requires_grad_() if with_gate else None
    y, total, term = K.gate_and_align(of, os_, gate, beta, mode)
    leaves = [of, os_] + ([gate] if with_gate else [])
    dy, dl = torch.randn(sq, b, hq, d), torch.rand(()) + 0.5
    grads = torch.autograd.grad((y * dy).sum() + dl * total, leaves)
    dd = [x.detach().double().requires_grad_() for x in leaves]
    ry, rtotal, rsp, rcm = _gate_align_reference(dd[0], dd[1], dd[2] if with_gate else None, beta, mode)
    rgrads = torch.autograd.grad((ry * dy.double()).sum() + dl.double() * rtotal, dd)
    assert y.dtype == of.dtype and total.dtype == torch.float32 and total.dim() == 0
    assert rel_err(y, ry) < 1e-6
    assert abs(total.item() - rtotal.item()) <= 1e-5 * abs(rtotal.item())
    assert abs(term.item() - rsp.item()) <= 1e-5 * abs(rsp.item()) and not term.requires_grad
    for name, a, r in zip(("d_full", "d_sparse", "d_gate"), grads, rgrads):
        assert rel_err(a, r) < 1e-5, f"{name}: rel err {rel_err(a, r)}"


def test_gate_and_align_stop_gradients():
    """Loss only: d o_full gets only the sparsity term, d o_sparse only the commitment term (opposite signs)."""
    of = torch.randn(12, 1, 2, 16, requires_grad=True)
    os_ = torch.randn(12, 1, 2, 16, requires_grad=True)
    gate = torch.randn(12, 1, 2, requires_grad=True)
    _, total, _ = K.gate_and_align(of, os_, gate, 1.0, "sparse")
    gf, gs, gg = torch.autograd.grad(total, (of, os_, gate))
    sig = torch.sigmoid(gate.detach())[..., None]
    r = (of - os_).detach() * sig
    dr = torch.where(r.abs() < 1, r, r.sign()) / r.numel()
    assert rel_err(gf, dr * sig) < 1e-5 and rel_err(gs, -dr * sig) < 1e-5
    dsig = (dr * (of - os_).detach()).sum(-1)
    assert rel_err(gg, dsig * sig[..., 0] * (1 - sig[..., 0])) < 1e-5


def test_gate_and_align_half_precision_rounding():
    """fp16 outputs with a float32 gate: the gated output rounds as the reference's product does."""
    of, os_ = torch.randn(8, 1, 2, 16).half(), torch.randn(8, 1, 2, 16).half()
    gate = torch.randn(8, 1, 2)
    for mode in ("full", "sparse"):
        y, total, _ = K.gate_and_align(of, os_, gate, 1.0, mode)
        ry, rtotal, _, _ = _gate_align_reference(of, os_, gate, 1.0, mode)
        assert y.dtype == torch.float16 and torch.equal(y, ry)
        assert abs(total.item() - rtotal.item()) <= 1e-5 * abs(rtotal.item())


def test_ssa_attention_fused_gate_path_matches_reference_stats():
    from ssa_megatron.config import SSAConfig
    from ssa_megatron.ssa import attention as A
    q, k, v = torch.randn(40, 1, 4, 16), torch.randn(40, 1, 2, 16), torch.randn(40, 1, 2, 16)
    gate = torch.randn(40, 1, 4)
    res = {}
    for name, backend in (("t", "triton"), ("r", "reference")):
        cfg = SSAConfig(block_size=16, top_k=2, backend=backend, smooth_l1_beta=0.5)
        out, loss, stats = A.ssa_attention(q, k, v, gate, cfg, "full", training=True)
        res[name] = (out, loss, stats.sparsity_loss, stats.commitment_loss)
    for a, r in zip(res["t"], res["r"]):
        assert rel_err(a, r) < 1e-5
    assert A._fused_gate_loss(K, q) and not A._fused_gate_loss(R, q)
