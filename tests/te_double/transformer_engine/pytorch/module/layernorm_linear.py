"""te.pytorch.LayerNormLinear: norm(x) then a (column-parallel) GEMM. Parameters `layer_norm_weight`
(+ `layer_norm_bias` for LayerNorm), `weight`, `bias`, plus `_extra_state`."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from transformer_engine.pytorch.module.base import constant, device_of, normalize, params_dtype_of
from transformer_engine.pytorch.module.linear import LinearBase


class LayerNormLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, eps: float = 1e-5, sequence_parallel: bool = False,
                 fuse_wgrad_accumulation: bool = False, tp_group=None, tp_size: int = 1,
                 get_rng_state_tracker: Optional[Callable] = None, init_method: Optional[Callable] = None,
                 bias: bool = True, normalization: str = "LayerNorm", return_bias: bool = False,
                 params_dtype: Optional[torch.dtype] = None, parallel_mode: Optional[str] = None,
                 return_layernorm_output: bool = False, return_layernorm_output_gathered: bool = False,
                 parameters_split=None, zero_centered_gamma: bool = False, device="cuda",
                 ub_overlap_ag: bool = False, ub_overlap_rs: bool = False, ub_overlap_rs_dgrad: bool = False,
                 ub_bulk_wgrad: bool = False, ub_bulk_dgrad: bool = False, ub_name: Optional[str] = None,
                 delay_wgrad_compute: bool = False, symmetric_ar_type: Optional[str] = None,
                 name: Optional[str] = None) -> None:
        super().__init__()
        if parameters_split is not None or return_layernorm_output or return_layernorm_output_gathered:
            raise NotImplementedError("te_double: parameters_split / return_layernorm_output are not emulated")
        if normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"te_double: unknown normalization {normalization!r}")
        self.name = name
        self.eps, self.normalization, self.zero_centered_gamma = eps, normalization, zero_centered_gamma
        self.return_layernorm_output = False
        dtype, dev = params_dtype_of(params_dtype), device_of(device)
        gamma = constant(0.0 if zero_centered_gamma else 1.0)
        self._new_param("layer_norm_weight", (in_features,), dtype, dev, gamma)
        if normalization == "LayerNorm":
            self._new_param("layer_norm_bias", (in_features,), dtype, dev, constant(0.0))
        else:
            self.layer_norm_bias = None
        self._setup_linear(in_features, out_features, sequence_parallel=sequence_parallel,
                           fuse_wgrad_accumulation=fuse_wgrad_accumulation, tp_group=tp_group, tp_size=tp_size,
                           get_rng_state_tracker=get_rng_state_tracker, rng_tracker_name=None,
                           init_method=init_method, bias=bias, return_bias=return_bias, params_dtype=params_dtype,
                           parallel_mode=parallel_mode, device=device, ub_name=ub_name,
                           delay_wgrad_compute=delay_wgrad_compute, symmetric_ar_type=symmetric_ar_type)
        # Under SP every TP rank normalises its own tokens: megatron sums these gradients over TP.
        for p in (self.layer_norm_weight, self.layer_norm_bias):
            if p is not None:
                p.sequence_parallel = self.sequence_parallel

    def forward(self, inp: torch.Tensor, is_first_microbatch: Optional[bool] = None, fp8_output: bool = False,
                fp8_grad: bool = False):
        normed = normalize(inp, self.layer_norm_weight, self.layer_norm_bias, self.eps, self.normalization,
                           self.zero_centered_gamma)
        return self._gemm(normed)
