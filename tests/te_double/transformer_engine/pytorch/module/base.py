"""What every TE 2.x module shares: the `_extra_state` entry (FP8 metadata), parameter set-up and the
tensor-parallel communication TE does inside its linears.

`_extra_state`, as TE 2.x (module/base.py, ops/op.py): without FP8 get_extra_state returns an empty uint8
tensor; set_extra_state ignores None and empty tensors (and the older io.BytesIO form holding None). FP8
state is not emulated: a non-empty one is refused instead of being dropped.
"""
from __future__ import annotations

import io
from typing import Optional

import torch
import torch.distributed as dist


class ExtraStateMixin:
    def get_extra_state(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        if state is None or (isinstance(state, torch.Tensor) and state.numel() == 0):
            return
        if isinstance(state, io.BytesIO):
            state.seek(0)
            if torch.load(state, weights_only=True) is None:
                return
        raise NotImplementedError(f"te_double: FP8 extra state ({type(state).__name__}) is not emulated")


class TransformerEngineBaseModule(ExtraStateMixin, torch.nn.Module):
    """Base of Linear, LayerNormLinear, GroupedLinear, DotProductAttention (TE's own base class)."""

    def __init__(self) -> None:
        super().__init__()
        self.fp8 = False
        self.fp8_calibration = False
        self.fp8_initialized = False
        self.fp8_parameters = False
        self.fp8_meta = {"fp8_checkpoint": False, "fp8_group": None}
        self.tp_group = None
        self.tp_size = 1
        self.sequence_parallel = False
        self.param_init_meta = {}

    def init_fp8_metadata(self, num_gemms: int = 1) -> None:
        self.fp8 = self.fp8_calibration = False
        self.fp8_meta["fp8_checkpoint"] = False
        self.fp8_meta["num_gemms"] = num_gemms

    def set_tensor_parallel_group(self, tp_group) -> None:
        self.tp_group = tp_group

    def _set_tp(self, tp_group, tp_size: int) -> None:
        """TE's rule: the group's size when a group is given, else the tp_size argument."""
        self.tp_size = tp_size if tp_group is None else dist.get_world_size(tp_group)
        self.set_tensor_parallel_group(tp_group)

    def _new_param(self, name: str, shape, dtype, device, init_fn, get_rng_state_tracker=None,
                   rng_tracker_name: Optional[str] = None) -> torch.nn.Parameter:
        param = torch.nn.Parameter(torch.empty(*shape, dtype=dtype, device=device))
        self.register_parameter(name, param)
        with torch.no_grad():
            # On the CPU megatron's "CUDA" RNG tracker is the CPU generator itself: forking it would
            # only warn that the CPU state changed inside the fork. Initial values are not what tests check.
            if get_rng_state_tracker is None or param.device.type == "cpu":
                init_fn(param)
            else:
                with get_rng_state_tracker().fork(*([rng_tracker_name] if rng_tracker_name else [])):
                    init_fn(param)
        return param


PARALLEL_MODES = (None, "column", "row")


def _divide(n: int, d: int) -> int:
    if n % d:
        raise ValueError(f"te_double: {n} is not divisible by tensor-parallel size {d}")
    return n // d


class GemmModule(TransformerEngineBaseModule):
    """What Linear, LayerNormLinear and GroupedLinear share: the TP split of the GEMM and its weight{s}/bias{s}
    parameters (bias=False: an empty plain tensor, as TE), with the attributes megatron reads."""

    def _setup_gemm(self, in_features, out_features, *, parallel_mode, tp_group, tp_size, sequence_parallel,
                    fuse_wgrad_accumulation, bias, return_bias, delay_wgrad_compute, ub_name=None,
                    rng_tracker_name=None) -> None:
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
        self.ub_name, self.rng_tracker_name = ub_name, rng_tracker_name
        self.save_original_input = False

    def _gemm_params(self, suffix: str, dtype, device, init_method, get_rng_state_tracker) -> None:
        """weight{suffix} [out, in] and bias{suffix} [out], TP attributes as TE's reset_parameters sets them."""
        weight = self._new_param(f"weight{suffix}", (self.out_features, self.in_features), dtype, device,
                                 init_method or (lambda t: None), get_rng_state_tracker, self.rng_tracker_name)
        if self.parallel_mode is not None:
            set_tp_attributes(weight, 1 if self.parallel_mode == "row" else 0)
        if not self.use_bias:
            setattr(self, f"bias{suffix}", torch.empty(0, dtype=dtype, device=device))
            return
        bias = self._new_param(f"bias{suffix}", (self.out_features,), dtype, device, constant(0.0))
        if self.parallel_mode == "column":
            set_tp_attributes(bias, 0)
        elif self.parallel_mode == "row":
            bias.sequence_parallel = self.sequence_parallel


def params_dtype_of(params_dtype) -> torch.dtype:
    return torch.get_default_dtype() if params_dtype is None else params_dtype


def device_of(device) -> torch.device:
    """TE defaults to the current CUDA device; without CUDA the double builds on the CPU."""
    if isinstance(device, int):
        device = f"cuda:{device}"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return torch.device("cpu")
    return device


def constant(value: float):
    return lambda t: t.fill_(value)


def set_tp_attributes(param: torch.Tensor, dim: int) -> None:
    """The attributes megatron reads on tensor-parallel parameters (TE sets the same ones)."""
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1


def normalize(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
              normalization: str, zero_centered_gamma: bool) -> torch.Tensor:
    """RMSNorm (statistics in fp32, cast back before the gamma multiply, as HF) or LayerNorm."""
    gamma = weight + 1 if zero_centered_gamma else weight
    if normalization == "RMSNorm":
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return gamma * h.to(x.dtype)
    if normalization == "LayerNorm":
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), gamma, bias, eps)
    raise ValueError(f"te_double: unknown normalization {normalization!r}")
