"""RMSNorm over the last dim, matching HF DeepseekV3RMSNorm / Qwen2RMSNorm."""

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Torch implementation: weight * (x_fp32 * rsqrt(mean(x_fp32^2) + eps)).to(x.dtype)."""
    input_dtype = x.dtype
    # Statistics in fp32 so bf16/fp16 inputs do not lose the mean of squares.
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    # Cast back before the weight multiply, exactly as HF does (the result then follows type promotion).
    return weight * h.to(input_dtype)


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
