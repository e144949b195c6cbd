"""tools/study_report.py on a tiny budget study (CPU): three 6-step runs at training budgets 1, 2 and 4 blocks of
16 tokens; one swept with tools/budget_sweep.py as the docs show, two swept by the report itself; then one CSV,
one JSON and three plots."""

import csv
import json

import pytest

from helpers.tools import load_tool, word_tokenizer
from helpers.training import run_training, tiny_test_recipe

BUDGETS = (1, 2, 4)  # training top_k; seq_length 64 = 4 blocks of 16, so 4 covers the row
PLOTS = ("loss_curves.png", "final_ppl.png", "ppl_vs_inference_budget.png")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Three trained runs and held-out text with its tokenizer."""
    root = tmp_path_factory.mktemp("study")
    runs = []
    for k in BUDGETS:
        run_dir = root / "runs" / f"k{k}"
        run_training(tiny_test_recipe(run_dir, f"ssa.top_k={k}"))
        runs.append(run_dir)
    text = root / "held_out.txt"
    text.write_text(" ".join(f"w{(i * 7) % 100}" for i in range(400)))
    data = ["--data", str(text), "--tokenizer", str(word_tokenizer(root / "tokenizer.json")), "--seq-length", "64",
            "--batches", "2"]
    return root, runs, data


@pytest.mark.slow
def test_study_report_collects_runs(study, capsys):
    root, runs, data = study
    # One run swept as docs/hf_eval.md shows; the report sweeps the other two (same data and budgets).
    assert load_tool("budget_sweep").main(["--model", str(runs[0]), *data, "--top-k", "1", "2", "4",
                                       "--out", str(runs[0] / "budget_sweep")]) == 0
    capsys.readouterr()
    out_dir = root / "report"
    assert load_tool("study_report").main([*map(str, runs), "--out", str(out_dir), *data, "--top-k", "1", "2", "4"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("study_report:")]
    assert lines[0].startswith("study_report: 3 runs (k1 K×BS 1x16") and str(out_dir) in lines[0]
    assert "1 with a budget sweep" in lines[0] and "2 without" in lines[0]
    assert "outputs: " in lines[-1] and str(out_dir / "study.csv") in lines[-1]

    with open(out_dir / "study.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:9] == ["run", "train_budget", "train_top_k", "train_block_size", "train_receptive_field",
                                 "p_full", "alpha", "steps", "tokens"]
    # One row per (run, inference budget, mode): full once, sparse at each of the three budgets.
    keys = [(r["run"], r["mode"], r["top_k"], r["block_size"]) for r in rows]
    assert len(keys) == len(set(keys)) == len(BUDGETS) * 4
    for k in BUDGETS:
        own = [r for r in rows if r["run"] == f"k{k}"]
        assert sorted(r["top_k"] for r in own if r["mode"] == "sparse") == ["1", "2", "4"]
        assert [r["mode"] for r in own].count("full") == 1
        assert {r["train_budget"] for r in own} == {f"{k}x16"} and {r["train_receptive_field"] for r in own} == {
            str(16 * k)}
        assert {r["tokens"] for r in own} == {str(6 * 4 * 64)} and {r["steps"] for r in own} == {"6"}
    assert {r["source"] for r in rows if r["run"] == "k1"} == {str(runs[0] / "budget_sweep" / "budget_sweep.json")}
    assert {r["source"] for r in rows if r["run"] == "k4"} == {str(out_dir / "sweeps" / "k4" / "budget_sweep.json")}
    # The covering budget (4 x 16 = seq_length) is full attention, in every run.
    for k in BUDGETS:
        full = next(float(r["ppl"]) for r in rows if r["run"] == f"k{k}" and r["mode"] == "full")
        cover = next(float(r["ppl"]) for r in rows if r["run"] == f"k{k}" and r["top_k"] == "4")
        assert cover == pytest.approx(full, rel=1e-6)

    report = json.loads((out_dir / "study.json").read_text())
    assert len(report["rows"]) == len(rows) and [r["run"] for r in report["runs"]] == ["k1", "k2", "k4"]
    for summary in report["runs"]:
        assert summary["ppl_full"] > 0 and summary["ppl_sparse"] > 0
        assert [step for step, _ in summary["loss_curve"]] == [2, 4, 6]  # loss/lm from TensorBoard
    for name in PLOTS:
        assert (out_dir / name).stat().st_size > 1000

    # A second report finds the sweeps it wrote and needs no --data.
    assert load_tool("study_report").main([*map(str, runs), "--out", str(out_dir)]) == 0
    assert "3 with a budget sweep" in capsys.readouterr().out


def test_study_report_names_what_is_not_a_run(tmp_path, capsys):
    tool = load_tool("study_report")
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not a run")
    for bad, says in ((tmp_path / "empty", "neither recipe.yaml nor checkpoints/"),
                      (tmp_path / "missing", "does not exist"), (tmp_path / "notes.txt", "not a directory")):
        assert tool.main([str(bad), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("study_report: error: ") and says in err[0]
    assert not (tmp_path / "out").exists()
