"""tools/bench_attention.py's fla peer on CPU: our selection table converted to fla's NSA layout (``fla_table``) gives
fla's naive selected-block attention the same output and gradients as our sparse kernel (Triton interpreter, fp32),
so the fla_nsa rows time the identical problem; off-grid starts and shapes outside fla's limits are named in one
line. fla's Triton kernels need CUDA; the benchmark compares them with ours on the GPU before timing."""

import pytest
import torch

import ssa_kernels as K
from helpers.numerics import rel_err
from helpers.tools import load_tool



@pytest.fixture(scope="module")
def bench():
    return load_tool("bench_attention")


@pytest.mark.parametrize("block_size,top_k", [(16, 3), (32, 2)])
def test_converted_table_gives_fla_the_same_attention(bench, block_size, top_k):
    naive = pytest.importorskip("fla.ops.nsa.naive", reason="fla-core is not installed (the 'nsa' extra)")
    t, hq, hkv, d = 128, 8, 2, 16
    q, k, v = (torch.randn(t, 1, h, d, requires_grad=True) for h in (hq, hkv, hkv))
    idx, counts = K.select_blocks(q.detach(), k.detach(), block_size, top_k)
    # a table worth checking: -1 padding in the first blocks, fewer slots than earlier blocks later on, and the two
    # KV heads choosing differently (a head mix-up in the conversion would show)
    assert bool((idx < 0).any()) and int(counts.max()) == top_k < t // block_size
    assert not torch.equal(idx[0, 0], idx[0, 1])

    table, nblk = bench.fla_table(idx, counts, block_size)
    s = 1 << (top_k - 1).bit_length()
    assert table.shape == (1, t, hkv, s) and table.dtype == torch.int32 and nblk.shape == (1, t, hkv)
    assert bool((table[..., top_k:] == -1).all())

    do = torch.randn(t, 1, hq, d)
    ours = K.sparse_attention(q, k, v, idx, block_size)[0]
    g_ours = torch.autograd.grad(ours, (q, k, v), do)
    qf, kf, vf = (x.detach().transpose(0, 1).requires_grad_() for x in (q, k, v))
    fla = naive.naive_nsa_selection(qf, kf, vf, table, block_size, d ** -0.5)
    g_fla = torch.autograd.grad(fla, (qf, kf, vf), do.transpose(0, 1))
    assert rel_err(fla.transpose(0, 1), ours) < 1e-5
    for a, b in zip(g_fla, g_ours):
        assert rel_err(a.transpose(0, 1), b) < 1e-5


def test_off_grid_starts_are_named(bench):
    idx = torch.tensor([[[[0, 16, -1], [0, 24, -1]]]], dtype=torch.int32)
    counts = torch.tensor([[[2, 2]]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"^block_idx: start 24 is not a multiple of block_size=16; "):
        bench.fla_table(idx, counts, 16)


def test_fla_limits(bench):
    assert bench.fla_limits(32, 2, 64) is None and bench.fla_limits(32, 1, 128) is None
    for hq, hkv in ((32, 8), (48, 2), (30, 2)):
        assert bench.fla_limits(hq, hkv, 64) == (f"HQ/HKV = {hq}/{hkv}: fla-core's NSA kernels need a group of a "
                                                 f"power of two >= 16 query heads")
    assert bench.fla_limits(32, 2, 512) == "D = 512: fla-core's NSA forward takes head dims up to 256"
