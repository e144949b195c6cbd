"""Compiled decoding on a GPU (ssa_megatron/hf/decoding.py): a static-cache decode step under
``torch.compile(mode="reduce-overhead", fullgraph=True)`` (Inductor, FlexAttention's decoding kernel in full mode,
CUDA graphs) agrees with the eager step, and ``generate(cache_implementation="static")`` (which compiles the decode
steps itself on CUDA) gives the dynamic cache's tokens."""

import pytest
import torch
from transformers import StaticCache

import ssa_megatron.hf  # noqa: F401
from ssa_megatron.hf.configuration import SSALlamaConfig
from ssa_megatron.hf.modeling import SSALlamaForCausalLM
from helpers.decoding import TIE_RTOL, record_selections, selection_gaps

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
PROMPT, TOTAL = 300, 340  # 19 blocks of 16 before decoding; the budget (8 blocks) is really sparse


def _model(dtype):
    config = SSALlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                            num_attention_heads=8, num_key_value_heads=2, head_dim=64, ssa_block_size=16,
                            ssa_top_k=8, ssa_mode="sparse")
    torch.manual_seed(0)
    model = SSALlamaForCausalLM(config).to(DEVICE, dtype).eval()
    model.fuse_projections()  # as from_pretrained loads it: the multi-row products then split their blocks
    return model, config


@pytest.mark.parametrize("mode", ["sparse", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_static_decoding_matches_eager(monkeypatch, mode, dtype):
    """In sparse mode every selection of either step must be the float64 reference's on that step's own query and
    pooled keys, up to float32 rounding (``TIE_RTOL``): this is what pins the compiled scoring's precision. The
    logits are then compared on a row only while both steps have selected the same blocks in every layer.

    Why not all logits: in bf16 the steps' activations differ by rounding (Inductor computes fused bf16 ops, such
    as RMSNorm and RoPE, in float32 and rounds once; eager rounds after every op), which also gives full mode its
    3e-2. This random model's block scores are nearly flat (the 8th and 9th differ by about 1e-3, relative), so
    that rounding swaps a few near-tied blocks (27 of 640 selections on CPU, the swapped blocks' float64 scores
    within 2.9e-3 of each other) and one swapped block of 8 moves a row's logits by up to 0.19 (relative), as
    much as a defect would. Each step's selection equals the float64 one on its own inputs in all 640."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model, config = _model(dtype)
    model.set_attention_mode(mode)
    records = record_selections(monkeypatch)
    tokens = torch.randint(0, config.vocab_size, (4, TOTAL), device=DEVICE)
    step = torch.compile(model, mode="reduce-overhead", fullgraph=True, dynamic=False)
    caches = [StaticCache(config=config, max_cache_len=TOTAL) for _ in range(2)]
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    same_blocks = torch.ones(4, dtype=torch.bool, device=DEVICE)  # rows whose selections agreed so far
    worst, compared, swapped = 0.0, 0, 0
    with torch.no_grad():
        for cache in caches:
            model(tokens[:, :PROMPT], cache=cache, use_cache=True)
        for t in range(PROMPT, TOTAL):
            records.clear()
            eager = model(tokens[:, t:t + 1], cache=caches[0], use_cache=True).logits.float()
            torch.compiler.cudagraph_mark_step_begin()
            got = step(tokens[:, t:t + 1], cache=caches[1], use_cache=True).logits.float()
            steps = [tuple(x.clone() for x in r) for r in records]  # before the next replay reuses the memory
            assert len(steps) == (2 * config.num_hidden_layers if mode == "sparse" else 0)
            layers = len(steps) // 2
            for layer, (e, c) in enumerate(zip(steps[:layers], steps[layers:])):
                for path, (q, pooled, length, idx) in (("eager", e), ("compiled", c)):
                    gaps = selection_gaps(idx, q, pooled, length, config, config.head_dim ** -0.5)
                    assert gaps.max() <= TIE_RTOL, (path, t, layer, gaps.max().item())
                differ = (e[3].sort(-1).values != c[3].sort(-1).values).flatten(1).any(-1)
                swapped += int(differ.sum())
                same_blocks &= ~differ
            rel = (got - eager).abs().amax((1, 2)) / eager.abs().amax((1, 2))
            worst = max(worst, float(torch.where(same_blocks, rel, 0).max()))
            compared += int(same_blocks.sum())
    assert compared > 0 and worst < tolerance, (worst, compared, swapped)
    assert all(int(m.split_tickets.abs().sum()) == 0 for m in model.modules() if hasattr(m, "split_tickets"))


def test_generate_static_matches_dynamic():
    torch.backends.cuda.matmul.allow_tf32 = False
    model, config = _model(torch.float32)
    prompt = torch.randint(0, config.vocab_size, (2, PROMPT), device=DEVICE)
    kwargs = dict(max_new_tokens=24, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        dynamic = model.generate(prompt, **kwargs)
        static = model.generate(prompt, cache_implementation="static", **kwargs)
    assert torch.equal(static, dynamic)


@pytest.mark.parametrize("batch, n, length", [(1, 2056, 32768), (32, 2056, 32768), (4, 520, 3000)])
def test_selection_kernels_match_the_reference_and_the_torch_path(monkeypatch, batch, n, length):
    """The Triton selection (``decode_triton``, what a bf16 decode step on CUDA runs, eager or compiled) against
    the float64 reference on the same inputs (tie-aware, ``TIE_RTOL``) and against the torch path it replaces (one
    scoring GEMM, softmax, top-k), at the 1B shape's group of 16 and 32k context."""
    from types import SimpleNamespace

    from ssa_megatron.hf import decode_triton, decoding
    from helpers.decoding import selection_gaps

    config = SimpleNamespace(ssa_block_size=16, ssa_top_k=16, ssa_sink_blocks=1, ssa_local_blocks=2,
                             ssa_score="group_softmax")
    gen = torch.Generator(device=DEVICE).manual_seed(batch)
    q = torch.randn(batch, 32, 1, 64, generator=gen, device=DEVICE).bfloat16()
    pooled = torch.randn(batch, 2, n, 64, generator=gen, device=DEVICE).bfloat16()
    length = torch.tensor(length, device=DEVICE)
    assert decode_triton.use_kernels(q, pooled)
    got = decoding.select_decode_blocks(q, pooled, length, config, 0.125)
    compiled = torch.compile(decoding.select_decode_blocks, fullgraph=True)(q, pooled, length, config, 0.125)
    monkeypatch.setattr(decoding, "use_kernels", lambda q, cached: False)
    torch_path = decoding.select_decode_blocks(q, pooled, length, config, 0.125)
    for name, idx in (("kernels", got), ("compiled kernels", compiled), ("torch", torch_path)):
        gaps = selection_gaps(idx, q, pooled, length, config, 0.125)
        assert gaps.max() <= TIE_RTOL, (name, gaps.max().item())
    assert torch.equal(got.sort(-1).values, compiled.sort(-1).values)
