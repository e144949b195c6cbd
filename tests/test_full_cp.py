"""The full branch's split path for query runs (``ssa_kernels.full._split_attention``), on CPU in float64.

On a GPU each run of queries [a, e) is attended as a cuDNN prefix piece (keys [0, a)) and a cuDNN diagonal piece
(keys [a, e), causal), merged by log-sum-exp; the backward hands each piece the merged output and log-sum-exp.
cuDNN does not exist on CPU, so an exact float64 implementation of the piece contract (``EXACT_PIECES``,
tests/helpers/pieces.py) stands in for it here, and the split + merge + backward is compared with the reference's
full attention: outputs, LSE and all gradients, for context parallelism's zigzag layouts and other run layouts.
"""

import pytest
import torch

from helpers.numerics import rel_err
from helpers.pieces import EXACT_PIECES
from ssa_kernels import full as kfull
from ssa_megatron.megatron.context_parallel import zigzag_positions
from ssa_megatron.ssa import reference as R


def _check_split(sq, skv, b, hq, hkv, d, positions, runs, scale=None):
    """Split path (float64 pieces) vs the reference: out, lse, and dq/dk/dv through K/V gathered as one tensor
    (the CP exchange's layout: k and v are halves of the last dimension)."""
    q = torch.randn(sq, b, hq, d, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(skv, b, hkv, 2 * d, dtype=torch.float64, requires_grad=True)
    k, v = kv[..., :d], kv[..., d:]
    scale = d ** -0.5 if scale is None else scale
    out, lse = kfull._split_attention(q, k, v, runs, scale, EXACT_PIECES)
    do = torch.randn_like(out)
    grads = torch.autograd.grad((out * do).sum(), (q, kv))
    ro, rl = R.full_attention(q, k, v, None, positions, scale)
    rgrads = torch.autograd.grad((ro * do).sum(), (q, kv))
    assert out.shape == ro.shape and lse.shape == rl.shape and not lse.requires_grad
    for name, a, r in zip(("out", "lse", "dq", "dkv"), (out, lse) + grads, (ro, rl) + rgrads):
        assert rel_err(a, r) < 1e-12, f"{name}: rel err {rel_err(a, r)}"


def _split_runs(positions, skv, b=1):
    return kfull._VarlenPlan(None, positions, b, skv, "cpu").split_runs


# C = 131 tokens per chunk (prime, above the 128-token minimum run): T = 524 (cp 2) or 786 (cp 3)
@pytest.mark.parametrize("cp,rank", [(2, 0), (2, 1), (3, 0), (3, 1), (3, 2)])
@pytest.mark.parametrize("hq,hkv,d,b", [(4, 4, 64, 1), (8, 2, 128, 2), (16, 1, 64, 1), (6, 2, 128, 1)])
def test_split_matches_reference_on_zigzag(cp, rank, hq, hkv, d, b):
    c = 131
    pos = zigzag_positions(2 * c, cp, rank)
    runs = _split_runs(pos, 2 * cp * c, b)
    # chunks r and 2cp-1-r: two runs, one where they touch (the last rank)
    expected = ([(0, 2 * c, (cp + 1) * c)] if rank == cp - 1
                else [(0, c, (rank + 1) * c), (c, c, (2 * cp - rank) * c)])
    assert runs == tuple(expected)
    _check_split(2 * c, 2 * cp * c, b, hq, hkv, d, pos, runs)


@pytest.mark.parametrize("layout", ["last_sq", "keys_past_queries", "from_zero", "four_runs"])
def test_split_matches_reference_on_other_runs(layout):
    skv = 700
    pos = {
        "last_sq": torch.arange(700 - 257, 700),  # default positions of sq < skv (one run, a > 0)
        "keys_past_queries": torch.cat([torch.arange(130, 290), torch.arange(400, 533)]),  # keys 533.. unused
        "from_zero": torch.arange(0, 300),  # one diagonal piece, no prefix
        "four_runs": torch.cat([torch.arange(0, 128), torch.arange(150, 290), torch.arange(300, 450),
                                torch.arange(560, 700)]),
    }[layout]
    runs = _split_runs(pos, skv)
    assert runs is not None and sum(n for _, n, _ in runs) == len(pos)
    _check_split(len(pos), skv, 1, 8, 2, 64, pos if layout != "last_sq" else None, runs, scale=0.1)


def test_split_path_applies_only_to_few_long_runs_without_documents():
    skv = 1024
    zigzag = zigzag_positions(512, 2, 0)
    assert _split_runs(zigzag, skv) == ((0, 256, 256), (256, 256, 1024))
    docs = torch.tensor([0, 300, 1024])
    assert kfull._VarlenPlan(docs, zigzag, 1, skv, "cpu").split_runs is None  # documents: varlen FA2
    short = torch.cat([torch.arange(0, 256), torch.arange(400, 400 + kfull._SPLIT_MIN_RUN - 1)])
    assert _split_runs(short, skv) is None  # a run shorter than one cuDNN query tile
    many = torch.cat([torch.arange(s, s + 128) for s in range(0, 1024, 200)])  # 6 runs
    assert _split_runs(many, skv) is None
    assert _split_runs(torch.arange(1023, 1024), skv) is None  # one query (decoding)


@pytest.mark.parametrize("cp,rank", [(2, 0), (2, 1), (3, 1)])
def test_diagonal_from_own_keys_then_prefix(cp, rank, monkeypatch):
    """The context-parallel order: ``full_attention_diagonal`` on the rank's own K/V (what it holds before the
    gather lands), then ``full_attention(..., diagonal=)`` on the whole sequence's; vs the reference, with the
    gradient reaching the keys by both routes (own rows directly, the whole sequence through the gather).
    float32: the kernels' entry points take no float64 (the pieces still compute exactly in their dtype)."""
    from ssa_megatron.megatron.context_parallel import split_zigzag

    monkeypatch.setattr(kfull, "_piece_kernel", lambda q: EXACT_PIECES)
    c, b, hq, hkv, d = 131, 1, 8, 2, 64
    q = torch.randn(2 * c, b, hq, d, requires_grad=True)
    k_all, v_all = (torch.randn(2 * cp * c, b, hkv, d, requires_grad=True) for _ in range(2))
    pos = zigzag_positions(2 * c, cp, rank)
    k_own, v_own = (split_zigzag(t, cp, rank) for t in (k_all, v_all))
    diag = kfull.full_attention_diagonal(q, k_own, v_own, None, pos)
    assert diag is not None and diag.runs == _split_runs(pos, 2 * cp * c, b)
    out, lse = kfull.full_attention(q, k_all, v_all, None, pos, diagonal=diag)
    do = torch.randn_like(out)
    grads = torch.autograd.grad((out * do).sum(), (q, k_all, v_all))
    leaves = [t.detach().double().requires_grad_() for t in (q, k_all, v_all)]
    ro, rl = R.full_attention(*leaves, None, pos)
    rgrads = torch.autograd.grad((ro * do.double()).sum(), leaves)
    for name, a, r in zip(("out", "lse", "dq", "dk", "dv"), (out, lse) + grads, (ro, rl) + rgrads):
        assert rel_err(a, r) < 1e-5, f"{name}: rel err {rel_err(a, r)}"
    assert kfull.full_attention_diagonal(q, k_own, v_own, torch.tensor([0, 2 * cp * c]), pos) is None  # documents
