"""Model construction from a recipe, in one place (switching GPTModel → HybridModel later is a one-file change).

The training loop, evaluation and the tools call only these two functions. Megatron's parallel state
(``parallel_state.initialize_model_parallel``) must be initialised before ``build_gpt_model``.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import init_method_normal
from ssa_kernels.cross_entropy import cross_entropy_loss

from ssa_megatron.config import RecipeConfig, RopeScalingConfig
from ssa_megatron.megatron.attention import check_tp_heads
from ssa_megatron.megatron.loss import set_alignment_loss_scale
from ssa_megatron.megatron import wgrad_fusion
from ssa_megatron.megatron.mode import MODE_SAMPLER
from ssa_megatron.megatron import output_loss
from ssa_megatron.megatron.output_loss import chunked_lm_loss
from ssa_megatron.megatron.spec import get_ssa_layer_spec, local_block_spec

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def transformer_config_from_recipe(recipe: RecipeConfig, **overrides) -> TransformerConfig:
    """Megatron ``TransformerConfig`` of a Llama-style SSA decoder (RMSNorm, SwiGLU, RoPE, no biases, no dropout).

    Installs the alignment loss's scale hook (``experimental_attention_variant_loss_scale_func``).
    ``overrides`` are passed to ``TransformerConfig`` last (e.g. ``calculate_per_token_loss=True``).
    """
    m, p, t = recipe.model, recipe.parallel, recipe.train
    check_tp_heads(m.num_query_groups, m.num_attention_heads, p.tensor_parallel)
    if m.vocab_size % p.tensor_parallel:
        raise ValueError(f"model.vocab_size={m.vocab_size} must be divisible by parallel.tensor_parallel="
                         f"{p.tensor_parallel} (the embedding is split by vocabulary)")
    if p.pipeline_parallel > 1 and m.num_layers % (p.pipeline_parallel * (p.virtual_pipeline_parallel or 1)):
        raise ValueError(
            f"model.num_layers={m.num_layers} must be divisible by parallel.pipeline_parallel="
            f"{p.pipeline_parallel} x virtual_pipeline_parallel={p.virtual_pipeline_parallel or 1}"
        )
    if p.context_parallel > 1 and p.cp_comm_type != "all_gather":
        raise NotImplementedError(
            f"parallel.cp_comm_type={p.cp_comm_type!r}: SSA context parallelism implements 'all_gather' only"
        )
    dtype = _DTYPES[t.precision]
    # Megatron's native fusions are torch.compile'd (megatron.core.jit.jit_fuser); no Apex/TE needed.
    fused = t.fused_ops and t.uses_cuda()
    recompute = {}
    if t.recompute == "selective":
        recompute = dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    elif t.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform",
                         recompute_num_layers=getattr(t, "recompute_num_layers", 1))
    kwargs = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_std,
        # model.scaled_output_init false: linear_proj and linear_fc2 at init_std too (Megatron: / sqrt(2L))
        **({} if m.scaled_output_init else {"output_layer_init_method": init_method_normal(m.init_std)}),
        bias_activation_fusion=fused,  # SwiGLU in one kernel (bias_swiglu_impl)
        cross_entropy_loss_fusion=fused,
        cross_entropy_fusion_impl="native",
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        # Weight gradients accumulate into the fp32 main_grad inside their GEMM (Apex, or torch's addmm on CUDA).
        gradient_accumulation_fusion=fused and t.precision in ("bf16", "fp16") and wgrad_fusion.enable(),
        tensor_model_parallel_size=p.tensor_parallel,
        pipeline_model_parallel_size=p.pipeline_parallel,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_parallel,
        context_parallel_size=p.context_parallel,
        cp_comm_type="all_gather" if p.context_parallel > 1 else None,
        sequence_parallel=p.sequence_parallel and p.tensor_parallel > 1,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        use_cpu_initialization=not torch.cuda.is_available(),
        experimental_attention_variant_loss_scale_func=set_alignment_loss_scale,
        **recompute,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: RopeScalingConfig) -> torch.Tensor:
    """RoPE inverse frequencies ``[d/2]`` scaled by Llama 3.1's rule (transformers' ``rope_type: llama3``).

    With ``L = original_max_position_embeddings``: a wavelength ``2π/f`` below ``L / high_freq_factor`` keeps its
    frequency, one above ``L / low_freq_factor`` is divided by ``factor``, and between the two the frequency is
    interpolated with ``smooth = (L / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)``:
    ``(1 - smooth) · f / factor + smooth · f``. Megatron's RotaryEmbedding has this rule with ``factor`` as its only
    parameter (the other three fixed at 1, 4 and 8192), so the model sets the frequencies itself.
    """
    L, lo, hi, factor = (scaling.original_max_position_embeddings, scaling.low_freq_factor,
                         scaling.high_freq_factor, scaling.factor)
    wavelen = 2 * math.pi / inv_freq
    smooth = (L / wavelen - lo) / (hi - lo)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > L / lo, inv_freq / factor, inv_freq)
    return torch.where((wavelen >= L / hi) & (wavelen <= L / lo), interpolated, out)


class SSAGPTModel(GPTModel):
    """``GPTModel`` whose RoPE follows ``position_ids`` (docs/ssa.md rule 10: positions reset per document).

    Megatron's GPTModel builds RoPE for positions ``0..S-1`` and reads ``position_ids`` only for learned absolute
    embeddings. Packed rows reset positions at every document, so the RoPE angles are gathered from the table by
    ``position_ids`` instead: ``[s, b, 1, d]`` per token, which Megatron's (unfused) RoPE broadcasts over heads.
    With positions ``0..S-1`` (or their CP chunks) this is exactly Megatron's own table.

    ``rope_scaling`` (``model.rope_scaling``) replaces the table's inverse frequencies by :func:`llama3_inv_freq`.

    ``loss_chunk_tokens`` > 0 (``train.loss_chunk_tokens``): a forward with ``labels`` computes the output layer and
    the per-token loss ``loss_chunk_tokens`` tokens at a time (``output_loss.chunked_lm_loss``), through
    GPTModel's ``output_processor`` hook; without labels (logits) it is GPTModel's own path.

    On CUDA the LM loss (``compute_language_model_loss``, and each chunk of the chunked one) is the Triton
    cross entropy ``ssa_kernels.cross_entropy``, with Megatron's semantics; on CPU it is Megatron's own.
    """

    def __init__(self, config: TransformerConfig, *args, rope_scaling: RopeScalingConfig | None = None,
                 loss_chunk_tokens: int = 0, **kwargs):
        if loss_chunk_tokens:
            _check_chunked_loss_config(config, loss_chunk_tokens)
        super().__init__(config, *args, **kwargs)
        if rope_scaling is not None and rope_scaling.type == "llama3" and hasattr(self, "rotary_pos_emb"):
            # Set before the first forward: RotaryEmbedding.forward caches its tables (lru_cache).
            rotary = self.rotary_pos_emb
            rotary.inv_freq = llama3_inv_freq(rotary.inv_freq, rope_scaling)
        self.loss_chunk_tokens = loss_chunk_tokens

    def forward(self, *args, **kwargs):
        if self.loss_chunk_tokens:
            call = _GPT_FORWARD.bind(self, *args, **kwargs).arguments
            if call.get("labels") is not None and call.get("output_processor") is None:
                kwargs["output_processor"] = self._chunked_lm_loss
        return super().forward(*args, **kwargs)

    def _chunked_lm_loss(self, *, hidden_states, output_layer, output_weight, labels, **_):
        """GPTModel's ``output_processor`` hook (last pipeline stage): the per-token loss ``[b, s]``."""
        weight = output_layer.weight if output_weight is None else output_weight
        return chunked_lm_loss(hidden_states, weight, labels, self.loss_chunk_tokens, self.tp_group,
                               sequence_parallel=self.config.sequence_parallel)

    def compute_language_model_loss(self, labels, logits):
        """GPTModel's per-token LM loss ``[b, s]`` fp32 of ``logits`` ``[s, b, V/tp]``. On CUDA the Triton kernel
        (``ssa_kernels.cross_entropy_loss``: one bf16 read forward, one read and one write backward, the gradient
        written over the logits, which nothing else reads) instead of Megatron's fp32 passes; elsewhere Megatron's."""
        if not output_loss.uses_triton_loss(logits):
            return super().compute_language_model_loss(labels, logits)
        return cross_entropy_loss(logits, labels.t(), tp_group=self.tp_group, overwrite_logits=True).t().contiguous()

    # Overrides a private method: the only place where both position_ids and the RoPE table the decoder receives
    # are in hand (pinned by tests/test_megatron_model.py::test_megatron_methods_we_override_are_unchanged).
    def _preprocess(self, input_ids, position_ids, decoder_input=None, inference_context=None,
                    packed_seq_params=None, padding_mask=None):
        out = super()._preprocess(input_ids, position_ids, decoder_input=decoder_input,
                                  inference_context=inference_context, packed_seq_params=packed_seq_params,
                                  padding_mask=padding_mask)
        rotary_pos_emb = out[1]
        if position_ids is None or rotary_pos_emb is None or self.position_embedding_type != "rope":
            return out
        if self.config.apply_rope_fusion:
            raise ValueError("SSAGPTModel: per-document RoPE positions need apply_rope_fusion=False")
        # packed_seq=True: the whole table, not this CP rank's chunks (position_ids are already CP-sliced). Rows
        # longer than the trained context (length extrapolation) need a longer table; positions never exceed the
        # row length, which is static (no read of position_ids' values, which would wait for the GPU).
        rows = position_ids.shape[1] * self.config.context_parallel_size
        table = self.rotary_pos_emb(max(self.max_sequence_length, rows), packed_seq=True)  # [S, 1, 1, d]
        per_token = table[:, 0, 0][position_ids.t().to(table.device)].unsqueeze(2)  # [s, b, 1, d]
        return (out[0], per_token, *out[2:])


_GPT_FORWARD = inspect.signature(GPTModel.forward)


def _check_chunked_loss_config(config: TransformerConfig, chunk: int) -> None:
    """The chunked loss replaces GPTModel's plain output layer + cross entropy; refuse what it does not do."""
    unsupported = [name for name, on in (
        ("mtp_num_layers", bool(config.mtp_num_layers)),
        ("use_mup", config.use_mup),  # logits scaling
        ("defer_embedding_wgrad_compute", config.defer_embedding_wgrad_compute),
        ("cross_entropy_fusion_impl='te'",
         config.cross_entropy_loss_fusion and config.cross_entropy_fusion_impl == "te"),
    ) if on]
    if unsupported:
        raise ValueError(f"train.loss_chunk_tokens={chunk}: the chunked output layer and loss does not support "
                         f"{', '.join(unsupported)}; set train.loss_chunk_tokens=0 (Megatron's path)")


def build_gpt_model(
    recipe: RecipeConfig,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    config: TransformerConfig | None = None,
) -> GPTModel:
    """The SSA GPTModel (this rank's pipeline stage / virtual chunk ``vp_stage``) on the current device.

    Also seeds the mode sampler with ``recipe.train.seed``. Parameters are created in ``params_dtype``; on a GPU the
    module is moved to the current CUDA device. With ``train.fused_ops`` on CUDA its attention layers run a compiled
    RoPE (``ssa_megatron.megatron.rope``). ``model.transformer_impl`` picks the layer spec: megatron-core's modules
    (``local``) or Transformer Engine's (``transformer_engine``: needs TE and a GPU; one-line error otherwise).
    """
    m = recipe.model
    # The spec first: a missing Transformer Engine is reported before anything is allocated.
    compiled_rope = recipe.train.fused_ops and recipe.train.uses_cuda()
    layer_spec = get_ssa_layer_spec(m.transformer_impl, recipe.ssa, compiled_rope=compiled_rope,
                                    attention=m.attention, nsa=recipe.nsa)
    if m.transformer_impl == "transformer_engine" and not torch.cuda.is_available():
        raise ValueError("model.transformer_impl=transformer_engine: Transformer Engine's layers run on CUDA only "
                           "and this process sees no GPU; set model.transformer_impl=local")
    config = config or transformer_config_from_recipe(recipe)
    if m.transformer_impl == "local":
        layer_spec = local_block_spec(layer_spec, config, vp_stage)
    MODE_SAMPLER.configure(recipe.train.seed)
    model = SSAGPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=m.vocab_size,
        max_sequence_length=m.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=m.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(m.rope_theta),
        rope_scaling=m.rope_scaling,
        loss_chunk_tokens=recipe.train.loss_chunk_tokens,
        vp_stage=vp_stage,
    )
    if torch.cuda.is_available():
        model = model.cuda(torch.cuda.current_device())
    return model
