"""SwiGLU on a fused [gate, up] projection: silu(gate) * up."""

import torch
import torch.nn.functional as F

from megatron_patch.runtime.kernels import cpu_native


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """Torch implementation. x's last dim is [gate | up] (Megatron's gated linear_fc1 layout)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _SwiGLU.apply(x)
    if cpu_native.takes_swiglu(x):
        return cpu_native.swiglu(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up whose backward writes both halves of the gradient into one [..., 2I] tensor, where
    autograd would make two and then concatenate them (a full extra copy). On AVX-512 CPUs one compiled pass each
    way (cpu_native: its exp, within ulps of torch's); elsewhere autograd's own ops, so autograd's bits."""

    @staticmethod
    def forward(ctx, x):
        if cpu_native.takes_swiglu(x):  # one compiled pass; its backward recomputes the sigmoid from x
            ctx.save_for_backward(x)
            return cpu_native.swiglu(x)
        gate, up = x.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(gate, up, act)
        return act * up

    @staticmethod
    def backward(ctx, grad):
        if len(ctx.saved_tensors) == 1:
            return cpu_native.swiglu_backward(grad, *ctx.saved_tensors)[0]
        return _backward(grad, *ctx.saved_tensors)


def _backward(grad, gate, up, act):
    """Autograd's ops for d(silu(gate) * up), both halves written into one tensor."""
    half = gate.shape[-1]
    grad_x = grad.new_empty(*grad.shape[:-1], 2 * half)
    torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_x[..., :half])
    torch.mul(grad, act, out=grad_x[..., half:])
    return grad_x


def weighted_swiglu(x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """(swiglu(x) * probs[..., None]).to(x.dtype): the experts' activation scaled by each token's router probability
    (megatron's unfused order); one compiled pass each way where cpu_native takes it."""
    if cpu_native.takes_swiglu(x, probs):
        return _WeightedSwiGLU.apply(x, probs)
    return (swiglu(x) * probs.unsqueeze(-1)).to(x.dtype)


def weighted_swiglu_npu(x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    return (swiglu_npu(x) * probs.unsqueeze(-1)).to(x.dtype)


class _WeightedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, probs):
        ctx.save_for_backward(x, probs)
        return cpu_native.swiglu(x, probs)

    @staticmethod
    def backward(ctx, grad):
        x, probs = ctx.saved_tensors
        return cpu_native.swiglu_backward(grad, x, probs)


def swiglu_npu(x: torch.Tensor) -> torch.Tensor:
    """Ascend implementation, via torch_npu.npu_swiglu.

    Its docs define swiglu(x) = swish(A) * B with A, B the first and second halves along dim, so the gated
    half is the first one, as here: no reordering needed.
    """
    import torch_npu

    return torch_npu.npu_swiglu(x, dim=-1)
