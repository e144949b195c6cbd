"""Conversion is layout-independent: a checkpoint saved by four gloo processes under TP=2 and PP=2 converts to the
same HF weights, bit for bit, as one saved under TP=1 PP=1 from the same model weights (issue 16 item 1).

The TP1 model is built and saved first; the TP2/PP2 model (one pipeline stage per rank pair, each holding half of
every tensor-parallel weight) loads that checkpoint through Megatron's dist-checkpointing, which reshards, and saves
it again with the project's ``Checkpointer``. No pipeline schedule runs: building a stage and saving it needs none.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers.megatron import init_megatron, spawn_gloo, tiny_recipe

TIES = (True, False)  # tied embeddings put a shared copy of the embedding on the last pipeline stage


def _build_and_save(rank, world_size, root):
    from megatron.core import parallel_state

    from ssa_megatron.config import to_dict
    from ssa_megatron.megatron.cpu_compat import cuda_to_cpu
    from ssa_megatron.megatron.model import build_gpt_model
    from ssa_megatron.training.checkpoint import Checkpointer, load_model_chunks

    for tie in TIES:
        # TP1 PP1 (data parallel 4, identical replicas): the reference checkpoint.
        init_megatron(tp=1, pp=1)
        recipe = tiny_recipe(num_layers=4, tp=1, pp=1)
        recipe.model.tie_embeddings = tie
        torch.manual_seed(11 + tie)
        model = build_gpt_model(recipe)
        with torch.no_grad():  # norms away from 1 so a swapped norm would show
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(torch.randn_like(p) * 0.1)
        Checkpointer(root / f"tp1pp1_tied{int(tie)}", keep_last=1, rank=rank).save(
            3, {"model": model.sharded_state_dict(), "recipe": to_dict(recipe), "step": 3})

        # TP2 PP2: this rank's stage and tensor-parallel slice, loaded from the TP1 checkpoint, saved again.
        init_megatron(tp=2, pp=2)
        recipe = tiny_recipe(num_layers=4, tp=2, pp=2)
        recipe.model.tie_embeddings = tie
        torch.manual_seed(99)  # different weights until the load
        # With tied embeddings the last stage's copy is all-reduced from the first stage's after a literal
        # ``.cuda()`` (LanguageModule.setup_embeddings_and_output_layer); on a CPU that move is the identity.
        stage = cuda_to_cpu(build_gpt_model)(recipe, parallel_state.is_pipeline_first_stage(),
                                            parallel_state.is_pipeline_last_stage())
        assert len(stage.decoder.layers) == 2
        assert stage.decoder.layers[0].self_attention.linear_qkv.weight.shape[0] == (4 + 2 * 2) * 16 // 2
        source = Checkpointer(root / f"tp1pp1_tied{int(tie)}", keep_last=1).latest()
        loaded = Checkpointer.load(source, {"model": stage.sharded_state_dict()})
        load_model_chunks([stage], loaded)
        Checkpointer(root / f"tp2pp2_tied{int(tie)}", keep_last=1, rank=rank).save(
            3, {"model": stage.sharded_state_dict(), "recipe": to_dict(recipe), "step": 3})
        parallel_state.destroy_model_parallel()


@pytest.mark.slow
def test_tp2_pp2_checkpoint_converts_like_tp1(tmp_path):
    from ssa_megatron.hf.convert import megatron_checkpoint_to_hf

    spawn_gloo(_build_and_save, 4, tmp_path)
    for tie in TIES:
        exports = {}
        for layout in ("tp1pp1", "tp2pp2"):
            out = megatron_checkpoint_to_hf(tmp_path / f"{layout}_tied{int(tie)}",
                                            tmp_path / f"hf_{layout}_tied{int(tie)}")
            config = json.loads((out / "config.json").read_text())
            recipe = config.pop("megatron_recipe")
            exports[layout] = (load_file(out / "model.safetensors"), config, recipe)
        (w1, c1, r1), (w2, c2, r2) = exports["tp1pp1"], exports["tp2pp2"]
        assert (r1["parallel"]["tensor_parallel"], r1["parallel"]["pipeline_parallel"]) == (1, 1)
        assert (r2["parallel"]["tensor_parallel"], r2["parallel"]["pipeline_parallel"]) == (2, 2)
        assert c1 == c2
        assert sorted(w1) == sorted(w2)
        assert ("lm_head.weight" in w1) == (not tie)
        for name in w1:
            assert w1[name].dtype == w2[name].dtype and torch.equal(w1[name], w2[name]), name
