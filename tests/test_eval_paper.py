"""The paper's evaluations on a tiny checkpoint (CPU): word-level perplexity, length extrapolation
(tools/length_extrapolation.py) and needle in a haystack (tools/niah.py), through their tools."""

import json
import math
from pathlib import Path

import pytest
import torch

from helpers.megatron import init_megatron, tiny_recipe
from helpers.tools import load_tool

SEQ = 64


def _text(n_words: int) -> str:
    words = ("the grass is green and the sky is blue while the sun is yellow here we go there and back again "
             "what is the pass key remember it important info hidden inside a lot of irrelevant text").split()
    return " ".join(words[(i * 7 + i // 5) % len(words)] for i in range(n_words)) + "\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny SSA checkpoint (random weights) and its HF export with a byte-level BPE tokenizer."""
    init_megatron(tp=1, pp=1, cp=1)
    from ssa_megatron.config import to_dict
    from ssa_megatron.data.tokenizer import train_bpe
    from ssa_megatron.hf.convert import megatron_checkpoint_to_hf
    from ssa_megatron.megatron.model import build_gpt_model
    from ssa_megatron.training.checkpoint import Checkpointer

    root = tmp_path_factory.mktemp("tiny_eval")
    corpus = root / "corpus.txt"
    corpus.write_text(_text(3000) + "0123456789 " * 50)
    tok = train_bpe([str(corpus)], vocab_size=320, output_path=root / "tokenizer.json")
    recipe = tiny_recipe(seq_length=SEQ)
    recipe.model.vocab_size = 384
    recipe.validate()
    torch.manual_seed(0)
    model = build_gpt_model(recipe).eval()
    Checkpointer(root / "run" / "checkpoints", keep_last=1).save(
        1, {"model": model.sharded_state_dict(), "recipe": to_dict(recipe), "step": 1})
    hf = megatron_checkpoint_to_hf(root / "run", root / "hf", tokenizer=tok)
    held_out = root / "held_out.txt"
    held_out.write_text(_text(2500))
    return {"run": root / "run", "hf": hf, "tokenizer": tok, "text": held_out}


def _run_tool(name, argv, capsys):
    code = load_tool(name).main(argv)
    return code, capsys.readouterr()


def test_word_perplexity_counts_the_scored_words(tiny):
    from ssa_megatron.data.tokenizer import Tokenizer
    from ssa_megatron.eval import eval_batches, load_model, perplexity

    model = load_model(tiny["hf"])
    batches = eval_batches(str(tiny["text"]), 2, 2, seq_length=SEQ, tokenizer=str(tiny["tokenizer"]))
    tok = Tokenizer(tiny["tokenizer"])
    for batch in batches:
        text = "".join(tok.decode(row.tolist(), skip_special_tokens=True) + " " for row in batch["labels"])
        assert batch["words"] == len(text.split()) > 0
    result = perplexity(model, batches)
    assert result["words"] == sum(b["words"] for b in batches)
    # The same total NLL per word: fewer words than tokens, so a higher perplexity than the token perplexity.
    assert result["word_ppl"] == pytest.approx(math.exp(result["loss"] * result["tokens"] / result["words"]))
    assert result["word_ppl"] > result["ppl"]
    assert "words" not in perplexity(model, [{k: v for k, v in b.items() if k != "words"} for b in batches])


def test_length_extrapolation_tool(tiny, tmp_path, capsys):
    from ssa_megatron.eval import eval_batches, load_model, perplexity

    out = tmp_path / "extrapolation"
    code, io = _run_tool("length_extrapolation", [
        "--model", str(tiny["hf"]), "--data", str(tiny["text"]), "--factors", "1", "2", "4", "--rows", "2",
        "--out", str(out)], capsys)
    assert code == 0, io.err
    assert io.out.startswith("length_extrapolation: ") and "training length 64, lengths 64, 128, 256" in io.out
    rows = json.loads((out / "length_extrapolation.json").read_text())
    assert [(r["factor"], r["mode"]) for r in rows] == [(f, m) for f in (1, 2, 4) for m in ("full", "sparse")]
    assert (out / "length_extrapolation.png").is_file() and (out / "length_extrapolation.csv").is_file()
    # Every length scores the same prefix of the stream (2 rows of 256 + 1 tokens), less at most one row of its
    # own length and one token per row where the shorter rows do not tile it.
    for r in rows:
        assert 2 * 256 - r["seq_length"] - 16 <= r["tokens"] <= 2 * 256
    # At 1x the rows are the text tool's rows (same stream, same cut): the same perplexity.
    model = load_model(tiny["hf"])
    model.set_attention_mode("full")
    batches = eval_batches(str(tiny["text"]), 1, rows[0]["tokens"] // SEQ, seq_length=SEQ,
                           tokenizer=str(tiny["tokenizer"]))
    assert rows[0]["ppl"] == pytest.approx(perplexity(model, batches)["ppl"], rel=1e-5)
    # Sparse differs from full once the rows are longer than the budget (2 blocks x 16 tokens).
    assert rows[1]["ppl"] != pytest.approx(rows[0]["ppl"], rel=1e-6)


@pytest.mark.slow
def test_length_extrapolation_from_a_megatron_run_and_errors(tiny, capsys):
    code, io = _run_tool("length_extrapolation", [
        "--model", str(tiny["run"]), "--data", str(tiny["text"]), "--tokenizer", str(tiny["tokenizer"]),
        "--factors", "1", "2", "--rows", "1", "--mode", "sparse"], capsys)
    assert code == 0, io.err
    assert io.out.count("sparse: ppl") == 2 and "full: ppl" not in io.out
    code, io = _run_tool("length_extrapolation", [
        "--model", str(tiny["hf"]), "--data", str(tiny["text"]), "--factors", "64", "--rows", "4"], capsys)
    assert code == 2 and "fewer than the" in io.err.strip().splitlines()[-1]


def test_niah_prompts_have_the_exact_length_and_the_needle_at_its_depth(tiny):
    from ssa_megatron.data.tokenizer import Tokenizer
    from ssa_megatron.eval.niah import PromptBuilder, passkey_found

    tok = Tokenizer(tiny["tokenizer"])
    builder = PromptBuilder(tok)
    first = builder.build(300, 0.0, "12345")
    last = builder.build(300, 1.0, "12345")
    middle = builder.build(300, 0.5, "67890")
    for p in (first, last, middle):
        assert p.ids.shape == (300,)
        needle_text = tok.decode(p.ids[p.needle_at:p.needle_at + 40].tolist())
        assert f"pass key is {p.passkey}" in needle_text
    assert first.needle_at == len(builder.instruction)
    assert tok.decode(last.ids[last.needle_at:].tolist()).rstrip().endswith("The pass key is")
    assert first.needle_at < middle.needle_at < last.needle_at
    assert passkey_found(" 12345. Remember", "12345") and not passkey_found(" 1234 5", "12345")
    assert not passkey_found(" no number", "12345")
    with pytest.raises(ValueError, match="context=10: shorter than the instruction"):
        builder.build(10, 0.5, "12345")


def test_niah_sparse_with_a_covering_budget_answers_as_full(tiny):
    """A budget covering the whole prompt makes sparse attention exact, so the generated answers are the same."""
    from ssa_megatron.data.tokenizer import Tokenizer
    from ssa_megatron.eval import load_model
    from ssa_megatron.eval.niah import needle_in_a_haystack

    model = load_model(tiny["hf"])
    model.set_attention_mode("sparse", top_k=24)  # 24 blocks x 16 tokens >= 300 prompt + generated tokens
    rows = needle_in_a_haystack(model, Tokenizer(tiny["tokenizer"]), [300], depths=[0.0, 1.0], max_new_tokens=4)
    by_mode = {m: [r["answer"] for r in rows if r["mode"] == m] for m in ("full", "sparse")}
    assert len(by_mode["full"]) == 2 and by_mode["full"] == by_mode["sparse"]
    assert model.config.ssa_mode == "sparse" and model.config.ssa_top_k == 24  # restored


@pytest.mark.slow
def test_niah_tool_writes_the_heat_map(tiny, tmp_path, capsys):
    from ssa_megatron.eval.niah import passkey_found

    out = tmp_path / "niah"
    code, io = _run_tool("niah", ["--model", str(tiny["hf"]), "--contexts", "300", "400", "--depths", "0", "1",
                                  "--max-new-tokens", "3", "--out", str(out)], capsys)
    assert code == 0, io.err
    assert io.out.startswith("niah: ") and "  full: 300: " in io.out and "sparse: 300: " in io.out
    rows = json.loads((out / "niah.json").read_text())
    assert len(rows) == 2 * 2 * 2 and {r["context"] for r in rows} == {300, 400}
    assert all(r["correct"] == passkey_found(r["answer"], r["passkey"]) for r in rows)
    summary = json.loads((out / "niah_summary.json").read_text())
    assert summary["full"]["contexts"] == [300, 400] and len(summary["sparse"]["grid"]) == 2
    assert (out / "niah.png").is_file()
    code, io = _run_tool("niah", ["--model", str(tiny["hf"]), "--contexts", "8"], capsys)
    assert code == 2 and "shorter than the instruction" in io.err


def _local_lm_eval_data(root: Path) -> Path:
    """Tiny local copies in the hub datasets' fields: PIQA (goal, sol1, sol2, label) and WikiText (page)."""
    def write(task, split, rows):
        (root / task).mkdir(parents=True, exist_ok=True)
        (root / task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    piqa = [{"goal": f"the sky is {w}", "sol1": "blue here we go", "sol2": "green and back again", "label": i % 2}
            for i, w in enumerate(("blue", "green", "yellow", "red", "grey", "white"))]
    write("piqa", "train", piqa)
    write("piqa", "validation", piqa[:4])
    write("wikitext", "test", [{"page": _text(60)}, {"page": _text(40)}])
    return root


@pytest.mark.slow
def test_downstream_protocol_runs_offline_on_local_data(tiny, tmp_path, capsys):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed")
    pytest.importorskip("accelerate", reason="accelerate (lm-eval's hf model needs it) is not installed")
    data = _local_lm_eval_data(tmp_path / "data")
    out = tmp_path / "downstream"
    code, io = _run_tool("downstream_eval", [
        "--model", str(tiny["hf"]), "--data-dir", str(data), "--out", str(out), "--tasks", "piqa", "wikitext",
        "--seeds", "1", "12", "--limit", "4", "--batch-size", "2", "--max-length", "256", "--device", "cpu"], capsys)
    assert code == 0, io.err[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    for mode in ("full", "sparse"):
        assert summary[mode]["piqa"]["n"] == 2 and summary[mode]["wikitext"]["n"] == 1
        assert 0.0 <= summary[mode]["piqa"]["mean"] <= 100.0 and summary[mode]["wikitext"]["mean"] > 1.0
        run = json.loads((out / mode / "piqa_seed12.json").read_text())
        assert f"ssa_mode={mode}" in run["model_args"] and run["num_fewshot"] == 3
    assert "local_piqa.yaml" in {p.name for p in (out / "tasks").iterdir()}
    # A covering budget is not set, so the tiny model's 2-block budget makes sparse differ from full on WikiText.
    assert summary["full"]["wikitext"]["mean"] != pytest.approx(summary["sparse"]["wikitext"]["mean"], rel=1e-9)
    code, io = _run_tool("downstream_eval", ["--model", str(tiny["hf"]), "--data-dir", str(data), "--out",
                                             str(out), "--tasks", "hellaswag"], capsys)
    assert code == 2 and "task 'hellaswag': no " in io.err
