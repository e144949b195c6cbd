"""The decode-time Triton kernels (ssa_megatron/hf/decode_triton.py), under the Triton interpreter in float16 (its
bf16 ``tl.dot`` is wrong), or on a GPU:
- the block selection: each selection is the float64 reference's on the same query and pooled keys, up to float32
  rounding (``TIE_RTOL``), and equals the torch path's (``decoding.select_decode_blocks`` on CPU) block for block.
  Shapes: GQA groups 1 to 16, head dims that are not powers of two, block counts that are not whole chunks, fewer
  candidates than the budget, one chunk and several, both scores;
- the sparse attention (the selection's first two kernels, then the attention kernel, which takes the final top-k
  itself) and full mode's split-KV attention: against the float64 reference's attention of the one query and
  against the torch or FlexAttention path they replace. Budgets that are not powers of two and budgets above
  ``BLOCK_N`` keys (every chunk keeps all its candidates) for both the selection and the attention."""

import math
from types import SimpleNamespace

import pytest
import torch

from helpers.decoding import TIE_RTOL, selection_gaps
from ssa_megatron.hf import decode_triton, decoding
from ssa_megatron.ssa import reference

pytestmark = pytest.mark.skipif(decode_triton.triton is None, reason="needs triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter (tests/conftest.py)

CASES = [  # b, HQ, HKV, D, blocks in the buffer, length (the new token is at length - 1), config changes
    (2, 4, 2, 16, 20, 250, {}),  # G 2, one chunk
    (1, 16, 1, 64, 300, 4000, dict(ssa_top_k=16)),  # G 16, 3 chunks, the last partial
    (3, 8, 8, 32, 9, 40, {}),  # G 1, 2 candidates against a budget of 4
    (1, 2, 2, 16, 5, 17, {}),  # one candidate, forced as sink
    (2, 32, 2, 64, 140, 2200, dict(ssa_score="dot", ssa_top_k=8)),
    (1, 12, 4, 24, 33, 500, dict(ssa_sink_blocks=0, ssa_local_blocks=0)),  # G 3, D 24: padded in the kernel
    (2, 8, 2, 16, 260, 4100, dict(ssa_top_k=16, ssa_local_blocks=3)),  # 256 candidates in 3 chunks
    (1, 4, 4, 16, 3, 1, {}),  # the first token: no candidate, only the own block
    (1, 8, 2, 16, 300, 4790, dict(ssa_top_k=12)),  # a budget that is not a power of two, 3 chunks
    (2, 4, 2, 16, 40, 600, dict(ssa_top_k=1, ssa_sink_blocks=0, ssa_local_blocks=0)),  # the own block alone
    (1, 4, 2, 16, 300, 4700, dict(ssa_top_k=200, ssa_score="dot")),  # above BLOCK_N: chunks keep all candidates
    (1, 4, 1, 16, 150, 2250, dict(ssa_top_k=200)),  # above BLOCK_N, 141 selectable blocks: -1 padding
]


@pytest.mark.parametrize("b, hq, hkv, d, n, length, changes", CASES)
def test_kernel_selection_is_the_reference_selection(monkeypatch, b, hq, hkv, d, n, length, changes):
    config = SimpleNamespace(ssa_block_size=16, ssa_top_k=4, ssa_sink_blocks=1, ssa_local_blocks=1,
                             ssa_score="group_softmax")
    for name, value in changes.items():
        setattr(config, name, value)
    gen = torch.Generator().manual_seed(b * 1000 + n)
    q = torch.randn(b, hq, 1, d, generator=gen).half().to(DEVICE)
    pooled = torch.randn(b, hkv, n, d, generator=gen).half().to(DEVICE)
    length = torch.tensor(length, device=DEVICE)
    scale = 1 / math.sqrt(d)
    got = decode_triton.select_by_kernels(q, pooled, length, config, scale)
    assert got.shape == (b, hkv, config.ssa_top_k) and got.dtype == torch.int64
    gaps = selection_gaps(got, q, pooled, length, config, scale)
    assert gaps.max() <= TIE_RTOL, gaps.max().item()
    monkeypatch.setattr(decoding, "use_kernels", lambda q, cached: False)  # on a GPU too: the torch operations
    torch_path = decoding.select_decode_blocks(q, pooled, length, config, scale)
    assert torch.equal(got.sort(-1).values, torch_path.sort(-1).values)


def test_kernel_ties_go_to_the_later_block():
    """Every pooled key equal: all scores tie exactly, so the budget goes to the latest candidates (and the forced
    sink and own blocks)."""
    config = SimpleNamespace(ssa_block_size=16, ssa_top_k=5, ssa_sink_blocks=1, ssa_local_blocks=0,
                             ssa_score="group_softmax")
    q = torch.randn(1, 4, 1, 16).half().to(DEVICE)
    pooled = torch.randn(1, 1, 1, 16).half().expand(1, 1, 200, 16).contiguous().to(DEVICE)
    got = decode_triton.select_by_kernels(q, pooled, torch.tensor(150 * 16 + 3, device=DEVICE), config, 0.25)
    assert got.sort(-1).values.tolist() == [[[0, 147, 148, 149, 150]]]


def test_kernels_only_for_cuda_half_precision():
    q, pooled = torch.zeros(1, 2, 1, 16, dtype=torch.float16), torch.zeros(1, 1, 4, 16, dtype=torch.float16)
    assert not decode_triton.use_kernels(q, pooled)  # CPU: the torch path
    if torch.cuda.is_available():
        assert decode_triton.use_kernels(q.cuda(), pooled.cuda())
        assert not decode_triton.use_kernels(q.cuda().float(), pooled.cuda().float())


@pytest.mark.parametrize("b, hq, hkv, d, bs, top_k, length, score, gated", [
    (2, 4, 2, 16, 16, 4, 250, "group_softmax", True),  # G 2, the length inside a block
    (1, 16, 1, 64, 16, 16, 4000, "group_softmax", False),  # G 16, the 1B shape's group and budget, 2 chunks
    (3, 8, 8, 32, 16, 4, 40, "dot", True),  # G 1, fewer blocks than the budget: -1 padding
    (1, 12, 4, 24, 8, 5, 97, "group_softmax", False),  # G 3, D 24, block 8, top_k 5: padded in the kernel
    (2, 4, 1, 16, 32, 2, 33, "dot", False),  # G 4, the own block holds one token
    (1, 8, 2, 16, 4, 12, 1500, "dot", True),  # top_k 12 (not a power of two), 3 chunks
    (1, 4, 1, 16, 4, 200, 1203, "group_softmax", True),  # top_k 200 above BLOCK_N, 300 candidates in 3 chunks
    (1, 2, 2, 16, 4, 200, 561, "dot", False),  # top_k 200, 141 selectable blocks: -1 padding
])
def test_kernel_sparse_attention_is_the_torch_attention(monkeypatch, b, hq, hkv, d, bs, top_k, length, score,
                                                        gated):
    """``sparse_attend_by_kernels`` (the selection's first two kernels, then the attention kernel, which takes the
    chunk survivors' top-k itself) against ``sparse_decode``'s torch operations, and against the float64
    reference's attention of the one query at ``length - 1`` (``sparse_attention``, gated by ``apply_gate``) over
    the blocks ``select_by_kernels`` picks (which the selection tests hold to the reference's): the kernel rounds the
    probabilities to float16 before weighing the values, as the sparse training kernel does."""
    config = SimpleNamespace(ssa_block_size=bs, ssa_top_k=top_k, ssa_sink_blocks=1, ssa_local_blocks=1,
                             ssa_score=score)
    gen = torch.Generator().manual_seed(b * 100 + length)
    cap = -(-(length + 5) // bs) * bs
    q = torch.randn(b, hq, 1, d, generator=gen).half().to(DEVICE)
    keys = torch.randn(b, hkv, cap, d, generator=gen).half().to(DEVICE)
    values = torch.randn(b, hkv, cap, d, generator=gen).half().to(DEVICE)
    gate = (2 * torch.randn(b, 1, hq, generator=gen)).half().to(DEVICE) if gated else None
    pooled = decoding.pool_blocks(keys, bs)
    length = torch.tensor(length, device=DEVICE)
    scale = 1 / math.sqrt(d)
    got = decode_triton.sparse_attend_by_kernels(q, keys, values, pooled, length, config, scale, gate)
    assert got.shape == q.shape and got.dtype == q.dtype
    idx = decode_triton.select_by_kernels(q, pooled, length, config, scale)
    monkeypatch.setattr(decoding, "use_kernels", lambda q, cached: False)
    torch_path = decoding.sparse_decode(q, keys, values, pooled, length, config, scale, gate)
    torch.testing.assert_close(got.float(), torch_path.float(), atol=2e-3, rtol=2e-3)
    # float64: the same blocks through the reference's sparse attention of the one query at position length - 1
    n = int(length)
    starts = torch.where(idx >= 0, idx * bs, -1).cpu()[:, :, None]  # [b, HKV, 1, K] block starts
    expected, _ = reference.sparse_attention(
        q.double().cpu().permute(2, 0, 1, 3), keys.double().cpu()[:, :, :n].permute(2, 0, 1, 3),
        values.double().cpu()[:, :, :n].permute(2, 0, 1, 3), starts, bs, q_positions=torch.tensor([n - 1]),
        softmax_scale=scale)
    if gated:
        expected = reference.apply_gate(expected, gate.double().cpu().transpose(0, 1))
    torch.testing.assert_close(got.double().cpu(), expected.permute(1, 2, 0, 3), atol=5e-3, rtol=5e-3)


def test_an_export_does_not_demand_triton():
    """transformers' remote-code check demands every package the copied files import; decode_triton.py imports triton
    inside ``try``, which the check skips, so an export loads where triton is missing (``use_kernels`` is then
    false and the torch operations select). decoding.py imports it relatively, so the loader copies it."""
    from transformers.dynamic_module_utils import get_imports, get_relative_imports

    assert "triton" not in get_imports(decode_triton.__file__)
    assert "decode_triton" in get_relative_imports(decoding.__file__)


@pytest.mark.parametrize("b, hq, hkv, d, capacity, length, programs", [
    (2, 4, 2, 16, 256, 250, None),  # G 2, the length not a multiple of the tile
    (1, 16, 1, 64, 4096, 4000, None),  # G 16, the 1B shape's group: 64 one-tile ranges
    (3, 8, 8, 32, 256, 40, None),  # G 1, most ranges past the length
    (1, 12, 4, 24, 200, 97, None),  # G 3, D 24, a buffer that is not whole tiles
    (2, 4, 1, 16, 128, 1, None),  # the first token: one key
    (1, 8, 2, 16, 640, 640, 4),  # a full buffer; 2 ranges of 5 tiles per row
    (4, 32, 2, 64, 1024, 1000, 24),  # 3 ranges per row, the last shorter
])
def test_full_kernels_are_the_reference_attention(monkeypatch, b, hq, hkv, d, capacity, length, programs):
    """Full mode's split-KV kernels (``full_attend_by_kernels``) against the float64 reference's causal attention
    of the one query at ``length - 1``, and against FlexAttention's path (``full_decode`` without the kernels)
    where the buffer is whole ``KV_TILE`` tiles. ``programs`` sets ``FULL_PROGRAMS`` to make several tiles per key
    range at small shapes."""
    from ssa_megatron.ssa import reference

    if programs is not None:
        monkeypatch.setattr(decode_triton, "FULL_PROGRAMS", programs)
    gen = torch.Generator().manual_seed(b * 100 + length)
    q = torch.randn(b, hq, 1, d, generator=gen).half().to(DEVICE)
    keys = torch.randn(b, hkv, capacity, d, generator=gen).half().to(DEVICE)
    values = torch.randn(b, hkv, capacity, d, generator=gen).half().to(DEVICE)
    keys[:, :, length:] = float("nan")  # never read: past the length
    values[:, :, length:] = float("nan")
    length_t = torch.tensor(length, device=DEVICE)
    scale = 1 / math.sqrt(d)
    got = decode_triton.full_attend_by_kernels(q, keys, values, length_t, scale)
    assert got.shape == q.shape and got.dtype == q.dtype
    expected, _ = reference.full_attention(
        q.double().cpu().permute(2, 0, 1, 3), keys.double().cpu()[:, :, :length].permute(2, 0, 1, 3),
        values.double().cpu()[:, :, :length].permute(2, 0, 1, 3), q_positions=torch.tensor([length - 1]),
        softmax_scale=scale)
    torch.testing.assert_close(got.double().cpu(), expected.permute(1, 2, 0, 3), atol=3e-3, rtol=3e-3)
    if capacity % decoding.KV_TILE == 0:
        tiles = torch.arange(capacity // decoding.KV_TILE, dtype=torch.int32, device=DEVICE).view(1, 1, 1, -1)
        monkeypatch.setattr(decoding, "use_kernels", lambda q, cached: False)
        flex = decoding.full_decode(q, keys.nan_to_num(), values.nan_to_num(), length_t, tiles, scale)
        torch.testing.assert_close(got.float(), flex.float(), atol=3e-3, rtol=3e-3)


def _static_layers(count, b, hkv, d, bs, cached, dtype, gen):
    """``count`` SSA static cache layers of 256 positions holding the same ``cached`` random tokens."""
    layers = []
    for _ in range(count):
        layer = decoding.SSAStaticLayer(max_cache_len=256)
        layer.block_size = bs
        empty = torch.zeros(b, hkv, 1, d, dtype=dtype, device=DEVICE)
        layer.lazy_initialization(empty, empty)
        layers.append(layer)
    if cached:
        k0, v0 = (torch.randn(b, hkv, cached, d, generator=gen).to(DEVICE, dtype) for _ in range(2))
        for layer in layers:
            layer.update(k0, v0, ssa_block_size=bs)
    return layers


def _new_token(b, hq, hkv, d, gate_heads, dtype, gen):
    """One new token's unrotated q, k, v ``[b, 1, H·D]`` and ``gate_heads`` gate logits, slices of one fused output
    as the model passes them, and a random rotary embedding ``cos``/``sin [b, 1, D]``."""
    fused = torch.randn(b, 1, (hq + 2 * hkv) * d + gate_heads, generator=gen).to(DEVICE, dtype)
    q, k, v, gate = fused.split([hq * d, hkv * d, hkv * d, gate_heads], -1)
    angle = torch.rand(b, 1, d // 2, generator=gen) * 6
    cos, sin = (torch.cat([f(angle)] * 2, -1).to(DEVICE, dtype) for f in (torch.cos, torch.sin))
    return q, k, v, gate, cos, sin


@pytest.mark.parametrize("b, hq, hkv, d, bs, cached, top_k, gated", [
    (2, 4, 2, 16, 16, 47, 2, True),  # G 2, the token completes a block; fewer earlier blocks than the budget
    (1, 16, 1, 64, 16, 200, 4, False),  # G 16, 12 candidates, the token inside a block
    (3, 12, 4, 24, 8, 0, 3, True),  # G 3, D 24, the first token: only its own block
    (1, 8, 8, 32, 16, 48, 2, False),  # G 1, the token starts a block
])
def test_sparse_step_appends_as_the_append_kernel(b, hq, hkv, d, bs, cached, top_k, gated):
    """A sparse step with the append in the selection's first kernel (``sparse_attend_by_kernels(..., append=)``)
    against the append kernel followed by the same attention: the attention output, the keys, values, pooled keys,
    length and ticket counter of the two caches."""
    gen = torch.Generator().manual_seed(b * 1000 + cached)
    config = SimpleNamespace(ssa_block_size=bs, ssa_top_k=top_k, ssa_sink_blocks=1, ssa_local_blocks=0,
                             ssa_score="group_softmax")
    merged, separate = _static_layers(2, b, hkv, d, bs, cached, torch.float16, gen)
    q, k, v, gate, cos, sin = _new_token(b, hq, hkv, d, hq, torch.float16, gen)
    gate = gate if gated else None
    got = decode_triton.sparse_attend_by_kernels(q, merged.keys, merged.values, merged.pooled,
                                                 merged.cumulative_length, config, 0.3, gate,
                                                 append=(k, v, cos, sin, merged.tickets))
    rotated = decode_triton.append_by_kernels(q, k, v, cos, sin, separate.keys, separate.values, separate.pooled,
                                              separate.cumulative_length, separate.tickets, bs)
    want = decode_triton.sparse_attend_by_kernels(rotated, separate.keys, separate.values, separate.pooled,
                                                  separate.cumulative_length, config, 0.3, gate)
    step = dict(rtol=1e-3, atol=1e-3)  # at most a rounding step apart: each kernel may contract into FMAs its way
    torch.testing.assert_close(got, want, **step)
    for name in ("keys", "values", "pooled"):
        torch.testing.assert_close(getattr(merged, name), getattr(separate, name), **step)
    assert int(merged.cumulative_length) == int(separate.cumulative_length) == cached + 1
    assert int(merged.tickets) == int(separate.tickets) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("b, hq, hkv, d, bs, cached", [
    (2, 4, 2, 16, 16, 37),  # G 2, the new token inside a block
    (1, 16, 1, 64, 64, 127),  # G 16, the 1B shape's group and block: the token completes a block
    (3, 12, 4, 24, 8, 0),  # G 3, D 24 (padded in the kernel), the first token
    (1, 8, 8, 32, 16, 48),  # G 1, the token starts a block
    (2, 4, 2, 16, 16, 255),  # the last position of the buffer, completing the last block
    (2, 8, 2, 16, 16, 47),  # G 4, the token completes a block
])
def test_append_kernel_is_rope_and_the_cache_update(dtype, b, hq, hkv, d, bs, cached):
    """``append_by_kernels`` against Llama's ``apply_rotary_pos_emb`` (in float32, rounded once, as the kernel and
    Inductor compute it) and ``SSAStaticLayer.update`` on a copy of the same cache: the rotated query, the keys,
    values and pooled keys, the length, and the ticket counter back at zero. The projections are slices of one
    fused output, as in the model."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    gen = torch.Generator().manual_seed(b * 1000 + cached)
    ours, theirs = _static_layers(2, b, hkv, d, bs, cached, dtype, gen)
    ours.keys[:, :, cached + 1:] = theirs.keys[:, :, cached + 1:] = 7.0  # stale keys after the token: pooled too
    q, k, v, _, cos, sin = _new_token(b, hq, hkv, d, 0, dtype, gen)
    got = decode_triton.append_by_kernels(q, k, v, cos, sin, ours.keys, ours.values, ours.pooled,
                                          ours.cumulative_length, ours.tickets, bs)
    q, k, v = (t.view(b, 1, -1, d).transpose(1, 2) for t in (q, k, v))
    want, k_rotated = apply_rotary_pos_emb(q.float(), k.float(), cos.float(), sin.float())
    theirs.update(k_rotated.to(dtype), v, ssa_block_size=bs)
    # One rounding step apart at most: a GPU contracts the kernel's products and sums into FMAs.
    step = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float16 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, want.to(dtype), **step)
    torch.testing.assert_close(ours.keys, theirs.keys, **step)
    torch.testing.assert_close(ours.values, theirs.values, rtol=0, atol=0)
    complete = (cached + 1) // bs  # the kernel pools a block when its token completes it; the rest are not read
    torch.testing.assert_close(ours.pooled[:, :, :complete], theirs.pooled[:, :, :complete], rtol=1e-5,
                               atol=1e-6)  # float32 sums in another order
    assert torch.equal(ours.pooled[:, :, complete:], theirs.pooled[:, :, complete:]) == ((cached + 1) % bs == 0)
    assert int(ours.cumulative_length) == int(theirs.cumulative_length) == cached + 1
    assert int(ours.tickets) == 0


@pytest.mark.parametrize("mode", ["full", "sparse"])
def test_kernels_gate_as_apply_gate(monkeypatch, mode):
    """The gate fused into the attention kernels' output (the full-mode combine, the sparse attention) against the
    torch paths' ``reference.apply_gate`` on the same attention, gate logits a strided view as in the model."""
    b, hq, hkv, d, bs, length = 2, 8, 2, 16, 16, 300
    config = SimpleNamespace(ssa_block_size=bs, ssa_top_k=4, ssa_sink_blocks=1, ssa_local_blocks=1,
                             ssa_score="group_softmax")
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(b, hq, 1, d, generator=gen).half().to(DEVICE)
    keys, values = (torch.randn(b, hkv, 384, d, generator=gen).half().to(DEVICE) for _ in range(2))
    gate = (2 * torch.randn(b, 1, 3 * hq, generator=gen)).half().to(DEVICE)[..., ::3]  # strided, away from 0.5
    length_t = torch.tensor(length, device=DEVICE)
    scale = 1 / math.sqrt(d)
    tiles = torch.arange(384 // decoding.KV_TILE, dtype=torch.int32, device=DEVICE).view(1, 1, 1, -1)
    pooled = decoding.pool_blocks(keys, bs)

    def attend(gate):
        if mode == "full":
            return decoding.full_decode(q, keys, values, length_t, tiles, scale, gate)
        return decoding.sparse_decode(q, keys, values, pooled, length_t, config, scale, gate)

    monkeypatch.setattr(decoding, "use_kernels", decode_triton.use_kernels if DEVICE == "cuda" else
                        lambda q, cached: True)  # the interpreter runs the kernels on CPU
    got, ungated = attend(gate), attend(None)
    monkeypatch.setattr(decoding, "use_kernels", lambda q, cached: False)
    torch_path = attend(gate)
    expected = reference.apply_gate(ungated.float().transpose(1, 2), gate.float()).transpose(1, 2)
    torch.testing.assert_close(got.float(), expected, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(got.float(), torch_path.float(), atol=3e-3, rtol=3e-3)
    assert (got - ungated).abs().max() > 0.1  # the gate is applied, and once


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("mode", ["full", "sparse"])
def test_model_decodes_alike_with_and_without_kernels(monkeypatch, mode, batch):
    """A float16 model's static-cache decode steps with the decode kernels (RoPE and the cache update in one kernel,
    in sparse mode inside the selection's first kernel; the attention, the gate; at batch 1 the projections' GEMV,
    with the norms, the MLP's activation and the residual additions) against the same steps through the torch
    operations, from the same prefill: logits, the caches' keys, values, pooled keys and lengths. On CPU the
    interpreter runs the kernels."""
    from transformers import StaticCache

    from ssa_megatron.hf import modeling
    from ssa_megatron.hf.configuration import SSALlamaConfig

    config = SSALlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=1, head_dim=16, ssa_block_size=16,
                            ssa_top_k=3, ssa_mode=mode)
    torch.manual_seed(3)
    model = modeling.SSALlamaForCausalLM(config).half().to(DEVICE).eval()
    with torch.no_grad():
        for attn in model.ssa_attention_modules():
            attn.g_proj.weight.normal_(0, 0.5)  # the gate away from 0.5
    model.fuse_projections()  # as from_pretrained loads it: q, k, v and the gate are views of one output
    tokens = torch.randint(0, config.vocab_size, (batch, 60), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    kernels = decode_triton.use_kernels if DEVICE == "cuda" else lambda q, cached: q.dtype == torch.float16
    gemv = decode_triton.use_linear_kernel if DEVICE == "cuda" else (  # the same conditions but the device
        lambda x, w, *others: x.dtype == torch.float16 and x.numel() <= decode_triton.ROWS_MAX * x.shape[-1]
        and not torch.is_grad_enabled())
    appends, gemvs = [], []
    monkeypatch.setattr(decoding, "append_by_kernels",
                        lambda *args: appends.append("append") or decode_triton.append_by_kernels(*args))

    def sparse_attend(*args, append=None):  # sparse mode appends in the selection's first kernel
        appends.extend(["with the selection"] if append is not None else [])
        return decode_triton.sparse_attend_by_kernels(*args, append=append)

    monkeypatch.setattr(decoding, "sparse_attend_by_kernels", sparse_attend)
    monkeypatch.setattr(modeling, "linear_by_kernel",
                        lambda *args: gemvs.append(args) or decode_triton.linear_by_kernel(*args))
    caches, logits = [], []
    for use, use_linear_kernel in ((kernels, gemv), (lambda q, cached: False, lambda *args: False)):
        monkeypatch.setattr(decoding, "use_kernels", use)
        monkeypatch.setattr(modeling, "use_linear_kernel", use_linear_kernel)
        cache = StaticCache(config=config, max_cache_len=64)
        steps = []
        with torch.no_grad():
            model(tokens[:, :29], cache=cache, use_cache=True)
            for t in range(29, 36):  # across the block boundary at 32
                steps.append(model(tokens[:, t:t + 1], cache=cache, use_cache=True).logits.float())
        caches.append(cache)
        logits.append(torch.cat(steps, 1))
    # every step of the first run, none of the second
    assert appends == ["append" if mode == "full" else "with the selection"] * 7 * config.num_hidden_layers
    # q|k|v|g, o, gate|up, SwiGLU and down per layer, and the LM head, at both batches, in the prefill (29 or 58
    # rows: at most ROWS_MAX at batch 1) and the 7 steps
    assert len(gemvs) == (7 + (batch == 1)) * (config.num_hidden_layers * 4 + 1)
    assert [args[1].shape for args in gemvs[4 * config.num_hidden_layers::4 * config.num_hidden_layers + 1]] == [
        model.lm_head.weight.shape] * (7 + (batch == 1))
    # (swiglu, norm, residual, the module's split counters, swiglu_out) of the first step's four per layer: at
    # several rows (batch 1's prefill, batch 2's steps) SwiGLU's activation follows gate|up, at one it precedes down
    fused = [[(args[2], args[3] is not None, args[5] is not None, args[6] is not None, args[7]) for args in calls]
             for calls in (gemvs[:4], gemvs[4 * config.num_hidden_layers + 1:][:4] if batch == 1 else [])]
    assert fused[0] == [(False, True, False, True, False), (False, False, True, True, False),
                        (False, True, False, True, True), (False, False, True, True, False)]
    assert fused[1] == ([(False, True, False, True, False), (False, False, True, True, False),
                         (False, True, False, True, False), (True, False, True, True, False)] if batch == 1 else [])
    assert all(int(m.split_tickets.abs().sum()) == 0 for m in model.modules() if hasattr(m, "split_tickets"))
    torch.testing.assert_close(logits[0], logits[1], atol=2e-2, rtol=2e-2)
    for ours, theirs in zip(caches[0].layers, caches[1].layers):
        assert int(ours.cumulative_length) == int(theirs.cumulative_length) == 36 and int(ours.tickets) == 0
        for name in ("keys", "values"):
            torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(ours.pooled[:, :, :2], theirs.pooled[:, :, :2], atol=2e-2, rtol=2e-2)  # complete


@pytest.mark.parametrize("n, k", [(24, 64), (37, 700), (8, 1024)])  # K one partial step, several, whole steps
@pytest.mark.parametrize("swiglu", [False, True])
def test_gemv_is_the_linear(n, k, swiglu):
    """The one-row GEMV (``linear_by_kernel``) against ``F.linear`` in float64 on the same input; with ``swiglu``,
    the input is ``silu(gate) * up`` computed by the eager float16 operations, whose roundings the kernel repeats."""
    gen = torch.Generator().manual_seed(n * k)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).half()
    x = torch.randn(1, 1, 2 * k if swiglu else k, generator=gen).half()
    got = decode_triton.linear_by_kernel(x.to(DEVICE), w.to(DEVICE), swiglu=swiglu)
    assert got.shape == (1, 1, n) and got.dtype == torch.float16
    if swiglu:
        gate, up = x.float().chunk(2, -1)  # float16 operations, as a GPU's eager ones round (CPU has no fp16 silu)
        x = (torch.nn.functional.silu(gate).half().float() * up).half()
    expected = torch.nn.functional.linear(x.double(), w.double())
    torch.testing.assert_close(got.double().cpu(), expected, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("n, k", [(24, 64), (37, 700)])
@pytest.mark.parametrize("swiglu", [False, True])
def test_gemv_fuses_the_norm_and_the_residual(n, k, swiglu):
    """``linear_by_kernel`` with Llama's RMSNorm before the product (without SwiGLU: the decoder layer's q|k|v|g and
    gate|up) or a residual after it (with SwiGLU: the down projection; also o's), against the float64 norm, product
    and addition: the norm unrounded, the product rounded to float16 before the addition, as the layer adds it."""
    gen = torch.Generator().manual_seed(n + k)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).half()
    x = (3 * torch.randn(1, 1, 2 * k if swiglu else k, generator=gen)).half()
    norm = (1 + 0.3 * torch.randn(k, generator=gen)).half()
    residual = torch.randn(1, 1, n, generator=gen).half()
    fused = dict(residual=residual.to(DEVICE)) if swiglu else dict(norm=norm.to(DEVICE), eps=1e-5)
    got = decode_triton.linear_by_kernel(x.to(DEVICE), w.to(DEVICE), swiglu=swiglu, **fused).double().cpu()
    if swiglu:
        gate, up = x.float().chunk(2, -1)
        x = (torch.nn.functional.silu(gate).half().float() * up).half()
        product = torch.nn.functional.linear(x.double(), w.double())
        expected = residual.double() + product.half().double()
    else:
        h = x.double()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.double()
        expected = torch.nn.functional.linear(h, w.double())
    torch.testing.assert_close(got, expected, atol=3e-3, rtol=3e-3)


def test_linear_kernel_only_for_a_decode_steps_rows_without_gradient():
    w = torch.zeros(8, 16, dtype=torch.float16)
    assert not decode_triton.use_linear_kernel(torch.zeros(1, 1, 16, dtype=torch.float16), w)  # CPU: cuBLAS's place
    if torch.cuda.is_available():
        w = w.cuda()
        rows = decode_triton.ROWS_MAX
        assert decode_triton.use_linear_kernel(torch.zeros(1, 1, 16, dtype=torch.float16, device="cuda"), w)
        assert decode_triton.use_linear_kernel(torch.zeros(rows, 1, 16, dtype=torch.float16, device="cuda"), w)
        assert not decode_triton.use_linear_kernel(torch.zeros(rows + 1, 1, 16, dtype=torch.float16, device="cuda"), w)
        assert not decode_triton.use_linear_kernel(torch.zeros(1, 16, device="cuda"), w.float())
        assert not decode_triton.use_linear_kernel(
            torch.zeros(1, 16, dtype=torch.float16, device="cuda", requires_grad=True), w)


def test_each_decode_launch_reads_its_own_setting(monkeypatch):
    """The launch rules route each kernel to its constant: the multi-row product of q|k|v|g (norm), gate|up (norm,
    SwiGLU after), o (neither) and down (long input) to its own setting, and the scoring kernel to its many- or
    few-program warps by the grid's size."""
    names = ("ROWS_SETTING", "ROWS_SETTING_NORM", "ROWS_SETTING_SWIGLU_OUT", "ROWS_SETTING_LONG")
    for i, name in enumerate(names):  # distinct settings: the launch's shows which it read
        monkeypatch.setattr(decode_triton, name, (16 * (i + 1), 64, 2, 4))
    for (n, k, norm, swiglu_out), name in zip([(2336, 2048, False, False), (2336, 2048, True, False),
                                               (16384, 2048, True, True), (2048, 8192, False, False)], names):
        assert decode_triton._rows_launch(n, k, norm, 0, swiglu_out)[0] == getattr(decode_triton, name), name
    few = decode_triton.FEW_PROGRAMS
    monkeypatch.setattr(decode_triton, "SCORE_WARPS", 2)
    monkeypatch.setattr(decode_triton, "SCORE_WARPS_FEW", 8)
    assert [decode_triton._score_warps(p) for p in (1, few - 1, few, 10 * few)] == [8, 8, 2, 2]


@pytest.fixture
def small_rows_settings(monkeypatch):
    """The multi-row product's settings shrunk, so that small shapes make several blocks and steps."""
    for name in ("ROWS_SETTING", "ROWS_SETTING_NORM", "ROWS_SETTING_SWIGLU_OUT", "ROWS_SETTING_LONG"):
        monkeypatch.setattr(decode_triton, name, (32, 64, 2, 4))


@pytest.mark.parametrize("rows, n, k", [(2, 24, 64), (5, 37, 700), (32, 200, 300), (3, 70, 1100)])
@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("split", [False, True])
def test_rows_kernel_is_the_fused_linear(small_rows_settings, rows, n, k, swiglu, split):
    """``linear_by_kernel`` at several rows (``_rows_kernel``) against the float64 norm, product and addition, as
    the decoder layer fuses them (without SwiGLU: the RMSNorm first; with it: the residual last). Output features
    that are not whole blocks, input features that are not whole steps; with ``tickets``, each block split over
    several programs whose last adds the partial sums, in a fixed order (a second call is bitwise equal) and leaves
    the counters at zero. The settings are shrunk so that the small shapes make several blocks and steps."""
    gen = torch.Generator().manual_seed(rows * n + k)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).half()
    x = (3 * torch.randn(rows, 1, 2 * k if swiglu else k, generator=gen)).half()
    norm = (1 + 0.3 * torch.randn(k, generator=gen)).half()
    residual = torch.randn(rows, 1, n, generator=gen).half()
    tickets = torch.zeros(8, dtype=torch.int32, device=DEVICE) if split else None
    fused = dict(residual=residual.to(DEVICE)) if swiglu else dict(norm=norm.to(DEVICE), eps=1e-5)
    got = decode_triton.linear_by_kernel(x.to(DEVICE), w.to(DEVICE), swiglu=swiglu, tickets=tickets, **fused)
    assert got.shape == (rows, 1, n) and got.dtype == torch.float16
    if split:
        assert torch.equal(got, decode_triton.linear_by_kernel(x.to(DEVICE), w.to(DEVICE), swiglu=swiglu,
                                                               tickets=tickets, **fused))
        assert int(tickets.abs().sum()) == 0
    if swiglu:
        gate, up = x.float().chunk(2, -1)
        h = (torch.nn.functional.silu(gate).half().float() * up).half().double()
        expected = residual.double() + torch.nn.functional.linear(h, w.double()).half().double()
    else:
        h = x.double()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.double()
        expected = torch.nn.functional.linear(h, w.double())
    torch.testing.assert_close(got.double().cpu(), expected, atol=4e-3, rtol=4e-3)


@pytest.mark.parametrize("rows, n, k", [(1, 48, 64), (2, 48, 64), (5, 74, 700), (32, 400, 300)])
@pytest.mark.parametrize("split", [False, True])
def test_linear_kernel_applies_swiglu_to_its_output(small_rows_settings, rows, n, k, split):
    """``linear_by_kernel(..., swiglu_out=True)``: the RMSNorm, the product with a ``[gate | up]`` weight and
    ``silu(gate) * up`` of its output, against float64 (the product rounded to the model dtype before the
    activation, as the eager MLP rounds it) and against the plain product followed by torch's activation. Output
    feature counts that are not whole blocks (of ``BLOCK_N / 2`` features each), split and not; one row is the GEMV
    followed by torch's activation."""
    gen = torch.Generator().manual_seed(rows * n + k)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).half()
    x = (3 * torch.randn(rows, 1, k, generator=gen)).half()
    norm = (1 + 0.3 * torch.randn(k, generator=gen)).half()
    tickets = torch.zeros(16, dtype=torch.int32, device=DEVICE) if split else None
    fused = dict(norm=norm.to(DEVICE), eps=1e-5, tickets=tickets)
    got = decode_triton.linear_by_kernel(x.to(DEVICE), w.to(DEVICE), swiglu_out=True, **fused)
    assert got.shape == (rows, 1, n // 2) and got.dtype == torch.float16
    if split:
        assert int(tickets.abs().sum()) == 0
    gate, up = decode_triton.linear_by_kernel(x.to(DEVICE), w.to(DEVICE), **fused).chunk(2, -1)
    torch.testing.assert_close(got, torch.nn.functional.silu(gate) * up, rtol=1e-3, atol=1e-3)
    h = x.double()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.double()
    gate, up = torch.nn.functional.linear(h, w.double()).half().double().chunk(2, -1)
    expected = torch.nn.functional.silu(gate).half().double() * up
    torch.testing.assert_close(got.double().cpu(), expected, atol=4e-3, rtol=4e-3)
    with pytest.raises(ValueError, match="swiglu_out=True takes neither"):
        decode_triton.linear_by_kernel(x.to(DEVICE), w.to(DEVICE), swiglu_out=True, residual=x.to(DEVICE))


def test_append_kernel_names_a_strided_cache_buffer():
    keys = torch.zeros(1, 1, 8, 32, dtype=torch.float16)[..., ::2]  # last stride 2
    row = torch.zeros(1, 1, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match="keys has stride 2"):
        decode_triton.append_by_kernels(row, row, row, row, row, keys, keys.contiguous(), keys.contiguous(),
                                        torch.tensor(0), torch.zeros(1, dtype=torch.int32), 4)


def test_kernels_are_custom_ops_with_their_mutations(monkeypatch):
    """Each decode entry point is a custom op that a compiled step calls (``decode_triton._custom_op``):
    ``torch.library.opcheck`` runs it eagerly, on fake tensors and through AOT dispatch, and checks that the
    arguments it writes (the cache, the length, the ticket counters) are the ones its schema declares mutated and
    that its fake gives the real output's shape, dtype and strides."""
    monkeypatch.setattr(decode_triton, "ROWS_SETTING", (32, 64, 2, 4))  # several split blocks at this size
    gen = torch.Generator().manual_seed(7)
    b, hq, hkv, d, bs, cached = 2, 4, 2, 16, 16, 47
    layer, = _static_layers(1, b, hkv, d, bs, cached, torch.float16, gen)
    q, k, v, gate, cos, sin = _new_token(b, hq, hkv, d, hq, torch.float16, gen)
    selection = (0.25, bs, 2, 1, 0, "group_softmax")
    cache = (layer.keys, layer.values, layer.pooled, layer.cumulative_length)
    rotated = q.view(b, 1, hq, d).transpose(1, 2).contiguous()  # [b, HQ, 1, D]
    x = torch.randn(3, 1, 64, generator=gen).half().to(DEVICE)
    w = torch.randn(70, 64, generator=gen).half().to(DEVICE)
    cases = [
        (decode_triton._LINEAR_OP, (x, w, False, None, 0.0, torch.randn_like(x[..., :1]).expand(3, 1, 70).contiguous(),
                                    torch.zeros(8, dtype=torch.int32, device=DEVICE), False)),
        (decode_triton._LINEAR_OP, (x, w, False, torch.ones_like(x[0, 0]), 1e-5, None,
                                    torch.zeros(8, dtype=torch.int32, device=DEVICE), True)),  # 35 features
        (decode_triton._APPEND_OP, (q, k, v, cos, sin, *cache, layer.tickets, bs)),
        (decode_triton._SPARSE_APPEND_OP, (q, k, v, cos, sin, layer.tickets, *cache, gate, *selection)),
        (decode_triton._SPARSE_OP, (rotated, *cache[:3], layer.cumulative_length, None, *selection)),
        (decode_triton._FULL_OP, (rotated, layer.keys, layer.values, layer.cumulative_length, gate,
                                  0.25)),
    ]
    for op, args in cases:
        assert op is not None and op._qualname.startswith(decode_triton._OP_NAMESPACE + "::")
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_a_compiled_step_calls_the_custom_op():
    """Traced by torch.compile, ``linear_by_kernel`` is one call of its custom op (no kernel for Inductor to lower),
    with the same result as the eager call."""
    targets = []

    def backend(gm, inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1, 64, generator=gen).half().to(DEVICE)
    w = torch.randn(40, 64, generator=gen).half().to(DEVICE)
    step = torch.compile(lambda x, w: decode_triton.linear_by_kernel(x, w), backend=backend, fullgraph=True)
    assert torch.equal(step(x, w), decode_triton.linear_by_kernel(x, w))
    assert any(target.startswith(decode_triton._OP_NAMESPACE) and "linear" in target for target in targets), targets


def test_a_compiled_step_writes_the_cache_through_the_op():
    """Compiled (AOT autograd's functionalisation, as Inductor receives the graph), a sparse step with the append
    still writes the token into the cache buffers, advances the length and leaves the tickets at zero, as the eager
    call does on a copy of the same cache; the attention output is the eager one, bit for bit (the same kernels)."""
    gen = torch.Generator().manual_seed(11)
    b, hq, hkv, d, bs, cached = 2, 8, 2, 16, 16, 47  # the token completes a block: its pooled key is written too
    config = SimpleNamespace(ssa_block_size=bs, ssa_top_k=2, ssa_sink_blocks=1, ssa_local_blocks=0,
                             ssa_score="group_softmax")
    compiled, eager = _static_layers(2, b, hkv, d, bs, cached, torch.float16, gen)
    q, k, v, gate, cos, sin = _new_token(b, hq, hkv, d, hq, torch.float16, gen)

    def step(layer):
        return decode_triton.sparse_attend_by_kernels(q, layer.keys, layer.values, layer.pooled,
                                                      layer.cumulative_length, config, 0.25, gate,
                                                      append=(k, v, cos, sin, layer.tickets))

    got = torch.compile(step, backend="aot_eager", fullgraph=True)(compiled)
    assert torch.equal(got, step(eager))
    for name in ("keys", "values", "pooled"):
        assert torch.equal(getattr(compiled, name), getattr(eager, name)), name
    assert int(compiled.cumulative_length) == int(eager.cumulative_length) == cached + 1
    assert int(compiled.tickets) == 0
