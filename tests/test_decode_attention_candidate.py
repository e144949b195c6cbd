"""tools/decode_attention_candidate.py, the candidate Triton kernel for a sparse decode step's attention (not used
by the package yet), under the Triton interpreter in float16: it equals ``decoding.sparse_decode``'s torch operations
on the same selection, and the float64 reference's sparse attention of the one query. GQA groups 1 to 16, head dims
and block sizes that need padding, fewer selected blocks than the budget, an own block holding one token."""

import math
from types import SimpleNamespace

import pytest
import torch

from helpers.tools import load_tool
from ssa_megatron.hf import decoding
from ssa_megatron.ssa import reference

candidate = load_tool("decode_attention_candidate")
pytestmark = pytest.mark.skipif(candidate.triton is None, reason="needs triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter (tests/conftest.py)


@pytest.mark.parametrize("b, hq, hkv, d, bs, top_k, length", [
    (2, 4, 2, 16, 16, 4, 250),  # G 2
    (1, 16, 1, 64, 16, 16, 4000),  # G 16, the 1B shape's group and budget
    (3, 8, 8, 32, 16, 4, 40),  # G 1, fewer blocks than the budget: -1 padding
    (1, 12, 4, 24, 8, 5, 97),  # G 3, D 24, block 8: padded in the kernel
    (2, 4, 1, 16, 32, 2, 33),  # the own block holds one token
])
def test_candidate_attention_is_the_package_attention(monkeypatch, b, hq, hkv, d, bs, top_k, length):
    config = SimpleNamespace(ssa_block_size=bs, ssa_top_k=top_k, ssa_sink_blocks=1, ssa_local_blocks=1,
                             ssa_score="group_softmax")
    gen = torch.Generator().manual_seed(b * 100 + length)
    cap = -(-(length + 5) // bs) * bs
    q = torch.randn(b, hq, 1, d, generator=gen).half().to(DEVICE)
    keys = torch.randn(b, hkv, cap, d, generator=gen).half().to(DEVICE)
    values = torch.randn(b, hkv, cap, d, generator=gen).half().to(DEVICE)
    pooled = decoding.pool_blocks(keys, bs)
    length = torch.tensor(length, device=DEVICE)
    scale = 1 / math.sqrt(d)
    blocks = decoding.select_decode_blocks(q, pooled, length, config, scale)
    got = candidate.attend(q, keys, values, blocks, length, bs, scale)
    assert got.shape == q.shape and got.dtype == q.dtype
    monkeypatch.setattr(decoding, "kernels_select", lambda q, pooled: False)  # on a GPU too: the torch operations
    package = decoding.sparse_decode(q, keys, values, pooled, length, config, scale)
    torch.testing.assert_close(got.float(), package.float(), atol=2e-3, rtol=2e-3)
    n = int(length)  # float64: the same blocks through the reference, one query at position n - 1
    starts = torch.where(blocks >= 0, blocks * bs, -1).cpu()[:, :, None]  # [b, HKV, 1, K] block starts
    expected, _ = reference.sparse_attention(
        q.double().cpu().permute(2, 0, 1, 3), keys.double().cpu()[:, :, :n].permute(2, 0, 1, 3),
        values.double().cpu()[:, :, :n].permute(2, 0, 1, 3), starts, bs, q_positions=torch.tensor([n - 1]),
        softmax_scale=scale)
    torch.testing.assert_close(got.double().cpu(), expected.permute(1, 2, 0, 3), atol=5e-3, rtol=5e-3)


def test_candidate_script_runs_on_cpu(capsys):
    if DEVICE == "cuda":
        pytest.skip("on a GPU the script times the kernel: run it by hand (its docstring has the command)")
    assert candidate.main(["--batch", "1", "2", "--context", "300", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("largest |package - candidate|") == 2
    assert all(float(line.split()[-1]) < 2e-3 for line in out.splitlines() if "largest" in line)
