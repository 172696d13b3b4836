"""SwiGLU on a fused [gate, up] projection: silu(gate) * up."""

import torch
import torch.nn.functional as F


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """Torch implementation. x's last dim is [gate | up] (Megatron's gated linear_fc1 layout)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu_npu(x: torch.Tensor) -> torch.Tensor:
    """Ascend implementation, via torch_npu.npu_swiglu.

    Its docs define swiglu(x) = swish(A) * B with A, B the first and second halves along dim, so the gated
    half is the first one, as here: no reordering needed.
    """
    import torch_npu

    return torch_npu.npu_swiglu(x, dim=-1)
