"""NaN/Inf detection stops the run and names the step, the layer and the quantity."""

import pytest
import torch

from ssa_megatron.training.health import NonFiniteError
from helpers.training import run_training, tiny_test_recipe


def _param(model_chunks, name):
    for chunk in model_chunks:
        for n, p in chunk.named_parameters():
            if n.endswith(name):
                return p
    raise KeyError(name)


def _poison_at(step, name, value=float("nan")):
    def hook(s, model_chunks):
        if s == step:
            with torch.no_grad():
                _param(model_chunks, name).view(-1)[:8] = value
    return hook


@pytest.mark.slow
def test_nan_in_an_mlp_names_step_layer_and_quantity(tmp_path):
    recipe = tiny_test_recipe(tmp_path / "run", "ssa.alpha=0.0")
    with pytest.raises(NonFiniteError) as err:
        run_training(recipe, step_hook=_poison_at(2, "decoder.layers.1.mlp.linear_fc1.weight"))
    e = err.value
    assert (e.step, e.layer, e.quantity) == (3, 1, "LM loss")
    assert "step 3" in str(e) and "layer 1" in str(e) and "LM loss" in str(e) and "mlp" in str(e)


@pytest.mark.slow
def test_nan_in_attention_names_the_alignment_loss_of_that_layer(tmp_path):
    recipe = tiny_test_recipe(tmp_path / "run", "ssa.alpha=10.0")
    with pytest.raises(NonFiniteError) as err:
        run_training(recipe, step_hook=_poison_at(1, "decoder.layers.0.self_attention.linear_qkv.weight"))
    e = err.value
    assert (e.step, e.layer, e.quantity) == (2, 0, "alignment loss")
    assert "step 2: alignment loss is nan (layer 0" in str(e)


@pytest.mark.slow
def test_infinite_gradient_names_the_parameter(tmp_path):
    def hook(s, model_chunks):
        if s == 1:
            _param(model_chunks, "decoder.layers.1.mlp.linear_fc2.weight").register_hook(
                lambda g: g * float("inf"))

    with pytest.raises(NonFiniteError) as err:
        run_training(tiny_test_recipe(tmp_path / "run"), step_hook=hook)
    e = err.value
    assert (e.step, e.layer, e.quantity) == (2, 1, "gradient norm")
    assert "mlp.linear_fc2.weight" in str(e)
    # The failed step wrote no checkpoint: the run can be resumed from the last good one.
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()
