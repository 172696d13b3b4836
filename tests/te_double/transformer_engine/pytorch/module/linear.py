"""te.pytorch.Linear: y = x W^T (+ b). Parameters `weight` [out/TP, in] or [out, in/TP] and `bias`
(an empty plain tensor, not a parameter, when bias=False), plus `_extra_state`."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from transformer_engine.pytorch.module import _comm
from transformer_engine.pytorch.module.base import (TransformerEngineBaseModule, constant, device_of,
                                                    params_dtype_of, set_tp_attributes)

PARALLEL_MODES = (None, "column", "row")


def _divide(n: int, d: int) -> int:
    if n % d:
        raise ValueError(f"te_double: {n} is not divisible by tensor-parallel size {d}")
    return n // d


class LinearBase(TransformerEngineBaseModule):
    """The set-up Linear and LayerNormLinear share: TP split, weight and bias."""

    def _setup_linear(self, in_features, out_features, *, sequence_parallel, fuse_wgrad_accumulation, tp_group,
                      tp_size, get_rng_state_tracker, rng_tracker_name, init_method, bias, return_bias,
                      params_dtype, parallel_mode, device, ub_name, delay_wgrad_compute, symmetric_ar_type):
        if parallel_mode not in PARALLEL_MODES:
            raise ValueError(f"te_double: parallel_mode {parallel_mode!r} not supported")
        if delay_wgrad_compute:
            raise NotImplementedError("te_double: delay_wgrad_compute is not emulated")
        self._set_tp(tp_group, tp_size)
        self.parallel_mode = parallel_mode
        self.in_features = _divide(in_features, self.tp_size) if parallel_mode == "row" else in_features
        self.out_features = _divide(out_features, self.tp_size) if parallel_mode == "column" else out_features
        self.sequence_parallel = self.tp_size > 1 and sequence_parallel
        self.fuse_wgrad_accumulation = fuse_wgrad_accumulation
        self.use_bias, self.return_bias = bias, return_bias
        self.apply_bias = bias and not return_bias
        self.ub_name, self.symmetric_ar_type = ub_name, symmetric_ar_type
        self.rng_tracker_name = rng_tracker_name
        self.save_original_input = False
        dtype, device = params_dtype_of(params_dtype), device_of(device)
        self._new_param("weight", (self.out_features, self.in_features), dtype, device,
                        init_method or (lambda t: None), get_rng_state_tracker, rng_tracker_name)
        if parallel_mode is not None:
            set_tp_attributes(self.weight, 1 if parallel_mode == "row" else 0)
        if bias:
            self._new_param("bias", (self.out_features,), dtype, device, constant(0.0))
            if parallel_mode == "column":
                set_tp_attributes(self.bias, 0)
            elif parallel_mode == "row":
                self.bias.sequence_parallel = self.sequence_parallel
        else:
            self.bias = torch.empty(0, dtype=dtype, device=device)

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
