"""The decode-time block selection's Triton kernels (ssa_megatron/hf/decode_select.py), under the Triton interpreter
in float16 (its bf16 ``tl.dot`` is wrong): each selection is the float64 reference's on the same query and pooled
keys, up to float32 rounding (``TIE_RTOL``), and equals the torch path's (``decoding.select_decode_blocks`` on CPU)
block for block. Shapes: GQA groups 1 to 16, head dims that are not powers of two, block counts that are not whole
chunks, fewer candidates than the budget, one chunk and several, both scores."""

import math
from types import SimpleNamespace

import pytest
import torch

from helpers.decoding import TIE_RTOL, selection_gaps
from ssa_megatron.hf import decode_select, decoding

pytestmark = pytest.mark.skipif(decode_select.triton is None, reason="needs triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter (tests/conftest.py)

CASES = [  # b, HQ, HKV, D, blocks in the buffer, length (the new token is at length - 1), config changes
    (2, 4, 2, 16, 20, 250, {}),  # G 2, one chunk
    (1, 16, 1, 64, 300, 4000, dict(ssa_top_k=16)),  # G 16, 3 chunks, the last partial
    (3, 8, 8, 32, 9, 40, {}),  # G 1, 2 candidates against a budget of 4
    (1, 2, 2, 16, 5, 17, {}),  # one candidate, forced as sink
    (2, 32, 2, 64, 140, 2200, dict(ssa_score="dot", ssa_top_k=8)),
    (1, 12, 4, 24, 33, 500, dict(ssa_sink_blocks=0, ssa_local_blocks=0)),  # G 3, D 24: padded in the kernel
    (2, 8, 2, 16, 260, 4100, dict(ssa_top_k=16, ssa_local_blocks=3)),  # 256 candidates in 3 chunks
    (1, 4, 4, 16, 3, 1, {}),  # the first token: no candidate, only the own block
]


@pytest.mark.parametrize("b, hq, hkv, d, n, length, changes", CASES)
def test_kernel_selection_is_the_reference_selection(monkeypatch, b, hq, hkv, d, n, length, changes):
    config = SimpleNamespace(ssa_block_size=16, ssa_top_k=4, ssa_sink_blocks=1, ssa_local_blocks=1,
                             ssa_score="group_softmax")
    for name, value in changes.items():
        setattr(config, name, value)
    gen = torch.Generator().manual_seed(b * 1000 + n)
    q = torch.randn(b, hq, 1, d, generator=gen).half().to(DEVICE)
    pooled = torch.randn(b, hkv, n, d, generator=gen).half().to(DEVICE)
    length = torch.tensor(length, device=DEVICE)
    scale = 1 / math.sqrt(d)
    got = decode_select.select_by_kernels(q, pooled, length, config, scale)
    assert got.shape == (b, hkv, config.ssa_top_k) and got.dtype == torch.int64
    gaps = selection_gaps(got, q, pooled, length, config, scale)
    assert gaps.max() <= TIE_RTOL, gaps.max().item()
    monkeypatch.setattr(decoding, "kernels_select", lambda q, pooled: False)  # on a GPU too: the torch operations
    torch_path = decoding.select_decode_blocks(q, pooled, length, config, scale)
    assert torch.equal(got.sort(-1).values, torch_path.sort(-1).values)


def test_kernel_ties_go_to_the_later_block():
    """Every pooled key equal: all scores tie exactly, so the budget goes to the latest candidates (and the forced
    sink and own blocks)."""
    config = SimpleNamespace(ssa_block_size=16, ssa_top_k=5, ssa_sink_blocks=1, ssa_local_blocks=0,
                             ssa_score="group_softmax")
    q = torch.randn(1, 4, 1, 16).half().to(DEVICE)
    pooled = torch.randn(1, 1, 1, 16).half().expand(1, 1, 200, 16).contiguous().to(DEVICE)
    got = decode_select.select_by_kernels(q, pooled, torch.tensor(150 * 16 + 3, device=DEVICE), config, 0.25)
    assert got.sort(-1).values.tolist() == [[[0, 147, 148, 149, 150]]]


def test_kernels_select_only_cuda_half_precision():
    q, pooled = torch.zeros(1, 2, 1, 16, dtype=torch.float16), torch.zeros(1, 1, 4, 16, dtype=torch.float16)
    assert not decode_select.kernels_select(q, pooled)  # CPU: the torch path
    if torch.cuda.is_available():
        assert decode_select.kernels_select(q.cuda(), pooled.cuda())
        assert not decode_select.kernels_select(q.cuda().float(), pooled.cuda().float())


def test_an_export_does_not_demand_triton():
    """transformers' remote-code check demands every package the copied files import; decode_select.py imports triton
    inside ``try``, which the check skips, so an export loads where triton is missing (``kernels_select`` is then
    false and the torch operations select). decoding.py imports it relatively, so the loader copies it."""
    from transformers.dynamic_module_utils import get_imports, get_relative_imports

    assert "triton" not in get_imports(decode_select.__file__)
    assert "decode_select" in get_relative_imports(decoding.__file__)
