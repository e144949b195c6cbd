"""train.fused_ops on a GPU: the compiled RoPE is Megatron's eager RoPE, forward and backward."""

import pytest
import torch

from helpers.numerics import rel_err

pytestmark = pytest.mark.gpu


def test_compiled_rope_matches_eager():
    from megatron.core.models.common.embeddings import rope_utils

    from ssa_megatron.megatron.rope import compiled_rope

    eager = rope_utils._apply_rotary_pos_emb_bshd
    s, b, h, d = 1024, 2, 8, 64
    t = torch.randn(s, b, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    pos = torch.randint(0, 4096, (s, b), device="cuda")  # per-document positions, as SSAGPTModel passes them
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    angles = pos.float()[..., None] * inv
    freqs = torch.cat([angles, angles], -1).unsqueeze(2)  # [s, b, 1, d]
    dy = torch.randn_like(t)
    # float64 truth; eager bf16 rounds after every op, the compiled kernel once, so compare both to the truth
    td = t.detach().double().requires_grad_()
    truth = eager(td, freqs.double())
    (truth_grad,) = torch.autograd.grad((truth * dy.double()).sum(), td)
    want = eager(t, freqs)
    (want_grad,) = torch.autograd.grad((want * dy).sum(), t)
    with compiled_rope():
        got = rope_utils._apply_rotary_pos_emb_bshd(t, freqs)
        (got_grad,) = torch.autograd.grad((got * dy).sum(), t)
    assert rope_utils._apply_rotary_pos_emb_bshd is eager  # put back after the block
    assert got.dtype == want.dtype and got.shape == want.shape
    for name, compiled, eager_out, ref in (("out", got, want, truth), ("grad", got_grad, want_grad, truth_grad)):
        assert rel_err(compiled, ref) < 1e-2, name
        assert rel_err(compiled, ref) <= 1.05 * rel_err(eager_out, ref), name  # not less accurate than eager


@pytest.mark.parametrize("main_dtype", [torch.float32, torch.bfloat16])
def test_wgrad_fusion_accumulates_into_main_grad(main_dtype):
    """The torch GEMM given to Megatron as fused_weight_gradient_mlp_cuda adds grad_output^T @ input to main_grad
    in place, as Apex's kernel does; and the config turns the fusion on with train.fused_ops on a GPU."""
    from megatron.core.tensor_parallel import layers

    from ssa_megatron.megatron import wgrad_fusion

    assert wgrad_fusion.enable() and layers._grad_accum_fusion_available
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 512, device="cuda", dtype=torch.bfloat16, generator=g)
    dy = torch.randn(4096, 768, device="cuda", dtype=torch.bfloat16, generator=g)
    main = torch.randn(768, 512, device="cuda", generator=g).to(main_dtype)
    want = main.double() + dy.double().t() @ x.double()
    kernel = (layers.fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32 if main_dtype == torch.float32
              else layers.fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp16)
    ptr = main.data_ptr()
    kernel(x, dy, main)
    assert main.data_ptr() == ptr and main.dtype == main_dtype
    assert rel_err(main.double(), want) < (1e-5 if main_dtype == torch.float32 else 1e-2)
