"""Exports that load anywhere (ssa_megatron/hf/export.py): a gate-less model is a plain LlamaForCausalLM, a gated
one carries its remote code (auto_map + the package's files, copied verbatim), weights are sharded above a size
limit. The subprocess tests load the folders in a fresh ``python -I`` that never imports ssa_megatron and compare
its logits with the in-package HF model."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers.megatron import init_megatron, tiny_recipe
from helpers.tools import load_tool

SEQ = 64  # block 16: top_k 2 of 4 blocks is really sparse
ATOL = 1e-5  # fp32 logits


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Megatron checkpoints of a gated and a gate-less tiny model, and their exports (one sharded)."""
    init_megatron(tp=1, pp=1, cp=1)
    from ssa_megatron.config import to_dict
    from ssa_megatron.hf.convert import megatron_checkpoint_to_hf
    from ssa_megatron.megatron.model import build_gpt_model
    from ssa_megatron.training.checkpoint import Checkpointer

    out = {}
    for gate in ("per_head", "none"):
        recipe = tiny_recipe(seq_length=SEQ)
        recipe.ssa.gate = gate
        torch.manual_seed(7)
        model = build_gpt_model(recipe).eval()
        with torch.no_grad():  # norms away from 1 so a swapped norm would show
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(torch.randn_like(p) * 0.1)
        run = tmp_path_factory.mktemp(f"run_{gate}")
        Checkpointer(run / "checkpoints", keep_last=1).save(
            1, {"model": model.sharded_state_dict(), "recipe": to_dict(recipe), "step": 1})
        out[gate] = (model, megatron_checkpoint_to_hf(run, tmp_path_factory.mktemp(f"hf_{gate}")), run)
    out["sharded"] = (out["per_head"][0], megatron_checkpoint_to_hf(
        out["per_head"][2], tmp_path_factory.mktemp("hf_sharded"), max_shard_size="40KB"), None)
    return out


def _tokens():
    return torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(0))


def _megatron_logits(model, tokens, mode):
    from ssa_megatron.megatron.mode import force_mode

    pos = torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)
    with torch.no_grad(), force_mode(mode):
        return model(tokens, pos, None)


def _package_logits(folder, tokens, mode):
    from transformers import AutoModelForCausalLM

    import ssa_megatron.hf  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    assert type(model).__module__ == "ssa_megatron.hf.modeling"  # the registered class wins over auto_map
    model.set_attention_mode(mode)
    with torch.no_grad():
        return model(tokens).logits


def test_gateless_model_is_a_plain_llama(exports):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    model, folder, _ = exports["none"]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert "auto_map" not in cfg and not any(k.startswith("ssa_") for k in cfg)
    assert not (folder / "modeling.py").exists()
    llama = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    assert type(llama) is LlamaForCausalLM
    tokens = _tokens()
    with torch.no_grad():
        logits = llama(tokens).logits
    torch.testing.assert_close(logits, _megatron_logits(model, tokens, "full"), rtol=0, atol=ATOL)


def test_gated_export_carries_the_package_files(exports):
    from ssa_megatron.hf.export import AUTO_MAP, REMOTE_CODE

    _, folder, _ = exports["per_head"]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "ssa_llama" and cfg["auto_map"] == AUTO_MAP
    for name, source in REMOTE_CODE.items():
        assert (folder / name).read_bytes() == source.read_bytes(), name  # copied, not rewritten
    assert (folder / "model.safetensors").is_file() and not (folder / "model.safetensors.index.json").exists()


def test_sharded_export_round_trip(exports):
    from safetensors.torch import load_file

    from ssa_megatron.hf.convert import load_hf_folder

    _, whole, _ = exports["per_head"]
    _, sharded, _ = exports["sharded"]
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert not (sharded / "model.safetensors").exists()
    _, state = load_hf_folder(sharded)
    reference = load_file(whole / "model.safetensors")
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in state)
    tokens = _tokens()
    torch.testing.assert_close(_package_logits(sharded, tokens, "sparse"), _package_logits(whole, tokens, "sparse"),
                               rtol=0, atol=0)


_CHILD = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM

    jobs = json.loads(sys.argv[1])
    tokens = torch.load(sys.argv[2])
    out = {}
    for name, folder, remote, overrides in jobs:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote, **overrides).eval()
        with torch.no_grad():
            out[name] = (type(model).__module__, model(tokens).logits)
    torch.save(out, sys.argv[3])
    print("ssa_megatron imported:", any(m == "ssa_megatron" or m.startswith("ssa_megatron.") for m in sys.modules))
""")


def _load_in_fresh_process(tmp_path, jobs, tokens):
    """Runs ``_CHILD`` with the venv's python in isolated mode (no PYTHONPATH, no cwd or script dir on sys.path),
    from an empty directory, with its own HF cache. The editable install's finder can still resolve
    ``ssa_megatron``, so the child reports whether anything imported it."""
    (tmp_path / "child.py").write_text(_CHILD)
    torch.save(tokens, tmp_path / "tokens.pt")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf_home"),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-I", "child.py", json.dumps(jobs), "tokens.pt", "logits.pt"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "ssa_megatron imported: False" in result.stdout, result.stdout
    return torch.load(tmp_path / "logits.pt")


@pytest.mark.slow
def test_exports_load_without_ssa_megatron(exports, tmp_path):
    tokens = _tokens()
    gated, plain, sharded = (str(exports[k][1]) for k in ("per_head", "none", "sharded"))
    jobs = [
        ["gated_full", gated, True, {"ssa_mode": "full"}],
        ["gated_sparse", gated, True, {"ssa_mode": "sparse", "ssa_top_k": 2}],
        ["sharded_sparse", sharded, True, {"ssa_mode": "sparse", "ssa_top_k": 2}],
        ["plain", plain, False, {}],
    ]
    got = _load_in_fresh_process(tmp_path, jobs, tokens)
    for name in ("gated_full", "gated_sparse", "sharded_sparse"):
        module = got[name][0]
        assert module.startswith("transformers_modules.") and module.endswith(".modeling"), (name, module)
    assert got["plain"][0] == "transformers.models.llama.modeling_llama"

    gated_model = exports["per_head"][0]
    for mode in ("full", "sparse"):
        expected = _package_logits(exports["per_head"][1], tokens, mode)
        torch.testing.assert_close(got[f"gated_{mode}"][1], expected, rtol=0, atol=ATOL)
        torch.testing.assert_close(expected, _megatron_logits(gated_model, tokens, mode), rtol=0, atol=ATOL)
    torch.testing.assert_close(got["sharded_sparse"][1], got["gated_sparse"][1], rtol=0, atol=0)
    assert (got["gated_full"][1] - got["gated_sparse"][1]).abs().max() > 1e-3  # sparse really is sparse
    # Stock Llama gives the gate-less model's full-mode logits.
    torch.testing.assert_close(got["plain"][1], _megatron_logits(exports["none"][0], tokens, "full"), rtol=0,
                               atol=ATOL)


def test_keep_ssa_llama_for_a_gateless_model(exports, tmp_path):
    """plain_llama=False keeps a gate-less model's sparse mode (as ssa_llama with its remote code)."""
    from ssa_megatron.hf.convert import megatron_checkpoint_to_hf

    model, _, run = exports["none"]
    folder = megatron_checkpoint_to_hf(run, tmp_path / "hf", plain_llama=False)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "ssa_llama"
    tokens = _tokens()
    for mode in ("full", "sparse"):
        torch.testing.assert_close(_package_logits(folder, tokens, mode), _megatron_logits(model, tokens, mode),
                                   rtol=0, atol=ATOL)


def test_convert_to_hf_cli_says_what_it_writes(exports, tmp_path, capsys):
    tool = load_tool("convert_to_hf")

    assert tool.main([str(exports["none"][2]), str(tmp_path / "plain")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("convert_to_hf: ") and "plain LlamaForCausalLM" in out and "not expressible" in out
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["model_type"] == "llama"
    assert tool.main([str(exports["none"][2]), str(tmp_path / "x"), "--mode", "sparse"]) == 2
    assert "--keep-ssa-llama" in capsys.readouterr().err

    assert tool.main([str(exports["per_head"][2]), str(tmp_path / "gated"), "--max-shard-size", "40KB"]) == 0
    out = capsys.readouterr().out
    assert "ssa_llama + remote code" in out and "shards <= 40KB" in out
    assert (tmp_path / "gated" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "gated" / "modeling.py").is_file()


@pytest.mark.slow
def test_plain_llama_export_converts_back_to_megatron(exports, tmp_path):
    """A gate-less export (plain Llama) goes back to Megatron and out again unchanged."""
    from safetensors.torch import load_file

    from ssa_megatron.hf.convert import hf_to_megatron_checkpoint, megatron_checkpoint_to_hf

    _, folder, _ = exports["none"]
    hf_to_megatron_checkpoint(folder, tmp_path / "mcore")
    back = megatron_checkpoint_to_hf(tmp_path / "mcore", tmp_path / "hf")
    assert json.loads((back / "config.json").read_text())["model_type"] == "llama"
    a, b = load_file(folder / "model.safetensors"), load_file(back / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
