"""Cached decoding (ssa_megatron/hf/decoding.py): token-by-token logits on the SSA cache layers, dynamic and static,
equal one full forward over the same tokens in both modes (float64), the new token's selection reads the pooled
keys kept in the cache (the general path is not called), those pooled keys are the reference's, a static decode
step compiles into one graph, and in bf16 a selection compiled by Inductor equals the eager one and the float64
reference's on the same inputs up to float32 rounding."""

import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import DynamicCache, StaticCache

import ssa_megatron.hf  # noqa: F401  (registers ssa_llama)
from ssa_megatron.hf import modeling
from ssa_megatron.hf.configuration import SSALlamaConfig
from ssa_megatron.hf.decoding import SSADynamicLayer, SSAStaticLayer, round_to, select_decode_blocks
from ssa_megatron.ssa import reference
from helpers.decoding import TIE_RTOL, selection_gaps

PROMPT, TOTAL = 21, 60  # the prompt ends inside block 1; decoding crosses two block boundaries (block 16)


def _model(heads=4, kv_heads=1, top_k=3, score="group_softmax", sink=1, local=0, gate="per_head"):
    config = SSALlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16,
                            ssa_block_size=16, ssa_top_k=top_k, ssa_score=score, ssa_sink_blocks=sink,
                            ssa_local_blocks=local, ssa_gate=gate, ssa_mode="sparse")
    torch.manual_seed(3)
    model = modeling.SSALlamaForCausalLM(config).double().eval()
    with torch.no_grad():  # a gate away from 0.5 everywhere, so a gate applied twice or not at all would show
        for attn in model.ssa_attention_modules():
            if attn.g_proj is not None:
                attn.g_proj.weight.normal_(0, 0.5)
    return model, config


def _cache(kind, config):
    return DynamicCache(config=config) if kind == "dynamic" else StaticCache(config=config, max_cache_len=TOTAL)


def _general_path_calls(monkeypatch):
    """Counts calls of the general path (``ssa_attention``) with one query token."""
    calls = []
    original = modeling.ssa_attention

    def counting(q, *args, **kwargs):
        if q.shape[0] == 1:
            calls.append(q.shape)
        return original(q, *args, **kwargs)

    monkeypatch.setattr(modeling, "ssa_attention", counting)
    return calls


# Budget 3 blocks: more than the first decoded tokens can fill (own + 1 earlier block); from position 48 on, own + a
# forced block + the best of two scored ones.
GROUP4_SINK = dict()
GROUP2_LOCAL_DOT = dict(heads=4, kv_heads=2, score="dot", sink=0, local=1, gate="none")


@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("mode, shape", [("sparse", GROUP4_SINK), ("sparse", GROUP2_LOCAL_DOT), ("full", GROUP4_SINK)],
                         ids=["sparse-group4-sink", "sparse-group2-local-dot", "full-group4"])
def test_cached_decoding_equals_full_forward(monkeypatch, kind, mode, shape):
    model, config = _model(**shape)
    model.set_attention_mode(mode)
    tokens = torch.randint(0, config.vocab_size, (3, TOTAL), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(tokens).logits
        cache = _cache(kind, config)
        out = model(tokens[:, :PROMPT], cache=cache, use_cache=True)
        torch.testing.assert_close(out.logits, full[:, :PROMPT], rtol=0, atol=1e-10)
        calls = _general_path_calls(monkeypatch)
        for t in range(PROMPT, TOTAL):
            out = model(tokens[:, t:t + 1], cache=cache, use_cache=True)
            torch.testing.assert_close(out.logits[:, 0], full[:, t], rtol=0, atol=1e-10)
    layer = cache.layers[0]
    assert isinstance(layer, SSADynamicLayer if kind == "dynamic" else SSAStaticLayer)
    # Sparse decoding always reads the cache's pooled keys; full mode runs the backend's one pass over a growing
    # cache, and FlexAttention over a static one.
    assert len(calls) == (TOTAL - PROMPT) * config.num_hidden_layers * (mode == "full" and kind == "dynamic")


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_pooled_keys_in_the_cache_are_the_reference_pooling(kind):
    model, config = _model()
    tokens = torch.randint(0, config.vocab_size, (2, TOTAL), generator=torch.Generator().manual_seed(1))
    cache = _cache(kind, config)
    with torch.no_grad():
        model(tokens[:, :PROMPT], cache=cache, use_cache=True)
        for t in range(PROMPT, TOTAL):
            model(tokens[:, t:t + 1], cache=cache, use_cache=True)
    for layer in cache.layers:
        keys = layer.keys[:, :, :TOTAL].permute(2, 0, 1, 3)  # [s, b, HKV, D]
        k_bar, is_start = reference.pool_block_keys(keys, torch.zeros(2, TOTAL, dtype=torch.long), 16)
        complete = TOTAL // 16
        torch.testing.assert_close(layer.pooled[:, :, :complete], k_bar[:, :, is_start[0]], rtol=0, atol=0)


def test_generate_static_and_dynamic_match_greedy_full_forwards():
    model, config = _model()
    prompt = torch.randint(0, config.vocab_size, (2, PROMPT), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)  # all 20 tokens
    with torch.no_grad():
        dynamic = model.generate(prompt, **kwargs)
        static = model.generate(prompt, cache_implementation="static", **kwargs)
        greedy = prompt
        for _ in range(20):
            greedy = torch.cat([greedy, model(greedy).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(dynamic, greedy) and torch.equal(static, greedy)


@pytest.mark.parametrize("mode", ["sparse", "full"])
def test_static_decode_step_compiles_into_one_graph(mode):
    """fullgraph=True: no graph break and no host synchronisation in a step (what CUDA-graph capture needs); the
    same graph serves every step (no recompilation as the cache grows)."""
    from torch._dynamo.utils import counters

    model, config = _model()
    model = model.float()
    model.set_attention_mode(mode)
    tokens = torch.randint(0, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(4))
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        full = model(tokens).logits
        cache = _cache("static", config)
        model(tokens[:, :PROMPT], cache=cache, use_cache=True)
        for t in range(PROMPT, 40):
            out = step(tokens[:, t:t + 1], cache=cache, use_cache=True)
            torch.testing.assert_close(out.logits[:, 0], full[:, t], rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1


def test_block_size_change_needs_a_new_cache():
    model, config = _model()
    tokens = torch.randint(0, config.vocab_size, (1, 40))
    cache = _cache("static", config)
    with torch.no_grad():
        model(tokens[:, :PROMPT], cache=cache, use_cache=True)
        model.set_attention_mode("sparse", block_size=32, top_k=2)
        with pytest.raises(ValueError, match="ssa_block_size=32 differs from the 16"):
            model(tokens[:, PROMPT:PROMPT + 1], cache=cache, use_cache=True)


_CHILD = textwrap.dedent("""
    import sys
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache, StaticCache

    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    for mode in ("sparse", "full"):
        model.set_attention_mode(mode)
        for cache in (DynamicCache(config=model.config), StaticCache(config=model.config, max_cache_len=40)):
            with torch.no_grad():
                full = model(tokens).logits
                model(tokens[:, :21], cache=cache, use_cache=True)
                err = max((model(tokens[:, t:t + 1], cache=cache, use_cache=True).logits[:, 0] - full[:, t]).abs().max()
                          for t in range(21, 40))
            print(mode, type(cache.layers[0]).__module__, type(cache.layers[0]).__name__, float(err))
    print("ssa_megatron imported:", any(m == "ssa_megatron" or m.startswith("ssa_megatron.") for m in sys.modules))
""")


@pytest.mark.slow
def test_exported_folder_decodes_without_ssa_megatron(tmp_path):
    """The copied decoding.py serves trust_remote_code loading: its cache layers are registered and used, and cached
    decoding equals the full forward, in a fresh ``python -I`` that never imports ssa_megatron."""
    from ssa_megatron.hf.export import write_export

    model, config = _model()
    folder = tmp_path / "export"
    assert write_export(folder, config, {k: v.float() for k, v in model.state_dict().items()}) == "ssa_llama"
    (tmp_path / "child.py").write_text(_CHILD)
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf_home"),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-I", "child.py", str(folder)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "ssa_megatron imported: False", result.stdout
    layers = [line.split() for line in lines[:-1]]
    assert [(mode, name) for mode, _, name, _ in layers] == [
        ("sparse", "SSADynamicLayer"), ("sparse", "SSAStaticLayer"), ("full", "SSADynamicLayer"),
        ("full", "SSAStaticLayer")]
    for _, module, _, err in layers:
        assert module.startswith("transformers_modules.") and module.endswith(".decoding"), module
        assert float(err) < 1e-5


def test_float32_top_k_breaks_ties_to_the_later_block_like_the_sort():
    """The float32 ranking (one topk over packed int64 keys) against the float64 one (stable sort), with exact ties,
    signed zeros, infinities and fewer selectable entries than the budget."""
    from ssa_megatron.hf.decoding import top_k_later_first

    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(-3, 4, (64, 20), generator=gen).float()  # many exact ties
    scores[:, 0] = -0.0
    scores[:, 1] = 0.0
    scores[::3, 5] = float("inf")
    selectable = torch.rand(64, 20, generator=gen) < 0.7
    selectable[0] = False
    selectable[1, :3] = True
    selectable[1, 3:] = False
    scores = scores.masked_fill(~selectable, float("-inf"))  # as block_scores leaves the non-candidates
    for k in (1, 6, 25):
        fast = top_k_later_first(scores, selectable, k).sort(-1).values
        exact = top_k_later_first(scores.double(), selectable, k).sort(-1).values
        assert torch.equal(fast, exact), k


@pytest.mark.parametrize("n", [64, 128, 129, 300, 2048, 5000])
@pytest.mark.parametrize("k", [1, 16, 50])
def test_sort_tournament_keeps_the_top_k_largest_keys(monkeypatch, n, k):
    """The compiled path's top-k (chunked sorts, ``_largest``) keeps the same keys as ``topk``: chunk counts that are
    not whole, one chunk, several rounds, ``int64`` minimum keys (non-selectable entries) among them."""
    from ssa_megatron.hf import decoding

    gen = torch.Generator().manual_seed(n * 1000 + k)
    keys = torch.randperm(4 * n, generator=gen)[:3 * n].view(3, n) - 2 * n  # distinct, both signs
    keys[1, ::2] = torch.iinfo(torch.int64).min  # half the row not selectable (their keys may repeat)
    expected = torch.topk(keys, k, dim=-1).values.sort(-1).values
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    got = decoding._largest(keys, k)
    assert got.shape == (3, k)
    assert torch.equal(got.sort(-1).values, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_to_is_the_cast(dtype):
    """``round_to`` (integer operations, which Inductor keeps) equals ``x.to(dtype).float()`` over the whole exponent
    range, on the midpoints between neighbouring values (ties to even), subnormals, the overflow edge, infinities."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(100_000, generator=gen) * torch.exp2(torch.randint(-30, 20, (100_000,), generator=gen).float())
    low = x.to(dtype)
    high = (low.view(torch.int16) + 1).view(dtype)  # the next value away from zero
    mid = (low.double() + high.double()) / 2
    edges = torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -25, 3.3e38,
                          3.4e38, math.inf, -math.inf])
    x = torch.cat([x, mid[mid.float().double() == mid].float(), edges])  # midpoints that float32 holds exactly
    assert torch.equal(round_to(x, dtype), x.to(dtype).float())


@pytest.mark.slow  # Inductor builds C++ kernels: about 25 s on two cores
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="Inductor on CPU needs a C++ compiler")
def test_inductor_bf16_selection_equals_eager_and_float64():
    """bf16, Inductor (CPU, fullgraph) against eager on the same inputs: both select what the float64 reference
    selects from those inputs, up to float32 rounding (``TIE_RTOL``), and exact ties go to the later block. The query
    is computed inside the compiled function, as RoPE computes it in a decode step, so Inductor fuses it into the
    scoring and would score it unrounded (in float32) without ``round_to``; on these inputs that changes selections
    by more than ``TIE_RTOL`` (counted below), so the check can see it."""
    config = SSALlamaConfig(num_attention_heads=8, num_key_value_heads=2, head_dim=64, ssa_block_size=16,
                            ssa_top_k=8, ssa_sink_blocks=1, ssa_local_blocks=1)
    scale = 0.125
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 8, 1, 64, generator=gen).bfloat16()
    rotation = (1 + torch.rand(128, 8, 1, 64, generator=gen)).bfloat16()
    pooled = (0.05 * torch.randn(128, 2, 128, 64, generator=gen)).bfloat16()  # near-flat scores: many near-ties
    pooled[0] = pooled[0, :, :1]  # row 0: one block repeated, all scores tie exactly

    def step(x, rotation, pooled, length):
        return select_decode_blocks(x * rotation, pooled, length, config, scale)

    compiled = torch.compile(step, fullgraph=True)
    q = x * rotation  # rounded to bf16, as the compiled step now scores it
    unrounded_changes = 0
    for length in (40, 1024, 2047):  # fewer candidates than the budget; half the blocks; all
        length = torch.tensor(length)
        for name, idx in (("eager", step(x, rotation, pooled, length)),
                          ("compiled", compiled(x, rotation, pooled, length))):
            gaps = selection_gaps(idx, q, pooled, length, config, scale)
            assert gaps.max() <= TIE_RTOL, (name, int(length), gaps.max().item())
        unrounded = select_decode_blocks(x.float() * rotation.float(), pooled, length, config, scale)
        unrounded_changes += int((selection_gaps(unrounded, q, pooled, length, config, scale) > TIE_RTOL).sum())
    assert unrounded_changes >= 3, unrounded_changes  # 6 of 768 selections on this seed
