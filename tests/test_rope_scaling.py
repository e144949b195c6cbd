"""RoPE scaling (model.rope_scaling, llama3): the Megatron frequencies equal transformers' llama3 rule, Megatron and
the converted HF model give the same logits with it (also past the trained length), conversion keeps it both ways,
and bad values are named."""

import pytest
import torch

from helpers.megatron import init_megatron, tiny_recipe

SEQ = 64
ATOL = 1e-5


def _llama3(recipe, factor=4.0, low=1.0, high=4.0, original=SEQ):
    from ssa_megatron.config import RopeScalingConfig

    recipe.model.rope_theta = 10000.0
    recipe.model.rope_scaling = RopeScalingConfig(type="llama3", factor=factor, low_freq_factor=low,
                                                  high_freq_factor=high, original_max_position_embeddings=original)
    recipe.validate()
    return recipe


@pytest.mark.parametrize("factor,low,high,original", [(4.0, 1.0, 4.0, 64), (8.0, 1.0, 4.0, 8192),
                                                      (2.0, 2.0, 8.0, 256)])
def test_inverse_frequencies_equal_transformers_llama3(factor, low, high, original):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from ssa_megatron.config import RopeScalingConfig
    from ssa_megatron.megatron.model import llama3_inv_freq

    head_dim, theta = 64, 500000.0
    base = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ours = llama3_inv_freq(base, RopeScalingConfig("llama3", factor, low, high, original))
    config = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                         max_position_embeddings=original * 4,
                         rope_parameters={"rope_type": "llama3", "rope_theta": theta, "factor": factor,
                                          "low_freq_factor": low, "high_freq_factor": high,
                                          "original_max_position_embeddings": original})
    theirs, scaling = ROPE_INIT_FUNCTIONS["llama3"](config)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    assert scaling == 1.0
    # All three regimes occur (kept, divided by factor, interpolated), so the comparison covers each branch.
    ratio = base / ours
    assert (ratio == 1).any() and torch.isclose(ratio, torch.tensor(factor)).any()
    assert ((ratio > 1.0001) & (ratio < factor * 0.9999)).any()


@pytest.fixture(scope="module")
def scaled_run(tmp_path_factory):
    init_megatron(tp=1, pp=1, cp=1)
    from ssa_megatron.config import to_dict
    from ssa_megatron.hf.convert import megatron_checkpoint_to_hf
    from ssa_megatron.megatron.model import build_gpt_model
    from ssa_megatron.training.checkpoint import Checkpointer

    recipe = _llama3(tiny_recipe(seq_length=SEQ))
    torch.manual_seed(3)
    model = build_gpt_model(recipe).eval()
    run = tmp_path_factory.mktemp("run_llama3")
    Checkpointer(run / "checkpoints", keep_last=1).save(
        1, {"model": model.sharded_state_dict(), "recipe": to_dict(recipe), "step": 1})
    hf_dir = megatron_checkpoint_to_hf(run, tmp_path_factory.mktemp("hf_llama3"))
    return model, recipe, run, hf_dir


def test_megatron_and_hf_logits_match_with_llama3_scaling(scaled_run):
    from transformers import AutoModelForCausalLM

    import ssa_megatron.hf  # noqa: F401
    from ssa_megatron.megatron.mode import force_mode

    model, recipe, _, hf_dir = scaled_run
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    params = hf.config.rope_parameters
    assert params["rope_type"] == "llama3" and params["factor"] == 4.0
    assert params["original_max_position_embeddings"] == SEQ
    torch.testing.assert_close(hf.model.rotary_emb.inv_freq, model.rotary_pos_emb.inv_freq, rtol=0, atol=0)
    for length in (SEQ, 2 * SEQ):  # 2x: the Megatron RoPE table grows past max_sequence_length
        tokens = torch.randint(0, 128, (2, length), generator=torch.Generator().manual_seed(length))
        pos = torch.arange(length).expand(2, -1)
        for mode in ("full", "sparse"):
            hf.set_attention_mode(mode)
            with torch.no_grad(), force_mode(mode):
                expected = model(tokens, pos, None)
                got = hf(tokens).logits
            torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


def test_scaling_changes_the_model(scaled_run):
    """The same weights without scaling give other logits: the frequencies really reach the attention."""
    from ssa_megatron.megatron.model import build_gpt_model
    from ssa_megatron.megatron.mode import force_mode

    model, recipe, _, _ = scaled_run
    plain = tiny_recipe(seq_length=SEQ)
    plain.model.rope_theta = recipe.model.rope_theta
    other = build_gpt_model(plain).eval()
    other.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 128, (1, SEQ), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(SEQ)[None]
    with torch.no_grad(), force_mode("full"):
        assert (model(tokens, pos, None) - other(tokens, pos, None)).abs().max() > 1e-3


def test_conversion_keeps_scaling_both_ways(scaled_run):
    from ssa_megatron.hf.convert import load_hf_folder, recipe_for_hf_config

    _, recipe, _, hf_dir = scaled_run
    config, _ = load_hf_folder(hf_dir)
    assert recipe_for_hf_config(config).model.rope_scaling == recipe.model.rope_scaling
    config.megatron_recipe = None  # an HF folder from elsewhere: the recipe comes from rope_parameters alone
    assert recipe_for_hf_config(config).model.rope_scaling == recipe.model.rope_scaling
    config.rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        recipe_for_hf_config(config)


def test_bad_rope_scaling_is_named():
    from ssa_megatron.config import load_recipe

    with pytest.raises(ValueError, match=r"model.rope_scaling.factor=0.5: must be >= 1"):
        load_recipe("tiny", ["model.rope_scaling.type=llama3", "model.rope_scaling.factor=0.5"])
    with pytest.raises(ValueError, match=r"model.rope_scaling.type='yarn'"):
        load_recipe("tiny", ["model.rope_scaling.type=yarn"])
    with pytest.raises(ValueError, match=r"low_freq_factor=4.0, high_freq_factor=1.0"):
        load_recipe("tiny", ["model.rope_scaling.type=llama3", "model.rope_scaling.low_freq_factor=4",
                             "model.rope_scaling.high_freq_factor=1"])


@pytest.mark.slow
def test_continual_training_at_a_longer_context_from_another_run(tmp_path):
    """What recipes/ssa_1b_32k.yaml does, tiny: checkpoint.load of a shorter-context run into a run with twice the
    seq_length and llama3 RoPE scaling. Weights only are read (the new run starts at step 0); with a negligible LR
    its weights stay the loaded ones."""
    from helpers.training import run_training, tiny_test_recipe

    from ssa_megatron.training.checkpoint import read_checkpoint_recipe, read_model_tensors, resolve_checkpoint

    short = run_training(tiny_test_recipe(tmp_path / "short", "train.steps=2", "checkpoint.interval=0"))
    assert short.start_step == 0
    long = run_training(tiny_test_recipe(
        tmp_path / "long", "train.steps=1", "checkpoint.interval=0", "model.seq_length=128",
        "model.rope_scaling.type=llama3", "model.rope_scaling.factor=2",
        "model.rope_scaling.original_max_position_embeddings=64",
        "optim.lr=1e-12", "optim.min_lr=0", "optim.warmup_steps=0", f"checkpoint.load={tmp_path / 'short'}"))
    assert long.start_step == 0 and all(torch.isfinite(torch.tensor(long.losses)))
    before = read_model_tensors(resolve_checkpoint(tmp_path / "short"))
    after_ckpt = resolve_checkpoint(tmp_path / "long")
    recipe, _ = read_checkpoint_recipe(after_ckpt)
    assert recipe.model.seq_length == 128 and recipe.model.rope_scaling.type == "llama3"
    after = read_model_tensors(after_ckpt)
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("rope", [{"rope_type": "default", "rope_theta": 500000.0},
                                  {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192}])
def test_hf_rotary_embedding_equals_llamas_and_the_matmul_form(rope):
    """The exported model's rotary embedding (an elementwise product of positions and frequencies) gives Llama's
    angles bit for bit, and those of the one-term matmul of transformers before 5.24, at positions up to 128k."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from ssa_megatron.hf.configuration import SSALlamaConfig
    from ssa_megatron.hf.modeling import SSALlamaForCausalLM, SSALlamaRotaryEmbedding

    config = SSALlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=96, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                            max_position_embeddings=131072, rope_parameters=rope)
    ours, llama = SSALlamaRotaryEmbedding(config), LlamaRotaryEmbedding(config)
    assert isinstance(SSALlamaForCausalLM(config).model.rotary_emb, SSALlamaRotaryEmbedding)
    positions = torch.tensor([[0, 1, 7, 16, 4095, 8191, 32767, 131071], [3, 2, 1, 0, 65535, 5, 6, 100000]])
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.zeros(1, dtype=dtype)
        for a, b in zip(ours(x, positions), llama(x, positions)):
            assert a.dtype == dtype and torch.equal(a, b)
    freqs = (ours.inv_freq[None, :, None].float().expand(2, -1, 1) @ positions[:, None, :].float()).transpose(1, 2)
    cos, sin = ours(torch.zeros(1), positions)
    assert torch.equal(cos, torch.cat((freqs, freqs), -1).cos() * ours.attention_scaling)
    assert torch.equal(sin, torch.cat((freqs, freqs), -1).sin() * ours.attention_scaling)
