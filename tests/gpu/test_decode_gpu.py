"""Compiled decoding on a GPU (ssa_megatron/hf/decoding.py): a static-cache decode step under
``torch.compile(mode="reduce-overhead", fullgraph=True)`` (Inductor, FlexAttention's decoding kernel in full mode,
CUDA graphs) gives the eager step's logits, and ``generate(cache_implementation="static")`` (which compiles the decode
steps itself on CUDA) gives the dynamic cache's tokens."""

import pytest
import torch
from transformers import StaticCache

import ssa_megatron.hf  # noqa: F401
from ssa_megatron.hf.configuration import SSALlamaConfig
from ssa_megatron.hf.modeling import SSALlamaForCausalLM

pytestmark = pytest.mark.gpu

PROMPT, TOTAL = 300, 340  # 19 blocks of 16 before decoding; the budget (8 blocks) is really sparse


def _model(dtype):
    config = SSALlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                            num_attention_heads=8, num_key_value_heads=2, head_dim=64, ssa_block_size=16,
                            ssa_top_k=8, ssa_mode="sparse")
    torch.manual_seed(0)
    return SSALlamaForCausalLM(config).to("cuda", dtype).eval(), config


@pytest.mark.parametrize("mode", ["sparse", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_static_decoding_matches_eager(mode, dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    model, config = _model(dtype)
    model.set_attention_mode(mode)
    tokens = torch.randint(0, config.vocab_size, (4, TOTAL), device="cuda")
    step = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    caches = [StaticCache(config=config, max_cache_len=TOTAL) for _ in range(2)]
    worst = 0.0
    with torch.no_grad():
        for cache in caches:
            model(tokens[:, :PROMPT], cache=cache, use_cache=True)
        for t in range(PROMPT, TOTAL):
            eager = model(tokens[:, t:t + 1], cache=caches[0], use_cache=True).logits.float()
            torch.compiler.cudagraph_mark_step_begin()
            got = step(tokens[:, t:t + 1], cache=caches[1], use_cache=True).logits.float()
            worst = max(worst, float((got - eager).abs().max() / eager.abs().max()))
    assert worst < (1e-4 if dtype == torch.float32 else 3e-2), worst


def test_generate_static_matches_dynamic():
    torch.backends.cuda.matmul.allow_tf32 = False
    model, config = _model(torch.float32)
    prompt = torch.randint(0, config.vocab_size, (2, PROMPT), device="cuda")
    kwargs = dict(max_new_tokens=24, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        dynamic = model.generate(prompt, **kwargs)
        static = model.generate(prompt, cache_implementation="static", **kwargs)
    assert torch.equal(static, dynamic)
