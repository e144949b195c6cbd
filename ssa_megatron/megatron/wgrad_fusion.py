"""Megatron's gradient-accumulation fusion without Apex: each weight-gradient GEMM accumulates into the fp32
``main_grad`` directly.

Without it every linear layer's backward writes a bf16 weight gradient, and Megatron DDP's hook then adds it to
the fp32 ``main_grad``: one more read and write of every weight per micro-batch (28 ms of a 675 ms ssa_1b step on
an H200: the ``CUDAFunctor_add`` kernels of docs/benchmarks.md, "Session 6"). Megatron fuses the two with Apex's
``fused_weight_gradient_mlp_cuda`` (a cuBLAS GEMM with beta = 1 into ``main_grad``). On CUDA, ``torch.addmm`` with
``out_dtype=float32`` is that GEMM (bf16 inputs, fp32 accumulation and output), so :func:`enable` gives
``megatron.core.tensor_parallel.layers`` the module's two functions when Apex is absent.
"""

from __future__ import annotations

import torch
from torch import Tensor


class TorchWgradGemm:
    """``fused_weight_gradient_mlp_cuda``'s interface: ``main_grad += grad_output^T @ total_input`` (2-D inputs,
    ``[tokens, out]`` and ``[tokens, in]``), in place."""

    @staticmethod
    def wgrad_gemm_accum_fp32(total_input: Tensor, grad_output: Tensor, main_grad: Tensor) -> None:
        torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=torch.float32, out=main_grad)

    @staticmethod
    def wgrad_gemm_accum_fp16(total_input: Tensor, grad_output: Tensor, main_grad: Tensor) -> None:
        main_grad.addmm_(grad_output.t(), total_input)


def enable() -> bool:
    """Makes Megatron's ``gradient_accumulation_fusion`` usable: Apex's kernels when installed, else
    :class:`TorchWgradGemm` on CUDA. Returns whether the fusion is available (never on CPU)."""
    from megatron.core.tensor_parallel import layers

    if layers._grad_accum_fusion_available:
        return True
    if not torch.cuda.is_available():
        return False
    layers.fused_weight_gradient_mlp_cuda = TorchWgradGemm
    layers._grad_accum_fusion_available = True
    return True
