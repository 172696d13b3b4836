"""megatron's linear layers on CPU without tensor-parallel communication: one lean autograd Function.

megatron-core's LinearWithGradAccumulationAndAsyncCommunication handles sequence parallelism, the async dgrad
all-reduce, deferred weight gradients and FSDP; with none of them (TP 1, or an expert/replicated linear) it is
x @ W^T forward and, backward, dX = dY W plus the weight gradient added into DDP's main_grad (gradient
accumulation fusion). Here that case is exactly those three GEMMs on oneDNN (kernels/cpu_gemm.py) with megatron's
main_grad protocol (grad_added_to_main_grad, a dummy weight gradient that DDP's hook skips), without the
TorchFunctionMode that routes the Function's matmuls otherwise (adapters.py): fewer Python calls per linear.
Everything else goes to megatron's Function unchanged.
"""
from __future__ import annotations

import functools

import torch

from megatron_patch.runtime.adapters import REGISTRY, PortableWgradAccumulation
from megatron_patch.runtime.kernels import cpu_gemm


@REGISTRY.add("megatron.core.tensor_parallel.layers.linear_with_grad_accumulation_and_async_allreduce",
              "without TP communication a CPU linear is three oneDNN GEMMs: a lean Function instead of megatron's "
              "(which needs a TorchFunctionMode to reach oneDNN)", devices=("cpu",), needed=cpu_gemm.enabled)
def _lean_cpu_linear(original):
    @functools.wraps(original)
    def linear(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
               grad_output_buffer=None, wgrad_deferral_limit=0, async_grad_allreduce=None, tp_group=None):
        if (allreduce_dgrad or sequence_parallel or async_grad_allreduce or grad_output_buffer is not None
                or not cpu_gemm.takes(input) or weight.dtype != torch.float32 or hasattr(weight, "__fsdp_param__")
                or (gradient_accumulation_fusion and getattr(weight, "main_grad", weight).dtype != torch.float32)):
            return original(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
                            grad_output_buffer, wgrad_deferral_limit, async_grad_allreduce, tp_group)
        return _CpuLinear.apply(input, weight, bias, gradient_accumulation_fusion and hasattr(weight, "main_grad"))

    return linear


class _CpuLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, into_main_grad):
        ctx.save_for_backward(input, weight)
        ctx.main_grad = weight.main_grad if into_main_grad else None  # as megatron: the buffer of this forward
        ctx.has_bias = bias is not None
        out = cpu_gemm.times_transposed(input, weight)
        return out if bias is None else out + bias

    @staticmethod
    def backward(ctx, grad):
        input, weight = ctx.saved_tensors
        grad_input = cpu_gemm.mm(grad, weight)
        grad_2d, input_2d = grad.reshape(-1, grad.shape[-1]), input.reshape(-1, input.shape[-1])
        if ctx.main_grad is None:
            grad_weight = cpu_gemm.mm(grad_2d.t(), input_2d)
        else:
            weight.main_grad = ctx.main_grad
            PortableWgradAccumulation.wgrad_gemm_accum_fp32(input_2d, grad_2d, weight.main_grad)
            grad_weight = None
            if hasattr(weight, "grad_added_to_main_grad"):
                # megatron's protocol: DDP's hook sees the flag and skips this placeholder
                make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
                grad_weight = make(weight.main_grad.shape, dtype=input.dtype, device=input.device)
                weight.grad_added_to_main_grad = True
        grad_bias = grad_2d.sum(dim=0) if ctx.has_bias else None
        return grad_input, grad_weight, grad_bias, None
