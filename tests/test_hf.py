"""HF model and conversion: Megatron checkpoint -> HF gives the same logits (fp32, both inference modes), HF ->
Megatron -> HF is lossless, the budget sweep's covering budget equals full attention, bad inputs are named."""

import json

import pytest
import torch

from helpers.megatron import init_megatron, tiny_recipe
from helpers.tools import load_tool, word_tokenizer

SEQ = 64  # block 16: top_k 4 covers the whole sequence
ATOL = 1e-5  # fp32 logits; the two stacks run the same ops, so the difference is at rounding level


@pytest.fixture(scope="module")
def megatron_ckpts(tmp_path_factory):
    """Tiny Megatron SSA models (tied and untied embeddings) saved with the project's Checkpointer."""
    init_megatron(tp=1, pp=1, cp=1)
    from ssa_megatron.config import to_dict
    from ssa_megatron.megatron.model import build_gpt_model
    from ssa_megatron.training.checkpoint import Checkpointer

    out = {}
    for tie in (True, False):
        recipe = tiny_recipe(seq_length=SEQ)
        recipe.model.tie_embeddings = tie
        torch.manual_seed(1 + tie)
        model = build_gpt_model(recipe).eval()
        with torch.no_grad():  # norms away from 1 so a swapped norm would show
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(torch.randn_like(p) * 0.1)
        run = tmp_path_factory.mktemp(f"run_tied{int(tie)}")
        Checkpointer(run / "checkpoints", keep_last=2).save(
            3, {"model": model.sharded_state_dict(), "recipe": to_dict(recipe), "step": 3})
        out[tie] = (model, recipe, run)
    return out


@pytest.fixture(scope="module")
def hf_dirs(megatron_ckpts, tmp_path_factory):
    from ssa_megatron.hf.convert import megatron_checkpoint_to_hf

    return {tie: megatron_checkpoint_to_hf(run, tmp_path_factory.mktemp(f"hf_tied{int(tie)}"))
            for tie, (_, _, run) in megatron_ckpts.items()}


def _megatron_logits(model, tokens, mode):
    from ssa_megatron.megatron.mode import force_mode

    pos = torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)
    with torch.no_grad(), force_mode(mode):
        return model(tokens, pos, None)


@pytest.mark.parametrize("tie", [True, False])
def test_hf_logits_match_megatron(megatron_ckpts, hf_dirs, tie):
    from transformers import AutoModelForCausalLM

    import ssa_megatron.hf  # noqa: F401

    model, recipe, _ = megatron_ckpts[tie]
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dirs[tie])).eval()
    assert type(hf).__name__ == "SSALlamaForCausalLM"
    assert hf.config.ssa_top_k == recipe.ssa.top_k and hf.config.tie_word_embeddings == tie
    tokens = torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(0))
    logits = {}
    for mode in ("full", "sparse"):
        hf.set_attention_mode(mode)
        with torch.no_grad():
            logits[mode] = hf(tokens).logits
        torch.testing.assert_close(logits[mode], _megatron_logits(model, tokens, mode), rtol=0, atol=ATOL)
    assert (logits["full"] - logits["sparse"]).abs().max() > 1e-3  # top_k=2 of 4 blocks really is sparse


@pytest.mark.slow
def test_round_trip_hf_megatron_hf(megatron_ckpts, hf_dirs, tmp_path):
    from safetensors.torch import load_file

    from ssa_megatron.hf.convert import hf_to_megatron_checkpoint, megatron_checkpoint_to_hf
    from ssa_megatron.megatron.model import build_gpt_model
    from ssa_megatron.training.checkpoint import Checkpointer

    for tie, hf_dir in hf_dirs.items():
        ckpt = hf_to_megatron_checkpoint(hf_dir, tmp_path / f"mcore{int(tie)}")
        assert (tmp_path / f"mcore{int(tie)}" / "latest").read_text().strip() == ckpt.name
        back = megatron_checkpoint_to_hf(tmp_path / f"mcore{int(tie)}", tmp_path / f"hf{int(tie)}")
        a, b = load_file(hf_dir / "model.safetensors"), load_file(back / "model.safetensors")
        assert a.keys() == b.keys() and ("lm_head.weight" in a) == (not tie)
        for key in a:
            assert torch.equal(a[key], b[key]), key
        # What checkpoint.load does: a fresh model loads the converted checkpoint's model keys.
        original, recipe, _ = megatron_ckpts[tie]
        fresh = build_gpt_model(recipe)
        loaded = Checkpointer.load(ckpt, {"model": fresh.sharded_state_dict()})
        fresh.load_state_dict(loaded["model"])
        for (name, p), q in zip(original.state_dict().items(), fresh.state_dict().values()):
            if isinstance(p, torch.Tensor):
                assert torch.equal(p, q), name


def test_save_pretrained_and_cached_decoding(hf_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    import ssa_megatron.hf  # noqa: F401

    hf = AutoModelForCausalLM.from_pretrained(str(hf_dirs[True])).eval()
    hf.set_attention_mode("sparse", top_k=2)
    hf.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved")).eval()
    tokens = torch.randint(0, 128, (1, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full_seq = hf(tokens).logits
        torch.testing.assert_close(again(tokens).logits, full_seq, rtol=0, atol=0)
        # Token-by-token decoding with the KV cache gives the same logits as one forward, in sparse mode.
        out = again(tokens[:, :20], use_cache=True)
        steps = [out.logits[:, -1]]
        for t in range(20, SEQ - 1):
            out = again(tokens[:, t:t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full_seq[:, 19:SEQ - 1], rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="padded"):
        again(tokens, attention_mask=torch.cat([torch.zeros(1, 1), torch.ones(1, SEQ - 1)], 1).long())
    with pytest.raises(ValueError, match="mode='dense'"):
        again.set_attention_mode("dense")
    with pytest.raises(ValueError, match="block_size"):
        again.set_attention_mode("sparse", block_size=24)
    assert again.config.ssa_block_size == 16  # a rejected switch changes nothing


def _batches(n=2, b=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        row = torch.randint(0, 128, (b, SEQ + 1), generator=g)
        out.append({"tokens": row[:, :-1], "labels": row[:, 1:], "loss_mask": torch.ones(b, SEQ),
                    "position_ids": torch.arange(SEQ).expand(b, -1), "cu_seqlens": None})
    return out


@pytest.mark.slow
def test_budget_sweep_covering_budget_equals_full(megatron_ckpts, tmp_path):
    from ssa_megatron.eval import budget_sweep, load_model, plot_sweep, write_table

    model = load_model(megatron_ckpts[True][2])  # a Megatron run dir, converted in memory
    rows = budget_sweep(model, _batches(), [1, 2, 4], stats=True)
    full = rows[0]
    by_k = {r["top_k"]: r for r in rows[1:]}
    assert full["mode"] == "full" and full["receptive_field"] == SEQ
    assert by_k[4]["receptive_field"] == SEQ
    assert by_k[4]["ppl"] == pytest.approx(full["ppl"], rel=1e-6)
    assert by_k[1]["ppl"] != pytest.approx(full["ppl"], rel=1e-4)
    assert by_k[4]["sparsity"] == pytest.approx(1.0, abs=1e-6) and by_k[1]["sparsity"] < 1.0
    # The full row holds the statistics of full inference (against the model's own budget, top_k 2), per layer.
    # A covering budget runs the same forward as full inference, so the full distribution's entropy is the same.
    assert len(full["layers"]) == model.config.num_hidden_layers and 0 < full["sparsity"] < 1.0
    assert full["entropy_bits"] == pytest.approx(by_k[4]["entropy_bits"], rel=1e-5)
    assert full["sparsity"] != pytest.approx(by_k[2]["sparsity"], rel=1e-9)  # same budget, another forward
    assert model.config.ssa_mode == "sparse" and model.config.ssa_top_k == 2  # restored
    csv_path, json_path = write_table(rows, tmp_path)
    assert csv_path.read_text().startswith("mode,block_size,top_k,receptive_field,loss,ppl")
    assert len(json.loads(json_path.read_text())) == 4
    assert plot_sweep(rows, tmp_path / "sweep.png").stat().st_size > 0


@pytest.mark.slow
def test_cli_sweep_and_eval_on_text(hf_dirs, tmp_path, capsys):
    text = tmp_path / "held_out.txt"
    text.write_text(" ".join(f"w{(i * 7) % 100}" for i in range(400)))
    tok = word_tokenizer(tmp_path / "tokenizer.json")

    def run(name, argv):
        assert load_tool(name).main(argv) == 0
        return capsys.readouterr().out

    common = ["--model", str(hf_dirs[True]), "--data", str(text), "--tokenizer", str(tok), "--seq-length",
              str(SEQ), "--batches", "2"]
    out = run("budget_sweep", common + ["--top-k", "1", "4", "--out", str(tmp_path / "sweep")])
    assert out.startswith("budget_sweep: ") and "outputs: " in out
    for name in ("budget_sweep.csv", "budget_sweep.json", "budget_sweep.png"):
        assert (tmp_path / "sweep" / name).is_file()
    table = json.loads((tmp_path / "sweep" / "budget_sweep.json").read_text())
    assert table[2]["ppl"] == pytest.approx(table[0]["ppl"], rel=1e-6)
    assert all(row["word_ppl"] > 0 and row["words"] > 0 for row in table)  # text + tokenizer: word counts known
    assert "word_ppl" in (tmp_path / "sweep" / "budget_sweep.csv").read_text().splitlines()[0]
    out = run("eval_ppl", common + ["--stats", "--out", str(tmp_path / "ppl.json")])
    result = json.loads((tmp_path / "ppl.json").read_text())
    assert set(result) >= {"full", "sparse", "attention_statistics"}
    assert set(result["attention_statistics"]) == {"full", "sparse"}
    assert all(len(layers) == 2 for layers in result["attention_statistics"].values())
    assert "results: " in out and "word ppl " in out


def test_bad_inputs_are_named(megatron_ckpts, hf_dirs, tmp_path):
    from ssa_megatron.hf.convert import hf_to_megatron_checkpoint, megatron_checkpoint_to_hf

    missing = tmp_path / "no_such_run"
    with pytest.raises(ValueError, match="no_such_run.*does not exist"):
        megatron_checkpoint_to_hf(missing, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.*not a torch_dist checkpoint"):
        megatron_checkpoint_to_hf(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ValueError, match="HF folder .*no_such_hf"):
        hf_to_megatron_checkpoint(tmp_path / "no_such_hf", tmp_path / "out")

    # A recipe whose shape disagrees with the weights.
    _, _, run = megatron_ckpts[True]
    wrong = tiny_recipe(seq_length=SEQ)
    wrong.model.ffn_hidden_size = 96
    with pytest.raises(ValueError, match=r"step_00000003.*linear_fc\d.weight.*do not match"):
        megatron_checkpoint_to_hf(run, tmp_path / "out", recipe=wrong)
    with pytest.raises(ValueError, match=r"does not match the recipe: model\.ffn_hidden_size=96"):
        hf_to_megatron_checkpoint(hf_dirs[True], tmp_path / "out", recipe=wrong)
    # A config.json edited to a shape its weights do not have.
    bad = tmp_path / "bad_hf"
    bad.mkdir()
    cfg = json.loads((hf_dirs[True] / "config.json").read_text())
    cfg.update(intermediate_size=96, megatron_recipe=None)
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").write_bytes((hf_dirs[True] / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"HF folder .*bad_hf.*(gate|down)_proj.weight.*do not match"):
        hf_to_megatron_checkpoint(bad, tmp_path / "out")


def test_document_mask_keeps_documents_apart():
    import ssa_megatron.hf as hf_lib

    cfg = hf_lib.SSALlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                num_attention_heads=4, num_key_value_heads=2, ssa_block_size=16, ssa_top_k=2,
                                ssa_document_mask=True)
    torch.manual_seed(0)
    model = hf_lib.SSALlamaForCausalLM(cfg).eval()
    tokens = torch.randint(0, 128, (1, SEQ), generator=torch.Generator().manual_seed(2))
    pos = torch.cat([torch.arange(40), torch.arange(SEQ - 40)])[None]
    with torch.no_grad():
        packed = model(tokens, position_ids=pos, cu_seqlens=torch.tensor([0, 40, SEQ])).logits
        alone = model(tokens[:, 40:]).logits
    torch.testing.assert_close(packed[:, 40:], alone, rtol=0, atol=ATOL)
