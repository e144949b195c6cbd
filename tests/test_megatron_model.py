"""The SSA layer spec and GPTModel on CPU: wiring, build, forward/backward, and the core attention against
``ssa_attention`` called directly."""

import pytest
import torch

from helpers.megatron import init_megatron, tiny_recipe


@pytest.fixture(scope="module")
def megatron_world():
    init_megatron(tp=1, pp=1, cp=1)
    yield


def test_spec_wiring(megatron_world):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    from ssa_megatron.config import SSAConfig
    from ssa_megatron.megatron.attention import SSACoreAttention, SSASelfAttention, SSATransformerLayer
    from ssa_megatron.megatron.spec import get_ssa_layer_spec

    spec = get_ssa_layer_spec("local", SSAConfig(top_k=4))
    assert spec.module is SSATransformerLayer
    attn = spec.submodules.self_attention
    assert attn.module is SSASelfAttention
    assert attn.submodules.core_attention.module is SSACoreAttention
    assert attn.submodules.core_attention.params["ssa"].top_k == 4
    assert attn.params["compiled_rope"] is False
    assert get_ssa_layer_spec("local", compiled_rope=True).submodules.self_attention.params["compiled_rope"] is True
    assert attn.submodules.linear_gate is ColumnParallelLinear
    assert "RMSNorm" in repr(spec.submodules.input_layernorm) or spec.submodules.input_layernorm is not None
    assert get_ssa_layer_spec("local", SSAConfig(gate="none")).submodules.self_attention.submodules.linear_gate is None
    with pytest.raises(ValueError, match="backend"):
        get_ssa_layer_spec("flash")


def test_document_boundaries_round_trip():
    from megatron.core.packed_seq_params import PackedSeqParams

    from ssa_megatron.megatron.attention import document_boundaries, document_packed_seq_params

    cu = torch.tensor([0, 5, 16])
    assert document_boundaries(None) is None
    assert document_boundaries(document_packed_seq_params(cu, 8)) is cu
    assert document_boundaries(PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu)) is cu
    with pytest.raises(NotImplementedError, match="thd"):
        document_boundaries(PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu))


def test_transformer_impl_recipe_key():
    """``model.transformer_impl`` is a recipe key: local by default, transformer_engine by override, anything else
    refused naming the allowed values."""
    from ssa_megatron.config import RecipeConfig, apply_overrides, from_dict

    assert RecipeConfig().model.transformer_impl == "local"
    te = from_dict(RecipeConfig, apply_overrides({}, ["model.transformer_impl=transformer_engine"]))
    assert te.model.transformer_impl == "transformer_engine"
    with pytest.raises(ValueError, match="transformer_impl.*local.*transformer_engine"):
        from_dict(RecipeConfig, apply_overrides({}, ["model.transformer_impl=te"]))


def test_transformer_engine_absent_is_one_clear_error(megatron_world):
    """Without TE, the recipe key and the spec both stop with one line naming the extra to install."""
    from ssa_megatron.megatron.model import build_gpt_model
    from ssa_megatron.megatron.spec import get_ssa_layer_spec, transformer_engine_available

    if transformer_engine_available():
        pytest.skip("Transformer Engine is installed: test_transformer_engine_spec_and_model covers it")
    recipe = tiny_recipe()
    recipe.model.transformer_impl = "transformer_engine"
    for build in (lambda: build_gpt_model(recipe), lambda: get_ssa_layer_spec("transformer_engine")):
        with pytest.raises(ValueError, match=r"Transformer Engine is not importable") as err:
            build()
        message = str(err.value)
        assert 'pip install -e ".[te]"' in message and "model.transformer_impl=local" in message
        assert "\n" not in message


@pytest.mark.slow
def test_ssa_train_without_transformer_engine_prints_one_line(tmp_path):
    """ssa-train with model.transformer_impl=transformer_engine and no TE: exit 1, the extra named, no traceback."""
    import subprocess
    import sys

    from helpers.training import TEST_OVERRIDES
    from ssa_megatron.megatron.spec import transformer_engine_available

    if transformer_engine_available():
        pytest.skip("Transformer Engine is installed")
    proc = subprocess.run(
        [sys.executable, "-m", "ssa_megatron.training.cli", "tiny", *TEST_OVERRIDES, f"train.run_dir={tmp_path}",
         "model.transformer_impl=transformer_engine"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "Transformer Engine is not importable" in line]
    assert len(errors) == 1 and 'pip install -e ".[te]"' in errors[0], proc.stderr


def test_transformer_engine_spec_and_model(megatron_world):
    """With TE: its fused layers around SSA's own core attention; on a GPU the model builds, runs forward and
    backward, calls SSACoreAttention in every layer, and has the local model's checkpoint keys."""
    pytest.importorskip("transformer_engine.pytorch")
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TELayerNormColumnParallelLinear,
        TENorm,
        TERowParallelLinear,
    )

    from ssa_megatron.megatron.attention import SSACoreAttention
    from ssa_megatron.megatron.model import build_gpt_model
    from ssa_megatron.megatron.spec import get_ssa_layer_spec

    spec = get_ssa_layer_spec("transformer_engine")
    attn = spec.submodules.self_attention.submodules
    assert attn.core_attention.module is SSACoreAttention
    assert attn.linear_qkv is TEColumnParallelLinear and attn.linear_gate is TEColumnParallelLinear
    assert attn.linear_proj is TERowParallelLinear and spec.submodules.input_layernorm is TENorm
    assert spec.submodules.mlp.submodules.linear_fc1 is TELayerNormColumnParallelLinear
    if not torch.cuda.is_available():
        return
    recipe = tiny_recipe(precision="bf16")
    recipe.train.device = "cuda"
    local = build_gpt_model(recipe)
    recipe.model.transformer_impl = "transformer_engine"
    model = build_gpt_model(recipe)
    cores = [m for m in model.modules() if isinstance(m, SSACoreAttention)]
    assert len(cores) == recipe.model.num_layers
    assert any(isinstance(m, TELayerNormColumnParallelLinear) for m in model.modules())
    calls = []
    for core in cores:
        core.register_forward_hook(lambda *a: calls.append(1))
    tokens = torch.randint(0, recipe.model.vocab_size, (2, recipe.model.seq_length), device="cuda")
    loss = model(tokens, None, None, labels=tokens).float().mean()
    loss.backward()
    assert torch.isfinite(loss) and len(calls) == recipe.model.num_layers

    def keys(m):
        return {k for k in m.sharded_state_dict() if "_extra_state" not in k}

    assert keys(model) == keys(local)


def test_transformer_config_from_recipe(megatron_world):
    from ssa_megatron.megatron.loss import set_alignment_loss_scale
    from ssa_megatron.megatron.model import transformer_config_from_recipe

    recipe = tiny_recipe()
    cfg = transformer_config_from_recipe(recipe)
    assert cfg.normalization == "RMSNorm" and cfg.gated_linear_unit and not cfg.add_bias_linear
    assert cfg.num_query_groups == 2 and cfg.kv_channels == 16
    assert cfg.experimental_attention_variant_loss_scale_func is set_alignment_loss_scale
    # train.fused_ops: Megatron's torch.compile fusions only where the run is on a GPU
    assert not cfg.bias_activation_fusion and not cfg.cross_entropy_loss_fusion  # tiny_recipe runs on CPU
    on_gpu = tiny_recipe()
    on_gpu.train.device = "cuda"
    fused = transformer_config_from_recipe(on_gpu)
    assert fused.bias_activation_fusion and fused.cross_entropy_loss_fusion
    assert fused.cross_entropy_fusion_impl == "native" and not fused.apply_rope_fusion  # TE-free fusions only
    on_gpu.train.fused_ops = False
    assert not transformer_config_from_recipe(on_gpu).bias_activation_fusion
    bad = tiny_recipe()
    bad.parallel.tensor_parallel = 4  # 2 KV heads cannot be split over 4 ranks
    with pytest.raises(ValueError, match="num_query_groups=2"):
        transformer_config_from_recipe(bad)


def _capture_core_attention(model):
    calls = []

    def hook(module, args, kwargs, output):
        calls.append((module, [a.detach() for a in args[:4]], kwargs, output.detach()))

    handles = [layer.self_attention.core_attention.register_forward_hook(hook, with_kwargs=True)
               for layer in model.decoder.layers]
    return calls, handles


@pytest.mark.parametrize("alpha,p_full", [(10.0, 0.5), (0.0, 1.0), (0.0, 0.0)])
def test_tiny_gpt_forward_backward_matches_ssa_attention(megatron_world, alpha, p_full):
    from ssa_megatron.megatron.mode import MODE_SAMPLER
    from ssa_megatron.megatron.model import build_gpt_model
    from ssa_megatron.megatron.tracker import get_ssa_tracker
    from ssa_megatron.ssa import ssa_attention

    recipe = tiny_recipe(alpha=alpha, p_full=p_full)
    model = build_gpt_model(recipe)
    model.train()
    MODE_SAMPLER.set_iteration(3)
    tracker = get_ssa_tracker()
    tracker.reset()
    tracker.collect_metrics = alpha > 0
    calls, handles = _capture_core_attention(model)
    tokens = torch.randint(0, 128, (2, 64))
    position_ids = torch.arange(64).expand(2, -1)
    loss = model(tokens, position_ids, None, labels=tokens).mean()
    loss.backward()
    for h in handles:
        h.remove()

    assert torch.isfinite(loss)
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    gate_w = model.decoder.layers[0].self_attention.linear_gate.weight
    assert gate_w.shape == (4, 64) and gate_w.grad.abs().sum() > 0

    assert len(calls) == 2
    expected_mode = MODE_SAMPLER.mode_for(0, p_full)
    for module, (q, k, v, gate), kwargs, out in calls:
        assert q.shape == (64, 2, 4, 16) and k.shape == (64, 2, 2, 16)
        assert gate.shape == (64, 2, 4)  # in Megatron's attention_mask slot
        ref, ref_loss, stats = ssa_attention(q, k, v, gate, recipe.ssa, expected_mode, True)
        assert stats.mode == expected_mode
        torch.testing.assert_close(out, ref.reshape(64, 2, -1), rtol=1e-5, atol=1e-6)
    tracker.collect_metrics = False
    report = tracker.reduce()
    assert report["microbatches_" + expected_mode] == 1.0
    if alpha > 0:
        assert 0 < report["attn_sparsity"] <= 1 and "attn_entropy_bits/layer_2" in report
    if alpha > 0:
        assert report["alignment_loss"] > 0
        assert report["alignment_loss"] == pytest.approx(report["sparsity_loss"] + report["commitment_loss"])
    else:
        assert "alignment_loss" not in report


def test_tiny_gpt_recompute_matches(megatron_world, monkeypatch):
    """Selective and full recompute give the same loss and gradients as no recompute, the tracker counts each
    layer once, and the recompute reuses its forward's selection (one selection per layer and micro-batch)."""
    from ssa_megatron.megatron.mode import MODE_SAMPLER
    from ssa_megatron.megatron.model import build_gpt_model, transformer_config_from_recipe
    from ssa_megatron.megatron.tracker import get_ssa_tracker

    from ssa_megatron.ssa import reference

    tokens = torch.randint(0, 128, (2, 64))
    position_ids = torch.arange(64).expand(2, -1)
    results = {}
    selections = {}
    real_select = reference.select_blocks

    def counting_select(*args, **kwargs):
        selections[recompute] = selections.get(recompute, 0) + 1
        return real_select(*args, **kwargs)

    monkeypatch.setattr(reference, "select_blocks", counting_select)
    for recompute in ("none", "selective", "full"):
        recipe = tiny_recipe(alpha=10.0, p_full=0.5)
        recipe.train.recompute = recompute
        torch.manual_seed(7)
        model = build_gpt_model(recipe, config=transformer_config_from_recipe(recipe))
        model.train()
        MODE_SAMPLER.set_iteration(5)
        get_ssa_tracker().reset()
        for mb in range(2):
            for layer in model.decoder.layers:
                layer.current_microbatch = mb
            loss = model(tokens, position_ids, None, labels=tokens).mean()
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[recompute] = (loss.detach(), grads, get_ssa_tracker().reduce())
    base_loss, base_grads, base_report = results["none"]
    for recompute in ("selective", "full"):
        loss, grads, report = results[recompute]
        torch.testing.assert_close(loss, base_loss)
        for name in base_grads:
            torch.testing.assert_close(grads[name], base_grads[name], rtol=1e-4, atol=1e-6, msg=name)
        assert report["alignment_loss"] == pytest.approx(base_report["alignment_loss"])
        assert report["microbatches_full"] + report["microbatches_sparse"] == 2
    assert selections["none"] == selections["selective"] == selections["full"] == 2 * 2  # 2 layers x 2 micro-batches


def test_rope_follows_position_ids_per_document(megatron_world):
    """Positions reset per document (docs/ssa.md rule 10): with document masking, the second document of a packed
    row gives the same logits as that document alone at the start of a row; with positions 0..S-1 the model is
    Megatron's own GPTModel (position_ids=None)."""
    from ssa_megatron.megatron.attention import document_packed_seq_params
    from ssa_megatron.megatron.mode import force_mode
    from ssa_megatron.megatron.model import build_gpt_model

    recipe = tiny_recipe(seq_length=64, document_mask=True)
    torch.manual_seed(0)
    model = build_gpt_model(recipe).eval()
    s, cut = 64, 24
    tokens = torch.randint(0, 128, (1, s))
    arange = torch.arange(s)[None]
    reset = torch.cat([torch.arange(cut), torch.arange(s - cut)])[None]
    packed = document_packed_seq_params(torch.tensor([0, cut, s]), s)
    alone_tokens = torch.cat([tokens[:, cut:], tokens[:, :cut]], dim=1)  # the second document first
    alone_packed = document_packed_seq_params(torch.tensor([0, s - cut, s]), s)
    alone_pos = torch.cat([torch.arange(s - cut), torch.arange(cut)])[None]
    for mode in ("full", "sparse"):
        with torch.no_grad(), force_mode(mode):
            default = model(tokens, None, None)
            explicit = model(tokens, arange, None)
            torch.testing.assert_close(explicit, default, rtol=0, atol=0)
            packed_logits = model(tokens, reset, None, packed_seq_params=packed)
            alone_logits = model(alone_tokens, alone_pos, None, packed_seq_params=alone_packed)
            torch.testing.assert_close(packed_logits[:, cut:], alone_logits[:, : s - cut], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(packed_logits[:, :cut], alone_logits[:, s - cut:], rtol=1e-5, atol=1e-5)
            # position_ids are honoured: without document masking, doc 2 attends across the boundary, where reset
            # and running positions give different relative distances.
            running = model(tokens, arange, None)
            restarted = model(tokens, reset, None)
            torch.testing.assert_close(running[:, :cut], restarted[:, :cut], rtol=0, atol=0)
            assert not torch.allclose(running[:, cut:], restarted[:, cut:], atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Where we lean on Megatron beyond the spec: each test fails when megatron-core changes what we rely on.


def test_megatron_methods_we_override_are_unchanged():
    """``SSAGPTModel`` overrides the private ``GPTModel._preprocess`` (it rewrites element 1 of the returned tuple,
    the RoPE angles). When this fails after a megatron-core upgrade, re-read the method, check the override still
    fits, and update the hash."""
    import hashlib
    import inspect

    from megatron.core.models.gpt import GPTModel

    source = inspect.getsource(GPTModel._preprocess)
    assert hashlib.sha256(source.encode()).hexdigest()[:16] == "1bc57437dfdab74a"


def test_compiled_rope_is_used_inside_ssa_attention_only(megatron_world, monkeypatch):
    """``compiled_rope`` (``train.fused_ops`` on CUDA) puts the compiled RoPE where Megatron's ``Attention.forward``
    looks it up, for the duration of each SSA attention forward, and puts Megatron's back after. A counting
    stand-in replaces the compiled function (torch.compile needs a C++ toolchain on CPUs)."""
    import megatron.core.transformer.attention as megatron_attention
    from megatron.core.models.common.embeddings import rope_utils

    from ssa_megatron.megatron import rope
    from ssa_megatron.megatron.model import build_gpt_model, transformer_config_from_recipe

    # What the swap relies on: Attention.forward calls rope_utils.apply_rotary_pos_emb, which reads
    # _apply_rotary_pos_emb_bshd from its module's globals at every call.
    assert megatron_attention.apply_rotary_pos_emb is rope_utils.apply_rotary_pos_emb
    assert "_apply_rotary_pos_emb_bshd" in rope_utils.apply_rotary_pos_emb.__code__.co_names

    eager = rope_utils._apply_rotary_pos_emb_bshd
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return eager(*args, **kwargs)

    monkeypatch.setattr(rope, "compiled_rope_function", lambda: counting)
    tokens = torch.randint(0, 128, (1, 64))
    torch.manual_seed(0)
    plain = build_gpt_model(tiny_recipe()).eval()
    recipe = tiny_recipe()
    recipe.train.device = "cuda"  # fused_ops on CUDA: build_gpt_model asks for the compiled RoPE
    torch.manual_seed(0)
    model = build_gpt_model(recipe, config=transformer_config_from_recipe(tiny_recipe())).eval()
    assert model.decoder.layers[0].self_attention.compiled_rope
    assert not plain.decoder.layers[0].self_attention.compiled_rope
    with torch.no_grad():
        expected = plain(tokens, None, None)
        assert calls == []
        got = model(tokens, None, None)
    assert len(calls) == 2 * 2  # q and k in each of the 2 layers
    assert rope_utils._apply_rotary_pos_emb_bshd is eager
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_schedules_microbatch_reaches_the_core_attention(megatron_world):
    """Megatron's schedules call ``set_current_microbatch`` (which sets ``current_microbatch`` on every decoder
    layer) before each micro-batch forward; ``SSATransformerLayer`` hands the index to its core attention."""
    from megatron.core.transformer.cuda_graphs import set_current_microbatch

    from ssa_megatron.megatron.model import build_gpt_model

    model = build_gpt_model(tiny_recipe()).train()
    tokens = torch.randint(0, 128, (1, 64))
    for microbatch in (3, 1):
        set_current_microbatch(model, microbatch)
        model(tokens, None, None)
        assert [layer.self_attention.core_attention.microbatch for layer in model.decoder.layers] == [microbatch] * 2
