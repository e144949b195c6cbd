"""tools/decode_gemv_candidate.py, the candidate Triton kernel for a decode step's weight GEMMs (not used by the
package), under the Triton interpreter in float16: ``x @ w.T`` for 1 to 32 rows, output and reduction sizes that are
not whole tiles, against float32 products; more rows than it takes are refused in one line."""

import pytest
import torch

from helpers.tools import load_tool

candidate = load_tool("decode_gemv_candidate")
pytestmark = pytest.mark.skipif(candidate.triton is None, reason="needs triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter (tests/conftest.py)


@pytest.mark.parametrize("m", [1, 3, 16, 32])
@pytest.mark.parametrize("n, k, config", [(40, 96, {}), (64, 300, dict(BLOCK_N=32, BLOCK_K=256, STAGES=4))])
def test_candidate_linear_is_the_product(m, n, k, config):
    gen = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=gen).half().to(DEVICE)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).half().to(DEVICE)
    got = candidate.linear(x, w, **config)
    assert got.shape == (m, n) and got.dtype == x.dtype
    expected = x.float() @ w.float().T  # exact products of float16 values; the kernel sums in float32 too
    torch.testing.assert_close(got.float(), expected.half().float(), atol=2e-3, rtol=2e-3)


def test_candidate_linear_refuses_more_than_32_rows():
    with pytest.raises(ValueError, match="33 rows"):
        candidate.linear(torch.zeros(33, 16, dtype=torch.float16), torch.zeros(16, 16, dtype=torch.float16))


def test_candidate_script_runs_on_cpu(capsys):
    if DEVICE == "cuda":
        pytest.skip("on a GPU the script times the kernel: run it by hand (its docstring has the command)")
    assert candidate.main(["--shape", "tiny", "--device", "cpu"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "relative error" in line]
    assert len(lines) == 4 and all(float(line.split()[-1]) < 2e-3 for line in lines)
