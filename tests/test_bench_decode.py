"""tools/bench_decode.py on CPU with the tiny shape: every path and mode runs, the bounds and ratios are computed
from the model and the arguments, the JSON holds one row per (batch, context, mode, path), bad values are named; the
timed step holds the greedy choice and writes it in place; a path past --config-timeout has its stacks printed and
is stopped."""

import json
import time

import pytest
import torch
from transformers import DynamicCache

from helpers.tools import load_tool



def _tool():
    return load_tool("bench_decode")


def test_bench_decode_tiny_cpu(tmp_path, capsys):
    bench = _tool()
    out = tmp_path / "bench.json"
    args = ["--shape", "tiny", "--device", "cpu", "--context", "40", "--batch", "1", "2", "--top-k", "2",
            "--paths", "eager-static", "eager-dynamic", "baseline", "--steps", "2", "--baseline-steps", "1",
            "--warmup", "1", "--out", str(out)]
    assert bench.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["batch"], r["mode"], r["path"]) for r in rows} == {
        (b, m, p) for b in (1, 2) for m in ("full", "sparse") for p in ("eager-static", "eager-dynamic", "baseline")}
    model, config = bench.build_model(bench.parse_args(args))
    weights = bench.weight_bytes(model)
    # tiny: 2 layers x (q 64x64, k/v 32x64 each, o 64x64, gate 4x64, MLP 3 x 64x128, 2 norms) + norm + LM head 256x64
    assert weights == 4 * (2 * (64 * 64 * 2 + 32 * 64 * 2 + 4 * 64 + 3 * 64 * 128 + 2 * 64) + 64 + 256 * 64)
    for r in rows:
        assert r["ms_per_step"] > 0 and r["tokens_per_s"] == pytest.approx(r["batch"] / r["ms_per_step"] * 1e3)
        assert 0 < r["host_ms_per_step"] <= r["ms_per_step"]  # on CPU the host does all the work
        assert r["weights_bound_ms"] == pytest.approx(weights / 4.8e12 * 1e3)
        per_token = 2 * 2 * 16 * 4  # K and V, 2 KV heads, head_dim 16, fp32
        read = 40 * per_token if r["mode"] == "full" else 2 * 16 * per_token + 40 // 16 * 2 * 16 * 4
        assert r["kv_bound_ms"] == pytest.approx(r["batch"] * 2 * read / 4.8e12 * 1e3)
    printed = capsys.readouterr().out
    assert "eager-static: sparse/full tokens/s" in printed and "x baseline" in printed
    assert f"rows written to {out}" in printed


def test_bench_decode_profile_writes_the_table_and_a_trace_profile_gaps_reads(tmp_path):
    bench = _tool()
    args = ["--shape", "tiny", "--device", "cpu", "--context", "40", "--batch", "1", "--modes", "sparse", "--paths",
            "eager-static", "--steps", "1", "--warmup", "1", "--profile", "--profile-dir", str(tmp_path)]
    assert bench.main(args) == 0
    name = "batch_1_context_40_sparse_eager-static"
    assert "Self CPU" in (tmp_path / f"{name}.txt").read_text()
    gaps = load_tool("profile_gaps")
    ops = [e for e in gaps.load_events(tmp_path / f"{name}.trace.json.gz") if e.get("cat") == "cpu_op"]
    assert ops and not (tmp_path / f"{name}.trace.json").exists()  # only the compressed trace is kept


def test_bench_decode_bad_values_are_named(capsys):
    bench = _tool()
    with pytest.raises(SystemExit):
        bench.parse_args(["--context", "0"])
    assert "--context 0: must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--compile-options", "[1]"])
    assert "--compile-options '[1]': must be a JSON object of Inductor options" in capsys.readouterr().err


def test_greedy_step_writes_the_next_tokens_in_place():
    bench = _tool()
    args = bench.parse_args(["--shape", "tiny", "--device", "cpu"])
    model, config = bench.build_model(args)
    tokens = torch.tensor([[3], [7]])
    with torch.no_grad():
        expected = model(tokens).logits[:, -1]
        logits = bench.greedy_step(model, tokens, DynamicCache(config=config))
    torch.testing.assert_close(logits, expected)
    assert torch.equal(tokens, expected.argmax(-1, keepdim=True))


def test_watchdog_prints_the_stacks_and_stops_a_hung_path(capfd):
    bench = _tool()
    started = time.perf_counter()
    with bench.Watchdog(0.3, "batch 1 context 8 sparse compiled-static") as watchdog:
        time.sleep(20)  # interrupted after 0.3 s
    assert watchdog.fired and time.perf_counter() - started < 10
    err = capfd.readouterr().err
    assert "batch 1 context 8 sparse compiled-static still running after 0s" in err
    assert "test_watchdog_prints_the_stacks_and_stops_a_hung_path" in err  # the main thread's stack
    with bench.Watchdog(5, "quick") as quick:
        pass
    assert not quick.fired


@pytest.mark.parametrize("vocab", [97, 1024, 128256])
def test_greedy_choice_is_argmax(vocab):
    """The two-stage argmax picks ``argmax``'s token, the first of equal maxima, also where they lie in different
    chunks and where the vocabulary is not whole chunks."""
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(vocab)).bfloat16()
    logits[1, [3, vocab - 1]] = 50.0  # a tie across chunks: the first wins
    logits[2, :] = 0.0  # all equal
    logits[3, vocab - 1] = 60.0  # in the padded last chunk
    torch.testing.assert_close(_tool().greedy_choice(logits), logits.argmax(-1, keepdim=True), rtol=0, atol=0)
