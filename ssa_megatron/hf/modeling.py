"""``SSALlamaForCausalLM``: transformers' Llama with SSA attention (docs/ssa.md rules 5 and 9).

Everything but the attention core is transformers' Llama (embeddings, RMSNorm, SwiGLU MLP, rotary embedding,
LM head); :class:`SSALlamaDecoderLayer` is Llama's layer computing the same operations in the same order, with its
norms and residual additions handed to the projections (a decode step fuses them into its projection kernels).
:class:`SSALlamaAttention` keeps Llama's q/k/v/o projections and RoPE, adds the gate
``g_proj`` (hidden → one logit per query head, no bias; the sigmoid is applied inside ``ssa_attention``), and
hands ``[s, b, h, d]`` views of q/k/v to :func:`ssa_megatron.ssa.ssa_attention` — the one definition of SSA's
selection and attention — with ``training=False`` and the configured mode and budget.

KV cache: supported in both modes. New queries sit at the last positions of the cached key sequence
(``q_positions`` default), so a decoded token selects among the complete blocks of everything cached before it,
exactly as in a full-sequence forward. One new token per row on the SSA cache layers (``decoding.py``; what
``generate()`` makes, dynamic or static) scores the pooled block keys kept in the cache and attends to the
selected blocks only; a static cache's step compiles into one graph (CUDA graphs). Padding (an ``attention_mask``
with zeros) is not supported: SSA's block grid is defined on unpadded rows; batch equal-length rows or run one row
at a time.

Fused projections (:class:`FusedProjections`): ``from_pretrained`` (or ``fuse_projections()``) stacks each layer's
q/k/v/g projections into ``self_attn.qkvg_proj`` and gate/up into ``mlp.gate_up_proj``, so that a token runs two GEMMs
where Llama runs six. Weights are held once, and ``state_dict()``, ``load_state_dict()`` and ``save_pretrained`` keep
Llama's names, so files on disk never change.

Remote code: this file, ``configuration.py``, ``decoding.py``, ``decode_triton.py`` and the package's
``ssa/reference.py`` are copied into every gated export (``ssa_megatron.hf.export``), where
``trust_remote_code=True`` loads them with only torch and transformers installed. There (``IN_PACKAGE`` false)
``ssa_megatron`` is never imported and the attention core is :func:`_exported_attention`: the inference branch of
``ssa_attention`` (``training=False``: select, attend, gate) calling the copied reference, the same functions
``ssa_attention`` calls on CPU. The training kernels and the attention statistics (``collect_attention_metrics``)
need the package; the decode kernels (``decode_triton.py``) travel with the export.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_rope_utils import dynamic_rope_update
from transformers.utils import logging

from .configuration import IN_PACKAGE, MODES, SSALlamaConfig
from .decode_triton import SPLIT_TICKETS, linear_by_kernel, use_linear_kernel
from .decoding import append_and_attend, append_token, decode_attention, valid_keys

if IN_PACKAGE:  # importlib, not an import statement, which transformers' remote-code check would demand
    ssa_attention = importlib.import_module("ssa_megatron.ssa").ssa_attention
    apply_gate = importlib.import_module("ssa_megatron.ssa.reference").apply_gate
else:  # an export folder: ssa_megatron/ssa/reference.py is copied beside this file
    from .reference import apply_gate, full_attention, select_blocks, sparse_attention

logger = logging.get_logger(__name__)


def _exported_attention(q, k, v, gate, config: SSALlamaConfig, cu_seqlens, softmax_scale):
    """``ssa_attention(q, k, v, gate, config.ssa_config(), config.ssa_mode, training=False)`` on the reference,
    for export folders. q ``[sq, b, HQ, D]``, k/v ``[skv, b, HKV, D]``, gate ``[sq, b, HQ]`` logits or None."""
    docs = cu_seqlens if config.ssa_document_mask else None
    if config.ssa_mode == "full":
        out, _ = full_attention(q, k, v, docs, None, softmax_scale)
    else:
        idx, _ = select_blocks(q, k, config.ssa_block_size, config.ssa_top_k, config.ssa_score,
                               config.ssa_sink_blocks, config.ssa_local_blocks, docs, None, softmax_scale,
                               selection=config.ssa_selection, normaliser=config.ssa_normaliser)
        out, _ = sparse_attention(q, k, v, idx, config.ssa_block_size, None, softmax_scale,
                                  starts_on_grid=docs is None)
    return apply_gate(out, gate)


FUSABLE = "only bias-free nn.Linear projections with materialised weights on one device can be fused"
"""What :meth:`FusedProjections.fuse` and :meth:`SSALlamaPreTrainedModel.fuse_projections` accept (their errors
say it)."""


class FusedProjections:
    """Mixin for a module whose bias-free ``nn.Linear`` children :meth:`projection_names` all read the same input.

    :meth:`fuse` replaces them by one linear, named ``fused_name``, whose weight stacks theirs by output rows: one
    GEMM per input instead of several, which at batch 1 decoding is one kernel launch instead of several (k, v and
    the gate are tiny GEMVs bound by their launch). :meth:`unfuse` splits it back. No weight is held twice: the
    stacked weight is new storage, and the separate linears are dropped (their storage is freed unless something
    else, such as an optimizer, still holds them; fuse before building one).

    Names stay Llama's in both layouts: a state-dict post-hook splits the stacked weight into views named as the
    separate weights, in the unfused key order, and a load pre-hook stacks such weights, so ``state_dict()``,
    ``load_state_dict()``, ``save_pretrained``, the export and the converters see the same keys and tensors.

    Numerics: every output element is the same dot product over the input features. Only the kernel can differ:
    the fused GEMM is wider, so a BLAS may block it otherwise or pick another kernel, and sum in another order. On
    CPU, GEMMs of a few rows (decode steps, float32 and bfloat16) give bitwise equal outputs, and GEMMs of many rows
    (a prefill) agree to float rounding. On CUDA in bf16, cuBLAS may choose another kernel for the wider GEMM, and
    an output may then round to a neighbouring bf16 value of the float32 sum: tests/gpu/test_fused_projections_gpu.py
    bounds the gap by one bf16 step at the largest output, and prints how many outputs differ.
    """

    fused_name: str

    def projection_names(self) -> tuple[str, ...]:
        """The separate linears, in the order of their rows in the stacked weight."""
        raise NotImplementedError

    def _init_fusion(self) -> None:
        setattr(self, self.fused_name, None)
        self.fused_sizes: tuple[int, ...] | None = None
        """Output rows of each separate linear in the stacked weight, in :meth:`projection_names` order; None when
        unfused."""
        self._unfused_order: list[str] | None = None
        # Counters of the multi-row product's split blocks (decode_triton.linear_by_kernel), made when fused: not
        # state, and kept on the module so that a compiled step finds them at fixed addresses.
        self.register_buffer("split_tickets", None, persistent=False)
        self.register_state_dict_post_hook(_split_fused_state)
        self.register_load_state_dict_pre_hook(_stack_fused_state)

    def fusion_blocker(self) -> str | None:
        """Why :meth:`fuse` cannot run here (a quantized, biased, offloaded or distributed projection), else None."""
        if self.fused_sizes is not None:
            return None
        names = self.projection_names()
        for name in names:
            part = getattr(self, name)
            if type(part) is not nn.Linear:
                return f"{name} is a {type(part).__name__}, not an nn.Linear"
            if part.bias is not None:
                return f"{name} has a bias"
        first = getattr(self, names[0]).weight
        for name in names:
            w = getattr(self, name).weight
            if w.device.type == "meta" or getattr(w, "placements", None) is not None:
                return f"{name}.weight is offloaded (meta) or distributed (DTensor)"
            if (w.device, w.dtype, w.requires_grad) != (first.device, first.dtype, first.requires_grad):
                return f"{name}.weight differs from {names[0]}.weight in device, dtype or requires_grad"
        return None

    @torch.no_grad()
    def fuse(self) -> None:
        """Stacks the separate projections into ``fused_name`` (idempotent)."""
        if self.fused_sizes is not None:
            return
        reason = self.fusion_blocker()
        if reason is not None:
            raise ValueError(f"{type(self).__name__}.fuse: {reason}; {FUSABLE}")
        names = self.projection_names()
        parts = [getattr(self, name) for name in names]
        fused = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=False, device="meta")
        fused.weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=parts[0].weight.requires_grad)
        self._unfused_order = list(self._modules)
        self.fused_sizes = tuple(p.out_features for p in parts)
        del parts
        for name in names:
            delattr(self, name)
        setattr(self, self.fused_name, fused)
        _reorder(self._modules, [self.fused_name if n == names[0] else n for n in self._unfused_order
                                 if n not in names[1:]])
        self.split_tickets = torch.zeros(SPLIT_TICKETS, dtype=torch.int32, device=fused.weight.device)
        torch._dynamo.mark_static_address(self.split_tickets)  # written in place by a CUDA-graphed step

    @torch.no_grad()
    def unfuse(self) -> None:
        """Splits ``fused_name`` back into the separate projections, in their original module order (idempotent)."""
        if self.fused_sizes is None:
            return
        fused = getattr(self, self.fused_name)
        for name, w in zip(self.projection_names(), fused.weight.split(self.fused_sizes)):
            part = nn.Linear(fused.in_features, w.shape[0], bias=False, device="meta")
            part.weight = nn.Parameter(w.clone(), requires_grad=fused.weight.requires_grad)
            setattr(self, name, part)
        delattr(self, self.fused_name)
        setattr(self, self.fused_name, None)
        _reorder(self._modules, self._unfused_order)
        self.fused_sizes = self._unfused_order = self.split_tickets = None


def _project(linear: nn.Linear, x: torch.Tensor, swiglu: bool = False, norm: nn.Module | None = None,
             residual: torch.Tensor | None = None, tickets: torch.Tensor | None = None,
             swiglu_out: bool = False) -> torch.Tensor:
    """``residual + act_out(linear(act(norm(x))))``, each part but ``linear`` optional: ``norm`` a module applied
    first, ``swiglu`` the activation ``silu(gate) * up`` of ``x = [gate | up]``, ``swiglu_out`` the same activation
    of the output (a ``[gate | up]`` weight), ``residual`` added last. For a decode step's rows (up to
    ``decode_triton.ROWS_MAX``) on CUDA in bf16/fp16 with no gradient, and a Llama RMSNorm, all of it is one kernel
    of ``decode_triton.py`` (``tickets``: its split blocks' counters), which reads the weight faster than cuBLAS does
    at so few rows; elsewhere the eager operations, in that order."""
    rms = norm is not None and type(norm) is LlamaRMSNorm
    if (linear.bias is None and (norm is None or rms)
            and use_linear_kernel(x, linear.weight, norm.weight if rms else None, residual)):
        return linear_by_kernel(x, linear.weight, swiglu, norm.weight if rms else None,
                                norm.variance_epsilon if rms else 0.0, residual, tickets, swiglu_out)
    if norm is not None:
        x = norm(x)
    if swiglu:
        x = _silu_and_mul(x)
    out = linear(x)
    if swiglu_out:
        out = _silu_and_mul(out)
    return out if residual is None else residual + out


def _silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation ``silu(gate) * up`` of ``x = [gate | up]``."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def _reorder(modules: dict, order: list[str]) -> None:
    for name in order:
        modules[name] = modules.pop(name)


def _split_fused_state(module: FusedProjections, state: dict, prefix: str, local_metadata) -> None:
    """State-dict post-hook: the stacked weight as the separate weights (views), keys in the unfused order."""
    if module.fused_sizes is None:
        return
    pieces = state.pop(f"{prefix}{module.fused_name}.weight").split(module.fused_sizes)
    pieces = {f"{prefix}{name}.weight": w for name, w in zip(module.projection_names(), pieces)}
    mine = {k: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}  # this module's keys end the dict
    state.update((k, v) for k, v in mine.items() if "." not in k[len(prefix):])  # its own tensors come first
    for name in module._unfused_order:
        state.update((k, v) for k, v in (*pieces.items(), *mine.items()) if k.startswith(f"{prefix}{name}."))


def _stack_fused_state(module: FusedProjections, state: dict, prefix: str, *args) -> None:
    """Load pre-hook: the separate weights of a state dict stacked into the fused one."""
    keys = [f"{prefix}{name}.weight" for name in module.projection_names()]
    if module.fused_sizes is not None and all(k in state for k in keys):
        state[f"{prefix}{module.fused_name}.weight"] = torch.cat([state.pop(k) for k in keys])


class SSALlamaAttention(FusedProjections, LlamaAttention):
    """Llama attention whose core is ``ssa_attention``. Input/output ``[b, s, hidden]``. Fused
    (:class:`FusedProjections`), ``qkvg_proj`` holds the rows of q_proj, k_proj, v_proj and g_proj (when gated)."""

    fused_name = "qkvg_proj"

    def __init__(self, config: SSALlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.g_proj = (nn.Linear(config.hidden_size, config.num_attention_heads, bias=False)
                       if config.ssa_gate == "per_head" else None)
        self.collect_metrics = False
        """When True, each forward stores ``reference.attention_metrics`` (per query head) in ``last_metrics``."""
        self.last_metrics: dict[str, torch.Tensor] | None = None
        self.ssa_training = None
        """``(SSAConfig, mode)`` set by ``ssa_megatron.hf.finetune`` for each micro-batch: forwards in train mode
        then run ``ssa_attention(..., training=True)`` with it (both branches when alpha > 0) and keep the layer's
        unweighted alignment loss in ``alignment_loss``. Package only."""
        self.alignment_loss: torch.Tensor | None = None
        self._init_fusion()

    def projection_names(self) -> tuple[str, ...]:
        return ("q_proj", "k_proj", "v_proj") + (("g_proj",) if self.config.ssa_gate == "per_head" else ())

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                past_key_values=None, cu_seqlens=None, norm=None, residual=None, **kwargs):
        """Llama's attention, with two optional parts that :class:`SSALlamaDecoderLayer` hands it: ``norm``
        applied to ``hidden_states`` first and ``residual`` added to the output (``_project`` fuses both into the
        projections' kernel where it runs)."""
        cache = cache if cache is not None else past_key_values
        if self.qkvg_proj is not None:  # one GEMM; the split outputs are views
            q, k, v, *g = _project(self.qkvg_proj, hidden_states, norm=norm, tickets=self.split_tickets).split(
                self.fused_sizes, dim=-1)
        else:
            x = norm(hidden_states) if norm is not None else hidden_states
            q, k, v = (_project(p, x) for p in (self.q_proj, self.k_proj, self.v_proj))
            g = [_project(self.g_proj, x)] if self.g_proj is not None else []
        gate = g[0] if g else None  # [b, s, HQ] logits
        out = self._attend(q, k, v, position_embeddings, gate, cache, cu_seqlens)
        return _project(self.o_proj, out, residual=residual, tickets=self.split_tickets), None

    def _attend(self, q, k, v, position_embeddings, gate, cache, cu_seqlens):
        """RoPE, the cache update and the gated attention of the unrotated projections ``q``/``k``/``v [b, s, H·D]``
        with gate logits ``[b, s, HQ]`` (or None); returns ``[b, s, HQ·D]``."""
        b, s = q.shape[:2]
        cos, sin = position_embeddings
        decode = cache is not None and cu_seqlens is None and not self.collect_metrics  # decoding.py's paths
        appended = None
        if cache is not None and s == 1:  # one new token on a static cache
            if decode:  # sparse mode: RoPE, the cache update, the selection and the attention in 3 kernels
                out = append_and_attend(cache, self.layer_idx, q, k, v, cos, sin, self.config, self.scaling, gate)
                if out is not None:
                    return out.transpose(1, 2).reshape(b, s, -1)
            appended = append_token(cache, self.layer_idx, q, k, v, cos, sin, self.config.ssa_block_size)  # 1 kernel
        if appended is not None:
            q, k, v = appended
        else:
            q, k, v = (t.view(b, s, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))  # [b, H, s, D]
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx, ssa_block_size=self.config.ssa_block_size)
        if cache is not None:
            layer = cache.layers[self.layer_idx]
            if decode:  # one new token: the cache's pooled keys (decoding.py), gated
                out = decode_attention(q, layer, self.config, self.scaling, gate)
                if out is not None:
                    return out.transpose(1, 2).reshape(b, s, -1)
            k, v = valid_keys(layer, k, v)
            if cu_seqlens is not None and k.shape[2] != s:
                raise ValueError("SSALlamaAttention: cu_seqlens (document masking) cannot be combined with a "
                                 "KV cache holding earlier tokens")

        q, k, v = (t.permute(2, 0, 1, 3) for t in (q, k, v))  # [b, h, s, D] -> [s, b, h, D]
        gate = gate.transpose(0, 1) if gate is not None else None  # [s, b, HQ]
        if IN_PACKAGE:
            train = self.training and self.ssa_training is not None
            cfg, mode = self.ssa_training if train else (self.config.ssa_config(), self.config.ssa_mode)
            out, loss, stats = ssa_attention(q, k, v, gate, cfg, mode, train, cu_seqlens=cu_seqlens,
                                             softmax_scale=self.scaling, with_metrics=self.collect_metrics)
            self.last_metrics = stats.metrics
            self.alignment_loss = loss if train else None
        else:
            if self.collect_metrics:
                raise ValueError("collect_attention_metrics needs the ssa_megatron package (import ssa_megatron.hf "
                                 "and load without trust_remote_code)")
            out = _exported_attention(q, k, v, gate, self.config, cu_seqlens, self.scaling)
        return out.permute(1, 0, 2, 3).reshape(b, s, -1)  # [s, b, HQ, D] -> [b, s, HQ·D]


class SSALlamaMLP(FusedProjections, LlamaMLP):
    """Llama's SwiGLU MLP; fused (:class:`FusedProjections`), ``gate_up_proj`` holds the rows of gate_proj then
    up_proj (Megatron's ``linear_fc1`` layout)."""

    fused_name = "gate_up_proj"

    def __init__(self, config):
        super().__init__(config)
        self._init_fusion()

    def projection_names(self) -> tuple[str, ...]:
        return ("gate_proj", "up_proj")

    def forward(self, x, norm=None, residual=None):
        """Llama's MLP, with ``norm`` applied to ``x`` first and ``residual`` added last where given (as for
        :meth:`SSALlamaAttention.forward`)."""
        if self.gate_up_proj is None:
            out = super().forward(norm(x) if norm is not None else x)
            return out if residual is None else residual + out
        if self.config.hidden_act == "silu":
            # SwiGLU inside the kernels: at one row the down projection's GEMV applies the activation to its input;
            # at more, the gate|up product to its output, so that the down product's input goes to the tensor cores
            # as loaded (decode_triton.linear_by_kernel's swiglu_out). The same operations either way.
            if x.numel() == x.shape[-1]:
                gate_up = _project(self.gate_up_proj, x, norm=norm, tickets=self.split_tickets)
                return _project(self.down_proj, gate_up, swiglu=True, residual=residual, tickets=self.split_tickets)
            act = _project(self.gate_up_proj, x, norm=norm, tickets=self.split_tickets, swiglu_out=True)
            return _project(self.down_proj, act, residual=residual, tickets=self.split_tickets)
        gate_up = _project(self.gate_up_proj, x, norm=norm, tickets=self.split_tickets)
        gate, up = gate_up.chunk(2, dim=-1)
        return _project(self.down_proj, self.act_fn(gate) * up, residual=residual, tickets=self.split_tickets)


class SSALlamaDecoderLayer(LlamaDecoderLayer):
    """Llama's decoder layer with :class:`SSALlamaAttention` and :class:`SSALlamaMLP`, which it hands its norms and
    residual additions: the same operations in the same order as Llama's layer, but where the projection kernels run
    (a decode step of up to ``decode_triton.ROWS_MAX`` rows) each norm is fused into the projection after it and
    each addition into the one before it, so that a decode step launches no kernel of its own for them."""

    def __init__(self, config: SSALlamaConfig, layer_idx: int):
        # LlamaDecoderLayer's modules, in its order, built once: its __init__ would build Llama's attention and MLP
        # only for them to be replaced (full-size weights, and random draws that would change a seeded model).
        GradientCheckpointingLayer.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = SSALlamaAttention(config, layer_idx)
        self.mlp = SSALlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, past_key_values=None, **kwargs):
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache if cache is not None else past_key_values, use_cache=use_cache,
            position_embeddings=position_embeddings, norm=self.input_layernorm, residual=hidden_states, **kwargs)
        return self.mlp(hidden_states, norm=self.post_attention_layernorm, residual=hidden_states)


class SSALlamaPreTrainedModel(LlamaPreTrainedModel):
    config: SSALlamaConfig
    config_class = SSALlamaConfig
    _no_split_modules = ["SSALlamaDecoderLayer"]
    _supports_flash_attn = False
    _supports_flex_attn = False
    _can_compile_fullgraph = False
    _supports_attention_backend = False

    @classmethod
    def from_pretrained(cls, *args, fuse_projections: bool = True, **kwargs):
        """``PreTrainedModel.from_pretrained``, then :meth:`fuse_projections` (unless ``fuse_projections=False``,
        or a projection cannot be fused: quantized, biased, offloaded or distributed ones stay separate), as serving
        stacks fuse at load. The files read are Llama's, and what the model saves stays Llama's."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
        if fuse_projections:
            reason = model.projection_fusion_blocker()
            if reason is None:
                model.fuse_projections()
            else:
                logger.info("%s.from_pretrained: projections left separate: %s", cls.__name__, reason)
        return loaded

    def projection_modules(self) -> list[FusedProjections]:
        return [m for m in self.modules() if isinstance(m, FusedProjections)]

    def projection_fusion_blocker(self) -> str | None:
        """Why :meth:`fuse_projections` cannot run (the first module that blocks it), else None."""
        for name, module in self.named_modules():
            if isinstance(module, FusedProjections) and (reason := module.fusion_blocker()) is not None:
                return f"{name}: {reason}"
        return None

    def fuse_projections(self) -> None:
        """Per decoder layer, one GEMM for q|k|v|g (``self_attn.qkvg_proj``) and one for gate|up
        (``mlp.gate_up_proj``) instead of six (:class:`FusedProjections`: no weight held twice, state-dict names
        unchanged, CPU decode steps bitwise equal). ``from_pretrained`` does it by default; call it on a model built
        or loaded another way before decoding, and before making an optimizer, whose parameters it replaces.
        Training runs through the fused linears as well; :meth:`unfuse_projections` restores Llama's modules
        (for code that addresses ``q_proj`` and the others by name, such as PEFT's ``target_modules``)."""
        reason = self.projection_fusion_blocker()
        if reason is not None:
            raise ValueError(f"fuse_projections: {reason}; {FUSABLE}")
        for module in self.projection_modules():
            module.fuse()

    def unfuse_projections(self) -> None:
        """Undoes :meth:`fuse_projections` (new storage for the separate weights; the stacked ones are freed)."""
        for module in self.projection_modules():
            module.unfuse()

    @property
    def projections_fused(self) -> bool:
        return any(m.fused_sizes is not None for m in self.projection_modules())


class SSALlamaRotaryEmbedding(LlamaRotaryEmbedding):
    """Llama's rotary embedding with the angles ``position · inv_freq`` as an elementwise product, as transformers
    5.24 computes them. Earlier versions (5.17 among them) compute them as a matmul over one summed term: the same
    float32 products (with TF32 off; with it on, the matmul's are rounded coarser), but on a GPU a GEMM of its own in
    every decode step, 3.9 us of a 1 ms batch-1 step on an H200 (docs/benchmarks.md, session 12)."""

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return ((emb.cos() * self.attention_scaling).to(dtype=x.dtype),
                (emb.sin() * self.attention_scaling).to(dtype=x.dtype))


class SSALlamaModel(SSALlamaPreTrainedModel, LlamaModel):
    """``LlamaModel`` whose decoder layers are :class:`SSALlamaDecoderLayer`, with :class:`SSALlamaRotaryEmbedding`."""

    def __init__(self, config: SSALlamaConfig):
        super().__init__(config)
        self.layers = nn.ModuleList(SSALlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.rotary_emb = SSALlamaRotaryEmbedding(config=config)  # buffers only: no random draw
        self.post_init()


class SSALlamaLMHead(nn.Linear):
    """The LM head: an ``nn.Linear`` (the same parameter and state-dict name) whose product at a decode step's rows is
    the projection kernel where it runs (``decode_triton.use_linear_kernel``; unsplit, its 128,256 outputs make
    enough programs), as the decoder layers' projections are (:func:`_project`); elsewhere ``nn.Linear``'s.
    ``resize_token_embeddings`` keeps it on a model with tied embeddings; on an untied one transformers puts a plain
    ``nn.Linear`` in its place, which computes the same product through cuBLAS."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None and use_linear_kernel(x, self.weight):
            return linear_by_kernel(x, self.weight)
        return super().forward(x)


class SSALlamaForCausalLM(SSALlamaPreTrainedModel, LlamaForCausalLM):
    """Causal LM with SSA attention; ``set_attention_mode`` switches full/sparse and the budget in place."""

    def __init__(self, config: SSALlamaConfig):
        SSALlamaPreTrainedModel.__init__(self, config)
        self.model = SSALlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = SSALlamaLMHead(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, *args, **kwargs):
        # Not inside a compiled decode step (generate() compiles them on CUDA): reading the mask there would be a
        # host synchronisation and a graph break; the uncompiled prefill has checked the prompt's mask.
        if (attention_mask is not None and attention_mask.dim() == 2 and not torch.compiler.is_compiling()
                and not bool(attention_mask.all())):
            raise ValueError("SSALlamaForCausalLM: attention_mask has padded (zero) positions; SSA has no padding "
                             "support (its block grid starts at each row's first token). Use equal-length rows.")
        return super().forward(input_ids, attention_mask, *args, **kwargs)

    def set_attention_mode(self, mode: str, top_k: int | None = None, block_size: int | None = None) -> None:
        """Switches inference to ``mode`` ('full' or 'sparse'), optionally with a new budget / block size."""
        if mode not in MODES:
            raise ValueError(f"set_attention_mode(mode={mode!r}): must be one of {', '.join(map(repr, MODES))}")
        old = (self.config.ssa_mode, self.config.ssa_top_k, self.config.ssa_block_size)
        self.config.ssa_mode = mode
        if top_k is not None:
            self.config.ssa_top_k = int(top_k)
        if block_size is not None:
            self.config.ssa_block_size = int(block_size)
        try:
            if IN_PACKAGE:
                self.config.ssa_config().validate("set_attention_mode")
            else:  # an export folder has no SSAConfig: the reference checks the budget when it runs
                self.config.validate_architecture()
        except ValueError:
            self.config.ssa_mode, self.config.ssa_top_k, self.config.ssa_block_size = old
            raise

    def ssa_attention_modules(self) -> list[SSALlamaAttention]:
        return [layer.self_attn for layer in self.model.layers]

    def collect_attention_metrics(self, enabled: bool = True) -> None:
        """Makes every layer store per-head attention statistics of its next forward in ``last_metrics``."""
        for attn in self.ssa_attention_modules():
            attn.collect_metrics = enabled
            attn.last_metrics = None


def register() -> None:
    """Registers ``ssa_llama`` with the Auto classes (idempotent)."""
    AutoConfig.register("ssa_llama", SSALlamaConfig, exist_ok=True)
    AutoModel.register(SSALlamaConfig, SSALlamaModel, exist_ok=True)
    AutoModelForCausalLM.register(SSALlamaConfig, SSALlamaForCausalLM, exist_ok=True)
