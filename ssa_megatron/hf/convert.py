"""Conversion between Megatron torch_dist checkpoints (``ssa_megatron.training.checkpoint``) and HF folders.

Megatron → HF reads the checkpoint without a process group or a model (``resolve_checkpoint``,
``read_checkpoint_recipe`` and ``read_model_tensors`` of ``ssa_megatron.training.checkpoint``): only the model
tensors are read, never the optimizer state. In a torch_dist checkpoint every tensor is global (tensor-parallel shards merged) and the decoder layers are stacked on dim 0 by global layer index
(pipeline stages merged)::

    embedding.word_embeddings.weight                            [V, H]
    decoder.layers.self_attention.linear_qkv.layer_norm_weight  [L, H]          input RMSNorm
    decoder.layers.self_attention.linear_qkv.weight             [L, (nh + 2 ng)·d, H]
    decoder.layers.self_attention.linear_gate.weight            [L, nh, H]      SSA gate (gate='per_head')
    decoder.layers.self_attention.linear_proj.weight            [L, H, nh·d]
    decoder.layers.mlp.linear_fc1.layer_norm_weight             [L, H]          pre-MLP RMSNorm
    decoder.layers.mlp.linear_fc1.weight                        [L, 2F, H]      [gate; up] (SwiGLU)
    decoder.layers.mlp.linear_fc2.weight                        [L, H, F]
    decoder.final_layernorm.weight                              [H]
    output_layer.weight                                         [V, H]          absent with tied embeddings

The fused QKV holds, per KV group, that group's query heads, then its key head, then its value head:
``W.view(ng, nh/ng + 2, d, H)``. HF → Megatron is the exact inverse, and writes a checkpoint through the project's
``Checkpointer`` from a GPTModel built by ``build_gpt_model``, so ``ssa-train ... checkpoint.load=PATH`` loads it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from torch import Tensor

from ssa_megatron.config import ModelConfig, RecipeConfig, RopeScalingConfig, SSAConfig
from ssa_megatron.hf.configuration import SSALlamaConfig, hf_config_from_recipe
from ssa_megatron.hf.export import DEFAULT_MAX_SHARD_SIZE, write_export

log = logging.getLogger(__name__)

_LAYER = "decoder.layers."
# Stacked checkpoint key -> its alternatives (the TE-fused name is what the local spec saves too).
INPUT_NORM = ("decoder.layers.self_attention.linear_qkv.layer_norm_weight", "decoder.layers.input_layernorm.weight")
MLP_NORM = ("decoder.layers.mlp.linear_fc1.layer_norm_weight", "decoder.layers.pre_mlp_layernorm.weight")
QKV = "decoder.layers.self_attention.linear_qkv.weight"
GATE = "decoder.layers.self_attention.linear_gate.weight"
PROJ = "decoder.layers.self_attention.linear_proj.weight"
FC1 = "decoder.layers.mlp.linear_fc1.weight"
FC2 = "decoder.layers.mlp.linear_fc2.weight"
EMBED = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------------------------
# The mapping (pure tensor functions)

def _get(state: dict[str, Tensor], keys: str | tuple[str, ...], source: str) -> Tensor:
    for key in (keys,) if isinstance(keys, str) else keys:
        if key in state:
            return state[key]
    raise ValueError(f"{source}: missing tensor {keys if isinstance(keys, str) else keys[0]!r}")


def _check(name: str, t: Tensor, shape: tuple[int, ...], source: str) -> Tensor:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{source}: tensor {name!r} has shape {tuple(t.shape)} but the configuration implies "
                         f"{tuple(shape)}; the weights and the configuration do not match")
    return t


def megatron_to_hf_state_dict(state: dict[str, Tensor], config: SSALlamaConfig,
                              source: str = "checkpoint") -> dict[str, Tensor]:
    """HF ``SSALlamaForCausalLM`` state dict from Megatron's stacked checkpoint tensors (shapes checked)."""
    L, H, F = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    nh, ng, d, V = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.vocab_size
    hf: dict[str, Tensor] = {}
    hf["model.embed_tokens.weight"] = _check(EMBED, _get(state, EMBED, source), (V, H), source)
    hf["model.norm.weight"] = _check(FINAL_NORM, _get(state, FINAL_NORM, source), (H,), source)
    if config.tie_word_embeddings:
        if OUTPUT in state and not torch.equal(state[OUTPUT], state[EMBED]):
            raise ValueError(f"{source}: tie_word_embeddings=True but {OUTPUT!r} differs from {EMBED!r}")
    else:
        hf["lm_head.weight"] = _check(OUTPUT, _get(state, OUTPUT, source), (V, H), source)

    qkv = _check(QKV, _get(state, QKV, source), (L, (nh + 2 * ng) * d, H), source)
    qkv = qkv.view(L, ng, nh // ng + 2, d, H)
    stacked = {
        "input_layernorm.weight": _check(INPUT_NORM[0], _get(state, INPUT_NORM, source), (L, H), source),
        "post_attention_layernorm.weight": _check(MLP_NORM[0], _get(state, MLP_NORM, source), (L, H), source),
        "self_attn.q_proj.weight": qkv[:, :, : nh // ng].reshape(L, nh * d, H),
        "self_attn.k_proj.weight": qkv[:, :, -2].reshape(L, ng * d, H),
        "self_attn.v_proj.weight": qkv[:, :, -1].reshape(L, ng * d, H),
        "self_attn.o_proj.weight": _check(PROJ, _get(state, PROJ, source), (L, H, nh * d), source),
        "mlp.down_proj.weight": _check(FC2, _get(state, FC2, source), (L, H, F), source),
    }
    fc1 = _check(FC1, _get(state, FC1, source), (L, 2 * F, H), source)
    stacked["mlp.gate_proj.weight"], stacked["mlp.up_proj.weight"] = fc1.chunk(2, dim=1)
    if config.ssa_gate == "per_head":
        stacked["self_attn.g_proj.weight"] = _check(GATE, _get(state, GATE, source), (L, nh, H), source)
    elif GATE in state:
        raise ValueError(f"{source}: holds gate weights ({GATE!r}) but the configuration says ssa_gate='none'")
    for name, t in stacked.items():
        for i in range(L):
            hf[f"model.layers.{i}.{name}"] = t[i].clone()
    return hf


def hf_to_megatron_state_dict(hf: dict[str, Tensor], config: SSALlamaConfig,
                              source: str = "HF model") -> dict[str, Tensor]:
    """Megatron's stacked checkpoint tensors from an HF ``SSALlamaForCausalLM`` state dict (shapes checked)."""
    L, H, F = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    nh, ng, d, V = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.vocab_size

    def layers(name: str, shape: tuple[int, ...]) -> Tensor:
        return torch.stack([_check(f"model.layers.{i}.{name}", _get(hf, f"model.layers.{i}.{name}", source),
                                   shape, source) for i in range(L)])

    out: dict[str, Tensor] = {
        EMBED: _check("model.embed_tokens.weight", _get(hf, "model.embed_tokens.weight", source), (V, H), source),
        FINAL_NORM: _check("model.norm.weight", _get(hf, "model.norm.weight", source), (H,), source),
        INPUT_NORM[0]: layers("input_layernorm.weight", (H,)),
        MLP_NORM[0]: layers("post_attention_layernorm.weight", (H,)),
        PROJ: layers("self_attn.o_proj.weight", (H, nh * d)),
        FC2: layers("mlp.down_proj.weight", (H, F)),
        FC1: torch.cat([layers("mlp.gate_proj.weight", (F, H)), layers("mlp.up_proj.weight", (F, H))], dim=1),
    }
    q = layers("self_attn.q_proj.weight", (nh * d, H)).view(L, ng, nh // ng, d, H)
    k = layers("self_attn.k_proj.weight", (ng * d, H)).view(L, ng, 1, d, H)
    v = layers("self_attn.v_proj.weight", (ng * d, H)).view(L, ng, 1, d, H)
    out[QKV] = torch.cat([q, k, v], dim=2).reshape(L, (nh + 2 * ng) * d, H)
    if config.ssa_gate == "per_head":
        out[GATE] = layers("self_attn.g_proj.weight", (nh, H))
    if not config.tie_word_embeddings:
        out[OUTPUT] = _check("lm_head.weight", _get(hf, "lm_head.weight", source), (V, H), source)
    return out


def stacked_to_module_state_dict(stacked: dict[str, Tensor], module_keys: list[str] | set[str],
                                 num_layers: int, source: str = "weights") -> dict[str, Tensor]:
    """Per-layer keys of a GPTModel (``decoder.layers.{i}...``) from stacked checkpoint keys, using the names the
    target model has (the local spec's ``input_layernorm`` / ``pre_mlp_layernorm`` or TE's fused names)."""
    module_keys = set(module_keys)
    aliases = {INPUT_NORM[0]: INPUT_NORM, MLP_NORM[0]: MLP_NORM}
    out: dict[str, Tensor] = {}
    for key, t in stacked.items():
        if not key.startswith(_LAYER):
            out[key] = t
            continue
        for i in range(num_layers):
            for candidate in aliases.get(key, (key,)):
                name = f"decoder.layers.{i}." + candidate[len(_LAYER):]
                if name in module_keys:
                    out[name] = t[i]
                    break
            else:
                raise ValueError(f"{source}: the Megatron model has no parameter for {key!r} (layer {i})")
    return out


# ------------------------------------------------------------------------------------------------------------
# Megatron -> HF

def find_tokenizer(recipe_data: dict | None) -> Path | None:
    """The tokenizer.json a run used, when it can be found without building anything: ``data.tokenizer``, the
    tokenizer beside the training shards, or the one cached for the builtin corpus (same seq_length/vocab)."""
    data = (recipe_data or {}).get("data") or {}
    if data.get("tokenizer"):
        path = Path(data["tokenizer"]).expanduser()
        return path if path.is_file() else None
    shards = data.get("train_shards")
    if not shards:
        return None
    if shards.startswith("builtin:"):
        model = recipe_data.get("model") or {}
        cache = Path(data.get("cache_dir") or "~/.cache/ssa_megatron").expanduser()
        found = sorted(cache.glob(f"stdlib-*-s{model.get('seq_length')}-v{model.get('vocab_size')}-*/tokenizer.json"),
                       key=lambda p: p.stat().st_mtime)
        return found[-1] if found else None
    try:
        from ssa_megatron.data.shards import resolve_shards

        first = resolve_shards(shards)[0][0]
        candidate = Path(first.path).parent / "tokenizer.json"
        return candidate if candidate.is_file() else None
    except Exception:  # shards moved or unreadable: conversion does not need them
        return None


def megatron_checkpoint_to_hf(path: str | Path, out_dir: str | Path, *, dtype: str | None = None,
                              tokenizer: str | Path | None = None, recipe: RecipeConfig | None = None,
                              plain_llama: bool | None = None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                              **config_overrides) -> Path:
    """Writes ``out_dir`` (config.json, safetensors, tokenizer files when known, and for ``ssa_llama`` the remote
    code) from a Megatron checkpoint; :mod:`ssa_megatron.hf.export` says what the folder holds.

    Args:
        path: run directory, checkpoint directory or one checkpoint.
        dtype: 'fp32' | 'bf16' | 'fp16' to cast the weights (default: as stored).
        tokenizer: a tokenizer.json to ship (default: the run's, when :func:`find_tokenizer` finds it).
        recipe: the recipe to read the model shape from (default: the one stored with the checkpoint).
        plain_llama: write a plain ``LlamaForCausalLM`` (default: when the model has no gate, ``ssa.gate='none'``).
        max_shard_size: largest safetensors file (bytes or e.g. ``"5GB"``); larger models are sharded.
        config_overrides: further ``SSALlamaConfig`` fields (e.g. ``ssa_mode='full'``, ``ssa_top_k=32``).
    """
    from ssa_megatron.training.checkpoint import read_checkpoint_recipe, read_model_tensors, resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    recipe_data = None
    if recipe is None:
        recipe, recipe_data = read_checkpoint_recipe(ckpt)
    tensors = read_model_tensors(ckpt)
    config = hf_config_from_recipe(recipe, **config_overrides)
    if recipe_data is not None:
        config.megatron_recipe = recipe_data
    hf = megatron_to_hf_state_dict(tensors, config, source=f"checkpoint {str(ckpt)!r}")
    if dtype is not None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r}: must be one of {', '.join(_DTYPES)}")
        hf = {k: v.to(_DTYPES[dtype]) for k, v in hf.items()}
    config.dtype = next(iter(hf.values())).dtype

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    tok = Path(tokenizer).expanduser() if tokenizer else find_tokenizer(recipe_data or config.megatron_recipe)
    if tokenizer and (tok is None or not tok.is_file()):
        raise ValueError(f"tokenizer {str(tokenizer)!r} does not exist (expected a tokenizer.json file)")
    if tok is not None:
        _write_tokenizer(tok, out, config)
    write_export(out, config, hf, plain_llama=plain_llama, max_shard_size=max_shard_size)
    return out


def _write_tokenizer(tok: Path, out: Path, config: SSALlamaConfig) -> None:
    shutil.copyfile(tok, out / "tokenizer.json")
    try:
        from transformers import PreTrainedTokenizerFast

        from ssa_megatron.data.tokenizer import Tokenizer

        ours = Tokenizer(tok)
        config.eos_token_id = ours.eos_id
        PreTrainedTokenizerFast(tokenizer_file=str(tok), eos_token=ours.eos_token).save_pretrained(out)
    except Exception as err:  # tokenizer.json alone is still useful
        log.warning("tokenizer %s copied, but no tokenizer_config.json written: %s", tok, err)


def hf_model_from_state_dict(hf: dict[str, Tensor], config: SSALlamaConfig):
    """An ``SSALlamaForCausalLM`` (eval mode) holding ``hf``'s tensors, without a random initialisation first."""
    from ssa_megatron.hf.modeling import SSALlamaForCausalLM

    with torch.device("meta"):
        model = SSALlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(hf, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"weights do not match SSALlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    rotary = model.model.rotary_emb  # a non-persistent buffer: recompute it on the CPU, as its __init__ does
    if rotary.rope_type == "default":
        inv_freq, _ = rotary.compute_default_rope_parameters(config)
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, rotary.attention_scaling = ROPE_INIT_FUNCTIONS[rotary.rope_type](config)
    rotary.inv_freq = inv_freq
    rotary.original_inv_freq = inv_freq.clone()
    return model.eval()


# ------------------------------------------------------------------------------------------------------------
# HF -> Megatron

def load_hf_folder(path: str | Path) -> tuple[SSALlamaConfig, dict[str, Tensor]]:
    """The configuration and state dict of an HF folder written by :func:`megatron_checkpoint_to_hf` (or by
    ``save_pretrained`` of an ``SSALlamaForCausalLM``), sharded or not. A plain Llama folder (``model_type:
    llama``, e.g. a gate-less export) reads as an ``SSALlamaConfig`` with ``ssa_gate='none'`` and the default SSA
    budget."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig

    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise ValueError(f"HF folder {str(p)!r} does not exist or has no config.json")
    raw = json.loads((p / "config.json").read_text())
    if raw.get("model_type") == "llama":
        fields = {k: v for k, v in LlamaConfig.from_pretrained(str(p)).to_dict().items()
                  if k not in ("model_type", "architectures", "transformers_version")}
        config = SSALlamaConfig(**fields, ssa_gate="none")
    elif raw.get("model_type") == "ssa_llama":
        config = SSALlamaConfig.from_pretrained(str(p))
    else:
        raise ValueError(f"HF folder {str(p)!r}: config.json has model_type={raw.get('model_type')!r}, expected "
                         "'ssa_llama' or 'llama'")
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise ValueError(f"HF folder {str(p)!r} has no *.safetensors weights")
    state: dict[str, Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return config, state


def rope_scaling_of(config, source: str = "HF config") -> RopeScalingConfig:
    """``model.rope_scaling`` of an HF config's ``rope_parameters``: default RoPE or llama3; any other
    ``rope_type`` is refused in one line (the Megatron model implements these two)."""
    params = config.rope_parameters
    kind = params.get("rope_type", "default")
    if kind == "default":
        return RopeScalingConfig()
    if kind != "llama3":
        raise ValueError(f"{source}: rope_parameters rope_type={kind!r}; the Megatron model implements 'default' and "
                         "'llama3'")
    scaling = RopeScalingConfig(type="llama3", factor=float(params["factor"]),
                                low_freq_factor=float(params["low_freq_factor"]),
                                high_freq_factor=float(params["high_freq_factor"]),
                                original_max_position_embeddings=int(params["original_max_position_embeddings"]))
    scaling.validate(f"{source} rope_parameters")
    return scaling


def recipe_for_hf_config(config: SSALlamaConfig, base: RecipeConfig | None = None,
                         source: str = "HF config") -> RecipeConfig:
    """A recipe whose model matches ``config``: ``base`` (or the stored ``megatron_recipe``, or defaults) with its
    model section checked against the HF shape; a mismatch raises ValueError naming the field."""
    if base is None and config.megatron_recipe:
        from ssa_megatron.training.checkpoint import recipe_from_dict

        base = recipe_from_dict(config.megatron_recipe, f"{source} megatron_recipe")
    shape = dict(num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                 ffn_hidden_size=config.intermediate_size, num_attention_heads=config.num_attention_heads,
                 num_query_groups=config.num_key_value_heads, vocab_size=config.vocab_size,
                 tie_embeddings=bool(config.tie_word_embeddings), norm_epsilon=float(config.rms_norm_eps),
                 rope_theta=float(config.rope_parameters["rope_theta"]),
                 rope_scaling=rope_scaling_of(config, source))
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        raise ValueError(f"{source}: head_dim={config.head_dim} x num_attention_heads={config.num_attention_heads} "
                         f"!= hidden_size={config.hidden_size}; Megatron's recipe derives head_dim from them")
    if base is None:
        recipe = RecipeConfig(name="from_hf", model=ModelConfig(seq_length=config.max_position_embeddings, **shape),
                              ssa=SSAConfig(block_size=config.ssa_block_size, top_k=config.ssa_top_k,
                                            score=config.ssa_score, selection=config.ssa_selection,
                                            normaliser=config.ssa_normaliser, sink_blocks=config.ssa_sink_blocks,
                                            local_blocks=config.ssa_local_blocks, gate=config.ssa_gate,
                                            document_mask=config.ssa_document_mask, inference_mode=config.ssa_mode))
    else:
        for name, value in shape.items():
            if getattr(base.model, name) != value:
                raise ValueError(f"{source} does not match the recipe: model.{name}={getattr(base.model, name)!r} "
                                 f"in the recipe, {value!r} in the HF config")
        if base.ssa.gate != config.ssa_gate:
            raise ValueError(f"{source} does not match the recipe: ssa.gate={base.ssa.gate!r} in the recipe, "
                             f"ssa_gate={config.ssa_gate!r} in the HF config")
        recipe = base
    recipe.model.validate()
    recipe.ssa.validate()
    return recipe


def hf_to_megatron_checkpoint(hf_dir: str | Path, out_dir: str | Path, *, recipe: RecipeConfig | None = None,
                              precision: str | None = None) -> Path:
    """Writes a Megatron torch_dist checkpoint (``out_dir/step_00000000`` + ``latest``) from an HF folder.

    The checkpoint holds the model, the recipe, step 0 and no optimizer state; ``ssa-train <recipe>
    checkpoint.load=<out_dir>`` initialises a run from it. Megatron's parallel state is initialised here (a gloo
    group of world size 1, with the CPU compatibility patches when there is no GPU) unless it already is.
    """
    from megatron.core import parallel_state

    from ssa_megatron.config import to_dict
    from ssa_megatron.megatron.model import build_gpt_model
    from ssa_megatron.training.checkpoint import Checkpointer, load_model_chunks

    config, hf = load_hf_folder(hf_dir)
    source = f"HF folder {str(hf_dir)!r}"
    recipe = recipe_for_hf_config(config, recipe, source)
    stacked = hf_to_megatron_state_dict(hf, config, source)
    if precision is None:
        precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(hf["model.embed_tokens.weight"].dtype, "fp32")
    recipe.train.precision = precision
    if not parallel_state.model_parallel_is_initialized():
        from ssa_megatron.training.parallel import init_single_process

        init_single_process()
    if parallel_state.get_tensor_model_parallel_world_size() * parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError("hf_to_megatron_checkpoint runs on one process (tp = pp = 1); torch_dist checkpoints "
                         "reshard on load, so train with any layout afterwards")
    model = build_gpt_model(recipe)
    module_sd = stacked_to_module_state_dict(stacked, model.state_dict().keys(), recipe.model.num_layers, source)
    extra = {k: v for k, v in model.state_dict().items() if k.endswith("_extra_state")}
    load_model_chunks([model], {"model": {**module_sd, **extra}})
    out = Path(out_dir).expanduser()
    state = {"model": model.sharded_state_dict(), "recipe": to_dict(recipe), "step": 0, "consumed_tokens": 0,
             "layout": {"tp": 1, "pp": 1, "cp": 1, "dp": 1, "vpp": None, "world_size": 1}}
    return Checkpointer(out, keep_last=1).save(0, state, {"recipe": recipe.name, "converted_from": str(hf_dir)})
