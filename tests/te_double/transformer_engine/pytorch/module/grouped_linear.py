"""te.pytorch.GroupedLinear: one GEMM per group of rows (MoE experts). Parameters `weight0..weight{n-1}`
(and `bias0..` when bias=True), plus one `_extra_state` for the whole module."""
from __future__ import annotations

from typing import Callable, List, Optional

import torch

from transformer_engine.pytorch.module import _comm
from transformer_engine.pytorch.module.base import GemmModule, device_of, params_dtype_of


class GroupedLinear(GemmModule):
    def __init__(self, num_gemms: int, in_features: int, out_features: int, sequence_parallel: bool = False,
                 fuse_wgrad_accumulation: bool = False, tp_group=None, tp_size: int = 1,
                 get_rng_state_tracker: Optional[Callable] = None, rng_tracker_name: Optional[str] = None,
                 init_method: Optional[Callable] = None, bias: bool = True, return_bias: bool = False,
                 params_dtype: Optional[torch.dtype] = None, parallel_mode: Optional[str] = None, device="cuda",
                 ub_overlap_rs: bool = False, ub_overlap_ag: bool = False, ub_name: Optional[str] = None,
                 delay_wgrad_compute: bool = False, save_original_input: bool = False) -> None:
        super().__init__()
        self._setup_gemm(in_features, out_features, parallel_mode=parallel_mode, tp_group=tp_group,
                         tp_size=tp_size, sequence_parallel=sequence_parallel,
                         fuse_wgrad_accumulation=fuse_wgrad_accumulation, bias=bias, return_bias=return_bias,
                         delay_wgrad_compute=delay_wgrad_compute, ub_name=ub_name, rng_tracker_name=rng_tracker_name)
        self.num_gemms, self.save_original_input = num_gemms, save_original_input
        for i in range(num_gemms):
            self._gemm_params(str(i), params_dtype_of(params_dtype), device_of(device), init_method,
                              get_rng_state_tracker)

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
