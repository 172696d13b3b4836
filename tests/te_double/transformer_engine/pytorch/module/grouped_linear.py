"""te.pytorch.GroupedLinear: one GEMM per group of rows (MoE experts). Parameters `weight0..weight{n-1}`
(and `bias0..` when bias=True), plus one `_extra_state` for the whole module."""
from __future__ import annotations

from typing import Callable, List, Optional

import torch

from transformer_engine.pytorch.module import _comm
from transformer_engine.pytorch.module.base import (TransformerEngineBaseModule, constant, device_of,
                                                    params_dtype_of, set_tp_attributes)
from transformer_engine.pytorch.module.linear import PARALLEL_MODES, _divide


class GroupedLinear(TransformerEngineBaseModule):
    def __init__(self, num_gemms: int, in_features: int, out_features: int, sequence_parallel: bool = False,
                 fuse_wgrad_accumulation: bool = False, tp_group=None, tp_size: int = 1,
                 get_rng_state_tracker: Optional[Callable] = None, rng_tracker_name: Optional[str] = None,
                 init_method: Optional[Callable] = None, bias: bool = True, return_bias: bool = False,
                 params_dtype: Optional[torch.dtype] = None, parallel_mode: Optional[str] = None, device="cuda",
                 ub_overlap_rs: bool = False, ub_overlap_ag: bool = False, ub_name: Optional[str] = None,
                 delay_wgrad_compute: bool = False, save_original_input: bool = False) -> None:
        super().__init__()
        if parallel_mode not in PARALLEL_MODES:
            raise ValueError(f"te_double: parallel_mode {parallel_mode!r} not supported")
        if delay_wgrad_compute:
            raise NotImplementedError("te_double: delay_wgrad_compute is not emulated")
        self._set_tp(tp_group, tp_size)
        self.num_gemms, self.parallel_mode = num_gemms, parallel_mode
        self.in_features = _divide(in_features, self.tp_size) if parallel_mode == "row" else in_features
        self.out_features = _divide(out_features, self.tp_size) if parallel_mode == "column" else out_features
        self.sequence_parallel = self.tp_size > 1 and sequence_parallel
        self.fuse_wgrad_accumulation = fuse_wgrad_accumulation
        self.use_bias, self.return_bias = bias, return_bias
        self.apply_bias = bias and not return_bias
        self.ub_name, self.rng_tracker_name = ub_name, rng_tracker_name
        self.save_original_input = save_original_input
        dtype, dev = params_dtype_of(params_dtype), device_of(device)
        for i in range(num_gemms):
            w = self._new_param(f"weight{i}", (self.out_features, self.in_features), dtype, dev,
                                init_method or (lambda t: None), get_rng_state_tracker, rng_tracker_name)
            if parallel_mode is not None:
                set_tp_attributes(w, 1 if parallel_mode == "row" else 0)
            if bias:
                self._new_param(f"bias{i}", (self.out_features,), dtype, dev, constant(0.0))
            else:
                setattr(self, f"bias{i}", torch.empty(0, dtype=dtype, device=dev))

    def forward(self, inp: torch.Tensor, m_splits: List[int], is_first_microbatch: Optional[bool] = None):
        if len(m_splits) != self.num_gemms:
            raise ValueError(f"te_double: {len(m_splits)} splits for {self.num_gemms} GEMMs")
        if self.parallel_mode == "column":
            inp = _comm.column_input(inp, self.tp_group, self.sequence_parallel)
        pieces = torch.split(inp, list(m_splits))
        outs = []
        for i, piece in enumerate(pieces):
            bias = getattr(self, f"bias{i}") if self.apply_bias else None
            outs.append(torch.nn.functional.linear(piece, getattr(self, f"weight{i}"), bias))
        out = torch.cat(outs) if outs else inp.new_empty((0, self.out_features))
        if self.parallel_mode == "row":
            out = _comm.row_output(out, self.tp_group, self.sequence_parallel)
        if self.return_bias:
            return out, [getattr(self, f"bias{i}") for i in range(self.num_gemms)]
        return out
