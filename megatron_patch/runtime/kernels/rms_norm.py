"""RMSNorm over the last dim, matching HF DeepseekV3RMSNorm / Qwen2RMSNorm."""

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Torch implementation: weight * (x_fp32 * rsqrt(mean(x_fp32^2) + eps)).to(x.dtype)."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNorm.apply(x, weight, eps)
    return _rms_norm(x, weight, eps)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    input_dtype = x.dtype
    # Statistics in fp32 so bf16/fp16 inputs do not lose the mean of squares.
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    # Cast back before the weight multiply, exactly as HF does (the result then follows type promotion).
    return weight * h.to(input_dtype)


class _RMSNorm(torch.autograd.Function):
    """The forward above (same ops, same bits) with the closed-form backward, n = x * r:
    dx = r * (g*w - n * mean(g*w * n)), dw = sum(g * n). Autograd's chain through pow/mean/rsqrt makes ~10
    passes over the activations, several of them broadcasting along the innermost dim (unvectorised on CPU);
    this makes ~5. The gradients differ from autograd's by rounding only."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        h = x.to(torch.float32)
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        normed = h * rstd
        ctx.save_for_backward(normed, rstd, weight)
        ctx.input_dtype = x.dtype
        return weight * normed.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        normed, rstd, weight = ctx.saved_tensors
        grad_weight = grad_x = None
        if ctx.needs_input_grad[1]:
            rows = grad * normed.to(ctx.input_dtype)
            grad_weight = rows.reshape(-1, rows.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            grad_normed = (grad * weight).to(torch.float32)
            dot = (grad_normed * normed).mean(-1, keepdim=True)
            grad_x = ((grad_normed - normed * dot) * rstd).to(ctx.input_dtype)
        return grad_x, grad_weight, None


def rms_norm_npu(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Ascend implementation, via torch_npu.npu_rms_norm (returns (y, rstd); rstd is for the backward)."""
    import torch_npu

    if weight.dtype == x.dtype:
        # Fused path. In bf16/fp16 the op may round once (after the gamma multiply) where HF rounds twice, so
        # results can differ from the torch path by one ulp of the input dtype; in fp32 they agree.
        return torch_npu.npu_rms_norm(x, weight, epsilon=eps)[0]
    # The op needs gamma in x's dtype. Rather than round the weight (e.g. fp32 weight, bf16 activations),
    # normalise with a unit gamma and apply the weight afterwards, which is exactly HF's computation.
    normed = torch_npu.npu_rms_norm(x, torch.ones_like(weight, dtype=x.dtype), epsilon=eps)[0]
    return weight * normed
