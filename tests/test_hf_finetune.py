"""tools/finetune_hf.py (ssa_megatron/hf/finetune.py): a stock Llama folder turned into an SSA model by two steps
of fine-tuning on the project's token shards, with the alignment loss and Megatron's mode sampling; the plain
torch loop here, DeepSpeed ZeRO-2 (in a subprocess) when deepspeed is installed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.hf import stock_llama, write_corpus, write_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SEQ = 64  # 4 blocks of 16; budget 1 block: the sparse branch really differs from the full one
OVERRIDES = ["ssa.top_k=1", "ssa.alpha=1.0", "ssa.p_full=0.5", "train.steps=2", "train.micro_batch_size=1",
             "train.global_batch_size=2", "train.log_interval=1", "train.device=cpu", "train.precision=fp32",
             "optim.lr=0.01", "optim.warmup_steps=0", "data.num_workers=0"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A stock Llama folder with its tokenizer, and shards of the text the tokenizer was trained on."""
    from ssa_megatron.data.prepare import prepare_shards

    root = tmp_path_factory.mktemp("finetune")
    corpus = write_corpus(root / "corpus.txt")
    tok = write_tokenizer(corpus, root / "tok")
    prepare_shards([corpus], root / "shards", tok, SEQ, workers=0, doc_split="line", progress=False,
                   log=lambda _: None)
    return stock_llama(root / "llama", root / "tok", seq_length=SEQ), root / "shards"


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_stock_llama_becomes_ssa_with_the_torch_loop(inputs, tmp_path):
    from transformers import AutoModelForCausalLM

    from ssa_megatron.hf.finetune import finetune
    from ssa_megatron.megatron.mode import sample_mode

    llama, shards = inputs
    lines = []
    saved, history = finetune(llama, tmp_path / "out", OVERRIDES + [f"data.train_shards={shards}"],
                              log=lines.append)
    assert len(history) == 2 and saved == tmp_path / "out" / "step_00000002"
    assert (tmp_path / "out" / "latest").read_text().strip() == saved.name
    for entry in history:
        assert all(map(torch.isfinite, torch.tensor([entry.loss, entry.lm, entry.grad_norm])))
        assert entry.alignment is not None and entry.alignment > 0  # alpha 1: both branches ran in every layer
        assert entry.loss == pytest.approx(entry.lm + entry.alignment, rel=1e-5)
        # the Megatron layers' draw: seed train.seed (1234), iteration = step index, micro-batch index
        assert entry.modes == [sample_mode(1234, entry.step - 1, m, 0.5) for m in range(2)]
    assert any(line.startswith("step 2/2 loss") for line in lines)

    before, after = _weights(llama), _weights(saved)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the steps moved the weights

    cfg = json.loads((saved / "config.json").read_text())
    assert cfg["model_type"] == "ssa_llama" and cfg["ssa_gate"] == "none" and cfg["ssa_top_k"] == 1
    assert cfg["megatron_recipe"]["ssa"]["alpha"] == 1.0 and (saved / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(str(saved), trust_remote_code=True).eval()
    tokens = torch.randint(0, 300, (1, SEQ))
    with torch.no_grad():
        sparse = model(tokens).logits
        model.set_attention_mode("full")
        full = model(tokens).logits
    assert torch.isfinite(sparse).all() and not torch.allclose(sparse, full)
    for k, v in model.state_dict().items():
        if k in after:
            assert torch.equal(v, after[k]), k


def test_alpha_zero_trains_one_branch(inputs, tmp_path):
    from ssa_megatron.hf.finetune import finetune

    llama, shards = inputs
    _, history = finetune(llama, tmp_path / "out", OVERRIDES + ["ssa.alpha=0", "train.steps=1",
                                                               f"data.train_shards={shards}"], log=lambda _: None)
    assert history[0].alignment is None and history[0].loss == history[0].lm


def test_bad_inputs_one_line(inputs, tmp_path):
    from ssa_megatron.config import RecipeConfig
    from ssa_megatron.hf.finetune import deepspeed_config, load_model_and_recipe

    llama, _ = inputs
    with pytest.raises(ValueError, match="model.hidden_size=32 in the recipe, 64 in the HF config"):
        load_model_and_recipe(llama, ["model.hidden_size=32"])
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 4}))
    recipe = RecipeConfig()
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=4 but the recipe gives 1"):
        deepspeed_config(bad, recipe, world_size=1)
    cfg = deepspeed_config(ROOT / "tools" / "ds_zero2.json", recipe, world_size=2)
    assert cfg["zero_optimization"]["stage"] == 2 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["bf16"]["enabled"] is True and cfg["train_batch_size"] == 8


@pytest.mark.slow
def test_deepspeed_zero2_two_steps(inputs, tmp_path):
    """The CLI with --deepspeed tools/ds_zero2.json on CPU (DS_ACCELERATOR=cpu, gloo). DeepSpeed compiles its CPU
    shared-memory op on first use (minutes on 2 cores; cached in TORCH_EXTENSIONS_DIR afterwards)."""
    pytest.importorskip("deepspeed")
    llama, shards = inputs
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "finetune_hf.py"), str(llama), str(tmp_path / "out"),
         "--deepspeed", str(ROOT / "tools" / "ds_zero2.json"), *OVERRIDES, f"data.train_shards={shards}"],
        capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "engine deepspeed" in proc.stdout
    steps = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 2 and all(" align " in line for line in steps), proc.stdout
    values = [float(line.split(" loss ")[1].split()[0]) for line in steps]
    from ssa_megatron.hf.finetune import finetune

    # the same steps in the torch loop: ZeRO-2 must make the same updates (losses printed to 4 decimals)
    _, history = finetune(llama, tmp_path / "torch", OVERRIDES + [f"data.train_shards={shards}"], log=lambda _: None)
    assert values == pytest.approx([h.loss for h in history], abs=2e-4)
    before, after = _weights(llama), _weights(tmp_path / "out" / "step_00000002")
    assert any(not torch.equal(before[k], after[k]) for k in before)
