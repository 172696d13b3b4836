"""Rotary position embedding with rotate_half semantics, and the MLA de-interleave."""

import torch


def _rotate_half(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Torch implementation: t * cos + rotate_half(t) * sin. t: [..., d] (d even); cos/sin broadcast to t."""
    return t * cos + _rotate_half(t) * sin


def apply_rope_npu(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Ascend implementation, via torch_npu.npu_rotary_mul in its default 'half' (= rotate_half) mode."""
    import torch_npu

    # The op takes r1/r2 in the input's dtype (HF's rotary embedding also hands cos/sin over in x's dtype).
    cos, sin = cos.to(t.dtype), sin.to(t.dtype)
    shape = t.shape
    if t.dim() > 4:
        # The op is 4-D only: flatten everything but the head dim into S of a [1, 1, S, D] tensor.
        d = shape[-1]
        out = torch_npu.npu_rotary_mul(t.reshape(1, 1, -1, d), cos.expand(shape).reshape(1, 1, -1, d),
                                       sin.expand(shape).reshape(1, 1, -1, d))
        return out.view(shape)
    # Left-padding with size-1 dims keeps broadcasting unchanged and gives the op its 4-D inputs.
    out = torch_npu.npu_rotary_mul(_to_4d(t), _to_4d(cos), _to_4d(sin))
    return out.view(shape)


def _to_4d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))


def deinterleave(t: torch.Tensor) -> torch.Tensor:
    """MLA/DeepSeek rope layout: pairs (x0, x1), (x2, x3), ... -> [x0, x2, ..., x1, x3, ...].

    After this, apply_rope (rotate_half) rotates each original pair by its frequency; the same for every
    backend, so there is no NPU variant.
    """
    return torch.cat((t[..., 0::2], t[..., 1::2]), dim=-1)
