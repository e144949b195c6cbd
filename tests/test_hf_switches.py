"""A model trained with ``ssa.selection`` / ``ssa.normaliser`` runs with them after export: the HF config carries
them (``ssa_selection``, ``ssa_normaliser``), and both the in-package model and an export folder's copied code
select with them."""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import sys

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError

from helpers.megatron import tiny_recipe
from ssa_megatron.hf import SSALlamaForCausalLM
from ssa_megatron.hf.configuration import SSALlamaConfig, hf_config_from_recipe
from ssa_megatron.hf.export import REMOTE_CODE

SEQ = 320  # 20 blocks of 16: past the first 16-block chunk, where authors_chunked differs from exact


def _config(**ssa) -> SSALlamaConfig:
    recipe = tiny_recipe(seq_length=SEQ, **ssa)
    recipe.ssa.top_k = 16  # above block_size / 2: there authors_chunked keeps fewer blocks than exact
    return hf_config_from_recipe(recipe)


def test_recipe_switches_reach_the_hf_config():
    config = _config(selection="authors_chunked", normaliser="authors")
    assert (config.ssa_selection, config.ssa_normaliser) == ("authors_chunked", "authors")
    assert (config.ssa_config().selection, config.ssa_config().normaliser) == ("authors_chunked", "authors")
    loaded = SSALlamaConfig.from_dict(config.to_dict())
    assert (loaded.ssa_selection, loaded.ssa_normaliser) == ("authors_chunked", "authors")
    assert SSALlamaConfig().ssa_selection == "exact"  # exports written before the switch load as exact
    # huggingface_hub's strict dataclass re-raises validate_architecture's ValueError inside its own error
    with pytest.raises(StrictDataclassClassValidationError, match="ssa_selection='chunked': must be one of 'exact', 'authors_chunked'"):
        SSALlamaConfig(ssa_selection="chunked")


def _exported_modeling(tmp_path):
    """The export folder's remote code imported as its own package (not ``ssa_megatron``: it uses the copy)."""
    folder = tmp_path / "ssa_export_copy"
    folder.mkdir()
    for name, source in REMOTE_CODE.items():
        shutil.copyfile(source, folder / name)
    (folder / "__init__.py").write_text("")
    spec = importlib.util.spec_from_file_location(folder.name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    sys.modules[folder.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules[folder.name])
    try:
        return importlib.import_module(f"{folder.name}.modeling")
    finally:
        for name in [n for n in sys.modules if n == folder.name or n.startswith(folder.name + ".")]:
            del sys.modules[name]


def test_package_and_exported_code_select_with_the_switches(tmp_path):
    exported = _exported_modeling(tmp_path)
    assert not exported.IN_PACKAGE
    config = _config(selection="authors_chunked", normaliser="authors")
    torch.manual_seed(0)
    model = SSALlamaForCausalLM(config).eval()
    copy = exported.SSALlamaForCausalLM(exported.SSALlamaConfig(**config.to_dict())).eval()
    copy.load_state_dict(model.state_dict())
    exact = SSALlamaForCausalLM(_config()).eval()
    exact.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 128, (1, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs, plain = (m(tokens, use_cache=False).logits for m in (model, copy, exact))
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain[:, 256:], ours[:, 256:], atol=1e-4)  # the switch changes the selection
