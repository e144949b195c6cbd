"""The context-parallel K/V exchange overlaps compute (ssa_megatron/megatron/context_parallel.py), on CPU with 2 gloo
processes: the core attention at CP 2 against one process, and the order in which the exchange and the full
branch's pieces run, forward and backward, also under Megatron's activation recompute.

The split full branch runs on cuDNN only; here ``EXACT_PIECES`` (tests/helpers/pieces.py) stands in for it, inside
the kernels' ``full_attention`` / ``full_attention_diagonal``, while selection and the sparse branch are the
reference's (the kernels' interpreter would be slower and adds nothing to what is tested here).
"""

from types import SimpleNamespace

import pytest
import torch

from helpers.megatron import init_megatron, spawn_gloo
from helpers.pieces import EXACT_PIECES

ORDER_ONE_PASS = ["gather issued", "diag fwd", "gather waited", "prefix fwd"]
ORDER_BACKWARD = ["prefix bwd", "reduce-scatter issued", "diag bwd", "reduce-scatter waited"]


class _Recorder:
    """Wraps the piece kernel and the collectives of ``torch.distributed`` to log when each runs."""

    def __init__(self, monkeypatch_attr):
        import torch.distributed as dist

        from ssa_kernels import full as kfull

        self.log: list[str] = []

        def piece_fwd(q, k, v, causal, scale):
            self.log.append("diag fwd" if causal else "prefix fwd")
            return EXACT_PIECES.forward(q, k, v, causal, scale)

        def piece_bwd(*args):
            self.log.append("diag bwd" if args[7] else "prefix bwd")
            return EXACT_PIECES.backward(*args)

        kernel = kfull.PieceKernel(piece_fwd, piece_bwd)
        monkeypatch_attr(kfull, "_piece_kernel", lambda q: kernel)
        for name, what in (("all_gather_into_tensor", "gather"), ("all_gather", "gather"),
                           ("reduce_scatter_tensor", "reduce-scatter"), ("reduce_scatter", "reduce-scatter")):
            monkeypatch_attr(dist, name, self._logged(getattr(dist, name), what))

    def _logged(self, collective, what):
        log = self.log

        class Work:
            def __init__(self, work):
                self.work = work

            def wait(self):
                log.append(f"{what} waited")
                return self.work.wait()

        def issue(*args, **kwargs):
            assert kwargs.get("async_op"), f"{collective.__name__} was not issued asynchronously"
            log.append(f"{what} issued")
            return Work(collective(*args, **kwargs))

        return issue

    def phases(self) -> list[str]:
        """The log with repeats of one event in a row collapsed (two gathers, two pieces, ...)."""
        out = []
        for e in self.log:
            if not out or out[-1] != e:
                out.append(e)
        self.log.clear()
        return out


def _mixed_backend():
    from ssa_kernels import full as kfull
    from ssa_megatron.ssa import reference as R

    return SimpleNamespace(select_blocks=R.select_blocks, sparse_attention=R.sparse_attention,
                           full_attention=kfull.full_attention, full_attention_diagonal=kfull.full_attention_diagonal)


def _core_attention(ssa):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ssa_megatron.megatron.attention import SSACoreAttention

    cfg = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                            context_parallel_size=2, cp_comm_type="all_gather", hidden_dropout=0.0,
                            attention_dropout=0.0, use_cpu_initialization=True)
    return SSACoreAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self", ssa=ssa)


def _ranks(rank, world_size):
    from megatron.core import tensor_parallel

    from ssa_megatron.config import SSAConfig
    from ssa_megatron.megatron.context_parallel import split_zigzag
    from ssa_megatron.megatron.loss import set_alignment_loss_scale
    from ssa_megatron.megatron.mode import force_mode
    from ssa_megatron.ssa import attention as ssa_attention_module
    from ssa_megatron.ssa import ssa_attention

    patches = []

    def patch(obj, name, value):
        patches.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    init_megatron(cp=2)
    set_alignment_loss_scale(1.0)
    S, b, alpha = 512, 1, 10.0  # C = 128 tokens per chunk: the split path's shortest run
    gen = torch.Generator().manual_seed(7)
    q, k, v, gate, w = (torch.randn(S, b, *shape, generator=gen) for shape in ((4, 16), (2, 16), (2, 16), (4,), (64,)))
    tol = dict(rtol=1e-5, atol=1e-6)
    for mode, recompute in (("full", False), ("sparse", True)):
        ssa = SSAConfig(block_size=16, top_k=3, alpha=alpha, backend="reference")
        leaves = [t.clone().requires_grad_() for t in (q, k, v, gate)]
        out, loss, _ = ssa_attention(*leaves, ssa, mode, True)
        ((out.reshape(S, b, -1) * w).sum() + alpha * loss).backward()
        ref_out, ref_grads = out.reshape(S, b, -1).detach(), [t.grad for t in leaves]

        recorder = _Recorder(patch)
        patch(ssa_attention_module, "get_backend", lambda *_: _mixed_backend())
        try:
            core = _core_attention(ssa)
            core.train()
            local = [split_zigzag(t, 2, rank).clone().requires_grad_() for t in (q, k, v, gate)]
            with force_mode(mode):
                if recompute:  # selective recompute: Megatron checkpoints the core attention (reentrant)
                    out_local = tensor_parallel.checkpoint(lambda *a: core(*a), False, *local)
                else:
                    out_local = core(*local)
                forward = recorder.phases()
                (out_local * split_zigzag(w, 2, rank)).sum().backward()
            backward = recorder.phases()
        finally:
            for obj, name, value in reversed(patches):
                setattr(obj, name, value)
            patches.clear()

        tag = f"rank {rank} mode={mode} recompute={recompute}"
        torch.testing.assert_close(out_local.detach(), split_zigzag(ref_out, 2, rank), msg=tag, **tol)
        for name, t, g in zip("q k v gate".split(), local, ref_grads):
            torch.testing.assert_close(t.grad, split_zigzag(g, 2, rank), msg=f"d{name} {tag}", **tol)
        # Forward: the diagonal pieces run while the gather is in flight, the prefix pieces after it landed.
        assert forward == ORDER_ONE_PASS, f"{tag}: forward {forward}"
        # Backward: the reduce-scatter is issued before the diagonal pieces' backward and waited for after it
        # (a recompute first runs the forward again, inside the backward).
        assert backward == (ORDER_ONE_PASS if recompute else []) + ORDER_BACKWARD, f"{tag}: backward {backward}"


@pytest.mark.slow
def test_exchange_overlaps_and_matches_one_process():
    spawn_gloo(_ranks, 2)


def test_gathered_kv_needs_own_keys_and_positions():
    from ssa_megatron.config import SSAConfig
    from ssa_megatron.ssa import ssa_attention

    q, k = torch.randn(32, 1, 2, 4), torch.randn(32, 1, 1, 4)
    gathered = lambda: (torch.randn(64, 1, 1, 4), torch.randn(64, 1, 1, 4))  # noqa: E731
    cfg = SSAConfig(block_size=16, top_k=1, backend="reference")
    with pytest.raises(ValueError, match="q_positions=None with gathered_kv"):
        ssa_attention(q, k, k, None, cfg, "full", True, gathered_kv=gathered)
    with pytest.raises(ValueError, match="k rows 64 with gathered_kv: must equal q's 32"):
        ssa_attention(q, *gathered(), None, cfg, "full", True, q_positions=torch.arange(32), gathered_kv=gathered)
