"""te.pytorch.Linear: y = x W^T (+ b). Parameters `weight` [out/TP, in] or [out, in/TP] and `bias`
(an empty plain tensor, not a parameter, when bias=False), plus `_extra_state`."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from transformer_engine.pytorch.module import _comm
from transformer_engine.pytorch.module.base import GemmModule, device_of, params_dtype_of


class LinearBase(GemmModule):
    """The set-up Linear and LayerNormLinear share: TP split, weight and bias."""

    def _setup_linear(self, in_features, out_features, *, sequence_parallel, fuse_wgrad_accumulation, tp_group,
                      tp_size, get_rng_state_tracker, rng_tracker_name, init_method, bias, return_bias,
                      params_dtype, parallel_mode, device, ub_name, delay_wgrad_compute, symmetric_ar_type):
        self._setup_gemm(in_features, out_features, parallel_mode=parallel_mode, tp_group=tp_group,
                         tp_size=tp_size, sequence_parallel=sequence_parallel,
                         fuse_wgrad_accumulation=fuse_wgrad_accumulation, bias=bias, return_bias=return_bias,
                         delay_wgrad_compute=delay_wgrad_compute, ub_name=ub_name, rng_tracker_name=rng_tracker_name)
        self.symmetric_ar_type = symmetric_ar_type
        self._gemm_params("", params_dtype_of(params_dtype), device_of(device), init_method, get_rng_state_tracker)

    def _gemm(self, x: torch.Tensor):
        """The GEMM with TE's communication; returns what TE's forward returns."""
        if self.parallel_mode == "column":
            x = _comm.column_input(x, self.tp_group, self.sequence_parallel)
        bias = self.bias if self.use_bias else None
        fused_bias = bias if self.apply_bias and self.parallel_mode != "row" else None
        y = torch.nn.functional.linear(x, self.weight, fused_bias)
        if self.parallel_mode == "row":
            y = _comm.row_output(y, self.tp_group, self.sequence_parallel)
            if self.apply_bias:
                y = y + bias
        return (y, bias) if self.return_bias else y


class Linear(LinearBase):
    def __init__(self, in_features: int, out_features: int, sequence_parallel: bool = False,
                 fuse_wgrad_accumulation: bool = False, tp_group=None, tp_size: int = 1,
                 get_rng_state_tracker: Optional[Callable] = None, rng_tracker_name: Optional[str] = None,
                 init_method: Optional[Callable] = None, bias: bool = True, return_bias: bool = False,
                 params_dtype: Optional[torch.dtype] = None, parallel_mode: Optional[str] = None,
                 parameters_split=None, device="cuda", ub_overlap_ag: bool = False, ub_overlap_rs: bool = False,
                 ub_overlap_rs_dgrad: bool = False, ub_bulk_dgrad: bool = False, ub_bulk_wgrad: bool = False,
                 ub_name: Optional[str] = None, delay_wgrad_compute: bool = False,
                 symmetric_ar_type: Optional[str] = None, save_original_input: bool = False,
                 name: Optional[str] = None) -> None:
        super().__init__()
        if parameters_split is not None:
            raise NotImplementedError("te_double: parameters_split is not emulated")
        self.name = name
        self._setup_linear(in_features, out_features, sequence_parallel=sequence_parallel,
                           fuse_wgrad_accumulation=fuse_wgrad_accumulation, tp_group=tp_group, tp_size=tp_size,
                           get_rng_state_tracker=get_rng_state_tracker, rng_tracker_name=rng_tracker_name,
                           init_method=init_method, bias=bias, return_bias=return_bias, params_dtype=params_dtype,
                           parallel_mode=parallel_mode, device=device, ub_name=ub_name,
                           delay_wgrad_compute=delay_wgrad_compute, symmetric_ar_type=symmetric_ar_type)
        self.save_original_input = save_original_input

    def forward(self, inp: torch.Tensor, is_first_microbatch: Optional[bool] = None, fp8_output: bool = False,
                fp8_grad: bool = False):
        return self._gemm(inp)
