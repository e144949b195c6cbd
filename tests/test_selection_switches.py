"""The selection switches of issue 18 against the brute force: ``selection: authors_chunked`` (the authors' chunked
top-k) and ``normaliser: authors`` (their group-softmax normaliser), in the reference and in the Triton kernel."""

from __future__ import annotations

import random
import zlib

import pytest
import torch

from brute_force import brute_force
from ssa_megatron.config import SSAConfig
from ssa_megatron.ssa import reference as R
from ssa_megatron.ssa import ssa_attention
from test_reference import random_cu_seqlens

# (s, b, HQ, HKV, D, block_size, top_k, score, docs, n_queries). Chunks are block_size blocks, so small blocks
# give many chunks on short sequences.
CASES = [
    (61, 2, 4, 4, 8, 4, 4, "group_softmax", False, None),   # G=1, T not a multiple of the block, 3 chunks
    (70, 1, 8, 2, 8, 4, 3, "dot", False, None),             # G=4, dot score, budget below the chunk
    (5, 1, 4, 2, 4, 8, 8, "group_softmax", False, None),    # T smaller than one block
    (45, 1, 16, 1, 4, 2, 2, "group_softmax", False, None),  # G=16, chunks of 2 blocks (keeps 1 + own)
    (40, 1, 8, 1, 8, 8, 8, "group_softmax", False, None),   # G=8, fewer blocks (5) than the budget
    (67, 2, 8, 2, 8, 4, 4, "group_softmax", True, None),    # several documents per row, own grids
    (64, 1, 4, 2, 8, 4, 4, "group_softmax", True, 20),      # documents + a subset of queries (CP positions)
]
SWITCHES = [("authors_chunked", "earlier_blocks"), ("exact", "authors"), ("authors_chunked", "authors")]


def _inputs(case, dtype=torch.float64):
    s, b, hq, hkv, d, bs, top_k, score, docs, n_queries = case
    rng = random.Random(zlib.crc32(str(case).encode()))  # not hash(): str hashes change with every process
    torch.manual_seed(rng.randint(0, 10**6))
    k = torch.randn(s, b, hkv, d, dtype=dtype)
    q_positions, sq = None, s
    if n_queries is not None:
        q_positions = torch.tensor(sorted(rng.sample(range(s), n_queries)))
        sq = n_queries
    q = torch.randn(sq, b, hq, d, dtype=dtype) * 2
    cu = random_cu_seqlens(rng, b, s, 4) if docs else None
    return q, k, cu, q_positions


def _as_sets(idx):
    return [[[sorted(x for x in row if x >= 0) for row in head] for head in batch] for batch in idx.tolist()]


@pytest.mark.parametrize("selection, normaliser", SWITCHES)
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_reference_switches_match_brute_force(case, selection, normaliser):
    q, k, cu, qp = _inputs(case)
    bs, top_k, score = case[5], case[6], case[7]
    cfg = dict(block_size=bs, top_k=top_k, score=score, sink_blocks=0, local_blocks=0, selection=selection,
               normaliser=normaliser)
    sets, _, _ = brute_force(q, k, k, cfg, cu, qp)
    idx, counts = R.select_blocks(q, k, bs, top_k, score, 0, 0, cu, qp, selection=selection, normaliser=normaliser)
    assert _as_sets(idx) == sets
    assert counts.tolist() == [[[len(x) for x in head] for head in batch] for batch in sets]


def _counts_at_paper_setting(select_blocks, dtype):
    """BS 16, K 16 on random inputs, 4 chunks of 256 tokens: counts of the tokens past the first chunk."""
    torch.manual_seed(0)
    s = 16 * 16 * 4
    q = torch.randn(s, 1, 4, 16, dtype=dtype)
    k = torch.randn(s, 1, 2, 16, dtype=dtype)
    _, exact = select_blocks(q, k, 16, 16)
    idx, chunked = select_blocks(q, k, 16, 16, selection="authors_chunked")
    return idx, exact[..., 256:], chunked[..., 256:]


def test_authors_chunked_keeps_9_to_16_blocks_mean_14_25():
    idx, exact, chunked = _counts_at_paper_setting(R.select_blocks, torch.float32)
    assert bool((exact == 16).all())
    assert chunked.min() == 9 and chunked.max() == 16
    assert chunked.double().mean().item() == 14.25
    # the count follows the own block's place r in its 16-block chunk: 8 older + own + min(r, 7)
    r = torch.arange(256, 1024) // 16 % 16
    assert torch.equal(chunked[0, 0], (9 + r.clamp(max=7)).to(torch.int32))


def test_authors_normaliser_changes_only_the_last_token_of_each_block():
    torch.manual_seed(1)
    q = torch.randn(128, 1, 8, 8, dtype=torch.float64)
    k = torch.randn(128, 1, 2, 8, dtype=torch.float64)
    ours, _ = R.select_blocks(q, k, 4, 3)
    authors, _ = R.select_blocks(q, k, 4, 3, normaliser="authors")
    last = torch.arange(128) % 4 == 3
    assert torch.equal(ours[..., ~last, :], authors[..., ~last, :])
    assert not torch.equal(ours[..., last, :], authors[..., last, :])


def test_bad_switch_values_raise_one_line():
    q = torch.randn(32, 1, 2, 8)
    k = torch.randn(32, 1, 1, 8)
    for kwargs, needle in [(dict(selection="chunked"), "selection='chunked'"),
                           (dict(normaliser="nsa"), "normaliser='nsa'"),
                           (dict(selection="authors_chunked", sink_blocks=1), "sink_blocks=1"),
                           (dict(selection="authors_chunked", top_k=8), "top_k=8 exceeds block_size=4")]:
        kwargs = {"top_k": 2, **kwargs}
        with pytest.raises(ValueError, match=needle):
            R.select_blocks(q, k, 4, **kwargs)
    with pytest.raises(ValueError, match=r"ssa.selection='authors_chunked' keeps at most block_size blocks"):
        SSAConfig(selection="authors_chunked", inference_top_k=32).validate()


def test_ssa_attention_runs_the_switches():
    torch.manual_seed(2)
    q = torch.randn(96, 1, 4, 8, dtype=torch.float64)
    k, v = torch.randn(2, 96, 1, 2, 8, dtype=torch.float64)
    cfg = SSAConfig(block_size=16, top_k=3, selection="authors_chunked", normaliser="authors", alpha=0.0)
    out, _, _ = ssa_attention(q, k, v, None, cfg, "sparse", training=False)
    idx, _ = R.select_blocks(q, k, 16, 3, selection="authors_chunked", normaliser="authors")
    want, _ = R.sparse_attention(q, k, v, idx, 16)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
