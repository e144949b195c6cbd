"""tools/run_study.py on a tiny CPU configuration: the three study recipes trained through ssa-train (three
processes at once), evaluated (budget sweep with per-layer statistics under full and sparse inference, longer
contexts, in-distribution perplexity) and reported (tables and plots)."""

from __future__ import annotations

import json
import math
import random

import pytest

from helpers.tools import load_tool

SEQ = 128


def _sentences(rng: random.Random, n: int) -> str:
    nouns = ["kernel", "block", "query", "token", "model", "layer", "budget", "cache", "page", "thread"]
    verbs = ["selects", "reads", "writes", "skips", "moves", "keeps"]
    return " ".join(f"the {rng.choice(nouns)} {rng.choice(verbs)} the {rng.choice(nouns)}." for _ in range(n))


@pytest.fixture(scope="module")
def study_data(tmp_path_factory):
    """A study data folder as `run_study.py prepare` lays it out: shards/ (SEQ tokens, 1 % held out),
    tokenizer.json and the held-out text."""
    root = tmp_path_factory.mktemp("study_data")
    rng = random.Random(0)
    corpus = root / "raw" / "docs.jsonl"
    corpus.parent.mkdir()
    corpus.write_text("".join(json.dumps({"text": _sentences(rng, rng.randint(5, 40))}) + "\n" for _ in range(400)))
    assert load_tool("train_tokenizer").main([str(corpus), "--vocab-size", "300", "--output", str(root / "tokenizer.json"),
                                          "--no-progress"]) == 0
    assert load_tool("prepare_data").main([str(corpus), "--tokenizer", str(root / "tokenizer.json"), "--seq-length",
                                       str(SEQ), "--output", str(root / "shards"), "--valid-fraction", "0.05",
                                       "--workers", "1", "--no-progress"]) == 0
    study = load_tool("run_study")
    (root / study.HELDOUT_TEXT).write_text(_sentences(random.Random(1), 200))
    return root


TINY = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.vocab_size=300", f"model.seq_length={SEQ}", "ssa.block_size=16",
        "ssa.top_k=2", "train.steps=4", "train.micro_batch_size=2", "train.global_batch_size=4",
        "train.precision=fp32", "train.log_interval=2", "train.metrics_interval=2", "train.eval_interval=0",
        "checkpoint.interval=4", "optim.warmup_steps=1"]


@pytest.mark.slow
def test_run_study_trains_evaluates_and_reports(study_data, tmp_path, capsys):
    study = load_tool("run_study")
    out = tmp_path / "study"
    assert study.main(["run", "--data", str(study_data), "--out", str(out), "--jobs", "3", "--rows", "2",
                       "--device", "cpu", "--top-k", "1,2,8", *TINY]) == 0
    console = capsys.readouterr().out
    assert "[ssa] " in console and "[moba] " in console and "[full_attn] " in console

    # Each model trained through ssa-train with its recipe's modes; the console shows the SSA quantities per layer.
    ssa_log = (out / "ssa" / "train.log").read_text()
    assert "per layer: align" in ssa_log and "sparsity" in ssa_log
    for name, p_full, alpha in (("full_attn", 1.0, 0.0), ("moba", 0.0, 0.0), ("ssa", 0.5, 10.0)):
        recipe = (out / name / "recipe.yaml").read_text()
        assert f"name: study_{name}" in recipe and f"p_full: {p_full}" in recipe and f"alpha: {alpha}" in recipe

    report = json.loads((out / "report" / "results.json").read_text())
    assert list(report) == ["FullAttn", "MoBA", "SSA"]
    for name, s in report.items():
        assert s["steps"] == 4 and s["tokens"] == 4 * 4 * SEQ
        assert math.isfinite(s["ppl_full"]) and math.isfinite(s["ppl_sparse"])
        # RF 128 covers a whole row: sparse inference equals full inference there.
        assert s["ppl_by_rf"]["128"] == pytest.approx(s["ppl_full"], rel=1e-5)
        assert s["ppl_by_rf"]["16"] != pytest.approx(s["ppl_full"], rel=1e-6)
        assert len(s["layers_full"]) == len(s["layers_sparse"]) == 2
        assert 0 < s["stats_full"]["sparsity"] < 1 and 0 < s["stats_sparse"]["sparsity"] < 1
        assert {x["factor"] for x in s["length"]} == {1, 2, 4} and all(math.isfinite(x["ppl"]) for x in s["length"])
        assert {x["mode"] for x in s["in_distribution"]} == {"full", "sparse"}
    assert report["SSA"]["final_align"] > 0 and report["FullAttn"]["final_align"] in (None, 0.0)
    assert report["MoBA"]["final_loss_full"] is None and report["FullAttn"]["final_loss_sparse"] is None

    md = (out / "report" / "results.md").read_text()
    assert "| SSA |" in md and "sparse RF 16" in md and "Per layer: attention sparsity" in md
    for png in ("ppl_vs_rf.png", "sparsity_per_layer.png", "loss_curves.png"):
        assert (out / "report" / png).stat().st_size > 1000

    # The report alone, again from the evaluated runs.
    assert study.main(["report", "--out", str(out)]) == 0
    assert "| FullAttn |" in capsys.readouterr().out


def test_run_study_names_missing_data(tmp_path):
    study = load_tool("run_study")
    with pytest.raises(SystemExit, match="has no shards; make it with: python tools/run_study.py prepare"):
        study.main(["run", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--device", "cpu"])
