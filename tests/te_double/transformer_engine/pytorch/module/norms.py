"""te.pytorch.LayerNorm / RMSNorm. In TE 2.x these are fusible operations (ops.BasicOperation), not
TransformerEngineBaseModule subclasses, but they too have an `_extra_state` entry (empty without FP8).
Parameters `weight` (+ `bias` for LayerNorm)."""
from __future__ import annotations

from typing import Optional

import torch

from transformer_engine.pytorch.module.base import ExtraStateMixin, constant, device_of, normalize, params_dtype_of


class _Norm(ExtraStateMixin, torch.nn.Module):
    normalization = ""

    def __init__(self, normalized_shape=None, eps: float = 1e-5, sequence_parallel: Optional[bool] = None,
                 params_dtype: Optional[torch.dtype] = None, zero_centered_gamma: bool = False,
                 hidden_size: Optional[int] = None, device=None, dtype: Optional[torch.dtype] = None,
                 sm_margin=0) -> None:
        super().__init__()
        shape = normalized_shape if normalized_shape is not None else hidden_size
        if shape is None or (normalized_shape is not None and hidden_size is not None):
            raise RuntimeError("te_double: give exactly one of normalized_shape and hidden_size")
        self.eps, self.zero_centered_gamma = eps, zero_centered_gamma
        self.sequence_parallel = sequence_parallel
        dtype = params_dtype_of(dtype if dtype is not None else params_dtype)
        dev = device_of(device if device is not None else "cuda")
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.weight = torch.nn.Parameter(torch.empty(shape, dtype=dtype, device=dev))
        constant(0.0 if zero_centered_gamma else 1.0)(self.weight.data)
        if self.normalization == "LayerNorm":
            self.bias = torch.nn.Parameter(torch.zeros(shape, dtype=dtype, device=dev))
        else:
            self.bias = None
        if sequence_parallel is not None:
            for p in (self.weight, self.bias):
                if p is not None:
                    p.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, self.weight, self.bias, self.eps, self.normalization, self.zero_centered_gamma)


class LayerNorm(_Norm):
    normalization = "LayerNorm"


class RMSNorm(_Norm):
    normalization = "RMSNorm"
