"""Loading optimizer state into the torch AdamW that Megatron 0.19.2 falls back to without Apex/TE."""

import pytest
import torch

from ssa_megatron.training.checkpoint import torch_adam_step_kept_out_of_param_load


class _DistOptLike:
    """The two pieces of Megatron's DistributedOptimizer the workaround relies on, with its copy semantics:
    every tensor of the parameter's optimizer state is overwritten from ``tensors`` (KeyError when one is missing)."""

    def __init__(self):
        self.param = torch.nn.Parameter(torch.zeros(3))
        self.optimizer = torch.optim.AdamW([self.param])
        self.optimizer.state[self.param] = {"step": torch.tensor(7.0), "exp_avg": torch.zeros(3),
                                            "exp_avg_sq": torch.zeros(3)}
        self.model_param_group_index_map = {"model_param": (0, 0)}

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main = self.optimizer.param_groups[group_index]["params"][group_order]
        dst = {"param": main, **{k: v for k, v in self.optimizer.state[main].items() if isinstance(v, torch.Tensor)}}
        for key in dst:
            dst[key].data.copy_(tensors[key])


def test_param_state_load_skips_and_keeps_the_adam_step():
    opt = _DistOptLike()
    saved = {"param": torch.ones(3), "exp_avg": torch.full((3,), 2.0), "exp_avg_sq": torch.full((3,), 3.0)}
    with pytest.raises(KeyError, match="step"):  # Megatron's own load: the saved state has no 'step'
        opt._set_main_param_and_optimizer_states("model_param", saved)
    with torch_adam_step_kept_out_of_param_load(opt):
        opt._set_main_param_and_optimizer_states("model_param", saved)
    state = opt.optimizer.state[opt.param]
    assert torch.equal(opt.param.data, torch.ones(3)) and torch.equal(state["exp_avg_sq"], torch.full((3,), 3.0))
    assert float(state["step"]) == 7.0  # restored from the param groups by Megatron, untouched here
    assert "_set_main_param_and_optimizer_states" not in vars(opt)  # the class's method is back


def test_the_megatron_method_the_workaround_replaces_is_still_there():
    """``torch_adam_step_kept_out_of_param_load`` wraps DistributedOptimizer's private
    ``_set_main_param_and_optimizer_states(model_param, tensors)`` (no public hook exists for the per-parameter
    copy); this fails when megatron-core renames it or changes its arguments."""
    import inspect

    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    method = DistributedOptimizer._set_main_param_and_optimizer_states
    assert list(inspect.signature(method).parameters) == ["self", "model_param", "tensors"]
