"""What an exported HF folder holds, so that it loads with stock transformers and no ``ssa_megatron``.

- ``ssa_gate='none'``: a plain ``LlamaForCausalLM`` (``model_type: llama``). Without the gate SSA's weights are
  exactly Llama's, and Llama's attention is SSA's full mode; sparse mode is not expressible in Llama.
  ``AutoModelForCausalLM.from_pretrained(folder)`` needs no custom code.
- Gated (``ssa_gate='per_head'``): ``ssa_llama`` with ``auto_map`` in config.json and the remote code beside the
  weights: :data:`REMOTE_CODE` lists the package files copied verbatim (``hf/configuration.py``,
  ``hf/modeling.py``, ``hf/decoding.py``, ``hf/decode_triton.py`` and ``ssa/reference.py``, the SSA math);
  ``from_pretrained(folder, trust_remote_code=True)`` loads them with only torch and transformers installed.
  Inside the package (``import ssa_megatron.hf``) the registered classes are used instead and
  ``trust_remote_code`` is not needed.
- Weights: safetensors sharded above ``max_shard_size`` (``model-0000x-of-0000n.safetensors`` plus
  ``model.safetensors.index.json``); one ``model.safetensors`` below it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from torch import Tensor
from transformers import LlamaConfig

from ssa_megatron.hf.configuration import SSALlamaConfig

_PACKAGE = Path(__file__).resolve().parent.parent
REMOTE_CODE = {
    "configuration.py": _PACKAGE / "hf" / "configuration.py",
    "modeling.py": _PACKAGE / "hf" / "modeling.py",
    "decoding.py": _PACKAGE / "hf" / "decoding.py",
    "decode_triton.py": _PACKAGE / "hf" / "decode_triton.py",
    "reference.py": _PACKAGE / "ssa" / "reference.py",
}
"""Export-folder name -> package file. modeling.py imports ``.configuration``, ``.decoding`` and (outside the
package) ``.reference``; decoding.py imports ``.decode_triton`` and, there, ``.reference``; decode_triton.py imports
torch and, inside ``try``, triton; reference.py imports only torch."""
AUTO_MAP = {
    "AutoConfig": "configuration.SSALlamaConfig",
    "AutoModel": "modeling.SSALlamaModel",
    "AutoModelForCausalLM": "modeling.SSALlamaForCausalLM",
}
DEFAULT_MAX_SHARD_SIZE = "5GB"


def plain_llama_config(config: SSALlamaConfig) -> LlamaConfig:
    """The ``LlamaConfig`` of a gate-less SSA model (its full mode); the SSA fields are dropped, the Megatron
    recipe is kept for provenance."""
    if config.ssa_gate != "none":
        raise ValueError(f"ssa_gate={config.ssa_gate!r}: only a model without the gate ('none') is a plain Llama")
    dropped = ("model_type", "architectures", "auto_map", "transformers_version")
    fields = {k: v for k, v in config.to_dict().items() if not k.startswith("ssa_") and k not in dropped}
    return LlamaConfig(**{**fields, "architectures": ["LlamaForCausalLM"]})


def write_export(out: str | Path, config: SSALlamaConfig, state: dict[str, Tensor], *, plain_llama: bool | None = None,
                 max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> str:
    """Writes config.json, the (sharded) safetensors and, for ``ssa_llama``, the remote code into ``out``.

    Args:
        state: the HF state dict (``SSALlamaForCausalLM`` names; no ``lm_head.weight`` when tied).
        plain_llama: export as ``LlamaForCausalLM``; default: when ``config.ssa_gate == 'none'``. False keeps
            ``ssa_llama`` (and sparse mode) for a gate-less model.
        max_shard_size: largest safetensors file, bytes or a string such as ``"5GB"``.

    Returns:
        the model type written: ``'llama'`` or ``'ssa_llama'``.
    """
    from huggingface_hub import save_torch_state_dict

    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    if plain_llama is None:
        plain_llama = config.ssa_gate == "none"
    for stale in (*out.glob("*.safetensors"), out / "model.safetensors.index.json", *map(out.joinpath, REMOTE_CODE)):
        stale.unlink(missing_ok=True)  # a re-export into the same folder must not mix old shards or code
    # A view of part of a storage (the state dict of a model with fused projections holds such views of its stacked
    # weights) is refused by save_torch_state_dict: write a copy of it.
    state = {k: v if v.untyped_storage().nbytes() == v.numel() * v.element_size() else v.clone()
             for k, v in state.items()}
    save_torch_state_dict(state, out, max_shard_size=max_shard_size, metadata={"format": "pt"})
    if plain_llama:
        plain_llama_config(config).save_pretrained(out)
        return "llama"
    for name, source in REMOTE_CODE.items():
        shutil.copyfile(source, out / name)
    config.auto_map = dict(AUTO_MAP)
    config.save_pretrained(out)
    return "ssa_llama"
