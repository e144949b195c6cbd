"""Fused projections (ssa_megatron/hf/modeling.py, ``FusedProjections``): one GEMM for q|k|v|g and one for gate|up per
layer. The fused model decodes to the same logits as the separate one (bitwise for one-token steps on CPU), trains
to the same gradients, holds each weight once, and everything it writes or hands out keeps Llama's names and bytes:
``state_dict()``, ``load_state_dict()``, ``save_pretrained`` and ``write_export``. ``from_pretrained`` fuses."""

import copy
import filecmp

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, StaticCache

import ssa_megatron.hf  # noqa: F401  (registers ssa_llama)
from ssa_megatron.hf.configuration import SSALlamaConfig
from ssa_megatron.hf.export import write_export
from ssa_megatron.hf.modeling import SSALlamaForCausalLM

PROMPT, TOTAL = 29, 36  # decoding completes block 1 (of 16 tokens) and starts block 2


def _model(gate="per_head", **fields):
    config = SSALlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, ssa_block_size=16,
                            ssa_top_k=2, ssa_gate=gate, **fields)
    torch.manual_seed(0)
    return SSALlamaForCausalLM(config).eval(), config


def _fused(model):
    fused = copy.deepcopy(model)
    fused.fuse_projections()
    return fused


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["sparse", "full"])
def test_fused_model_decodes_to_the_same_logits(mode, dtype):
    """Decode steps (two rows per GEMM) on copies of one prefilled cache, static and dynamic, across a block
    boundary: bitwise equal logits. A full forward over 2 x 40 tokens (80 rows per GEMM) agrees to rounding: the
    BLAS may block the wider GEMM otherwise."""
    model, config = _model()
    model = model.to(dtype)
    model.set_attention_mode(mode)
    fused = _fused(model)
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert fused.projections_fused and not model.projections_fused
    assert attn.fused_sizes == (64, 32, 32, 4) and mlp.fused_sizes == (96, 96)
    assert not any(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "g_proj"))
    tokens = torch.randint(0, config.vocab_size, (2, TOTAL), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(fused(tokens).logits, model(tokens).logits)
        for make in (lambda: DynamicCache(config=config), lambda: StaticCache(config=config, max_cache_len=TOTAL)):
            caches = [make()]
            model(tokens[:, :PROMPT], cache=caches[0], use_cache=True)
            caches.append(copy.deepcopy(caches[0]))
            for t in range(PROMPT, TOTAL):
                step = tokens[:, t:t + 1]
                ref = model(step, cache=caches[0], use_cache=True).logits
                got = fused(step, cache=caches[1], use_cache=True).logits
                assert torch.equal(got, ref), (mode, type(caches[0]).__name__, t, (got - ref).abs().max())


def test_fused_static_step_compiles_into_one_graph():
    from torch._dynamo.utils import counters

    model, config = _model()
    fused = _fused(model)
    tokens = torch.randint(0, config.vocab_size, (2, TOTAL), generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(fused, backend="eager", fullgraph=True)
    cache = StaticCache(config=config, max_cache_len=TOTAL)
    with torch.no_grad():
        full = model(tokens).logits
        fused(tokens[:, :20], cache=cache, use_cache=True)
        for t in range(20, 24):
            torch.testing.assert_close(step(tokens[:, t:t + 1], cache=cache, use_cache=True).logits[:, 0], full[:, t])
    assert counters["stats"]["unique_graphs"] == 1


def test_fused_model_trains_to_the_same_gradients():
    """A backward through the stacked weight gives each projection's gradient (finetune.py trains through the same
    modules in either layout)."""
    model, config = _model()
    model.train()
    fused = _fused(model)
    tokens = torch.randint(0, config.vocab_size, (2, TOTAL), generator=torch.Generator().manual_seed(3))
    for m in (model, fused):
        m(tokens, labels=tokens).loss.backward()
    for layer, fused_layer in zip(model.model.layers, fused.model.layers):
        for parent, fused_parent in ((layer.self_attn, fused_layer.self_attn), (layer.mlp, fused_layer.mlp)):
            stacked = getattr(fused_parent, fused_parent.fused_name).weight.grad.split(fused_parent.fused_sizes)
            for name, grad in zip(fused_parent.projection_names(), stacked):
                torch.testing.assert_close(grad, getattr(parent, name).weight.grad)


def test_state_dict_and_saved_files_keep_llama_names(tmp_path):
    """Same keys in the same order and the same tensors; a Llama-named state dict loads into the fused model; the
    folders written by save_pretrained and write_export are byte-identical; each weight is held once; unfusing
    restores the modules in their order; from_pretrained fuses unless told not to."""
    model, config = _model()
    fused = _fused(model)
    state, fused_state = model.state_dict(), fused.state_dict()
    assert list(fused_state) == list(state)
    assert all(torch.equal(fused_state[k], state[k]) for k in state)
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in model.parameters())
    storages = {p.untyped_storage().data_ptr() for p in fused.parameters()}
    assert len(storages) == len(list(fused.parameters()))  # no weight kept beside the stacked one

    other = _fused(_model()[0])
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    other.load_state_dict(state)  # strict: Llama names into the stacked weights
    assert all(torch.equal(other.state_dict()[k], state[k]) for k in state)

    for name, m in (("separate", model), ("fused", fused)):
        m.save_pretrained(tmp_path / name / "pretrained")
        write_export(tmp_path / name / "export", config, m.state_dict())
    for kind in ("pretrained", "export"):
        separate, fused_dir = tmp_path / "separate" / kind, tmp_path / "fused" / kind
        names = sorted(p.name for p in separate.iterdir())
        assert names == sorted(p.name for p in fused_dir.iterdir())
        match, mismatch, errors = filecmp.cmpfiles(separate, fused_dir, names, shallow=False)
        assert not mismatch and not errors, (kind, mismatch, errors)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "separate" / "pretrained")
    assert loaded.projections_fused
    assert not SSALlamaForCausalLM.from_pretrained(tmp_path / "separate" / "pretrained",
                                                   fuse_projections=False).projections_fused

    fused.unfuse_projections()
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert all(torch.equal(fused.state_dict()[k], state[k]) for k in state)


def test_biased_projections_stay_separate(tmp_path):
    model, _ = _model(attention_bias=True)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn: q_proj has a bias"):
        model.fuse_projections()
    model.save_pretrained(tmp_path)
    loaded = SSALlamaForCausalLM.from_pretrained(tmp_path)
    assert not loaded.model.layers[0].self_attn.fused_sizes  # left separate, as the blocker says
    assert loaded.model.layers[0].mlp.fused_sizes is None
