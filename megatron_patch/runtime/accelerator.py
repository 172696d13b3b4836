"""The one place that decides device and distributed backend.

cpu -> gloo, cuda -> nccl, npu -> hccl. Chosen automatically (npu if torch_npu imports and sees a
device, else cuda if available, else cpu) and overridable with MP_DEVICE=cpu|cuda|npu. Nothing else in
megatron_patch calls torch.cuda / torch.npu directly: it asks the accelerator.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass
from functools import lru_cache

import torch

BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}

# Dense bf16 peak FLOP/s per device (vendor datasheets), used for MFU. Matched by substring of the
# device name; unknown devices report None and MFU is then not printed.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "H20": 148e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "Ascend910B": 313e12,  # 910B2/B3 class; 910B4 is lower
    "Ascend910_93": 376e12,  # Atlas A3
}


@lru_cache(maxsize=None)
def npu_available() -> bool:
    """torch_npu is optional: importing it registers torch.npu. Never imported at module import time."""
    if importlib.util.find_spec("torch_npu") is None:
        return False
    try:
        importlib.import_module("torch_npu")
    except Exception:  # noqa: BLE001 - e.g. ImportError: libhccl.so on a machine without CANN
        return False
    return hasattr(torch, "npu") and torch.npu.is_available()


def detect_device_type() -> str:
    forced = os.environ.get("MP_DEVICE", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            from megatron_patch.errors import UserError

            raise UserError(f"MP_DEVICE={forced!r} is not one of cpu, cuda, npu; unset it or pick one")
        return forced
    if npu_available():
        return "npu"
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


@dataclass
class Accelerator:
    type: str  # "cpu" | "cuda" | "npu"

    @property
    def backend(self) -> str:
        return BACKENDS[self.type]

    @property
    def module(self):
        """torch.cuda / torch.npu; None for cpu."""
        return None if self.type == "cpu" else getattr(torch, self.type)

    def device_count(self) -> int:
        if self.type == "cpu":
            return 1
        return self.module.device_count()

    def current_device(self) -> torch.device:
        if self.type == "cpu":
            return torch.device("cpu")
        return torch.device(self.type, self.module.current_device())

    def set_device(self, local_rank: int) -> None:
        if self.type != "cpu":
            self.module.set_device(local_rank)

    def device_name(self) -> str:
        if self.type == "cpu":
            import platform

            return platform.processor() or platform.machine()
        return self.module.get_device_name(self.module.current_device())

    def synchronize(self) -> None:
        if self.type != "cpu":
            self.module.synchronize()

    # RNG: megatron's tracker saves/restores the "cuda" generator state; on cpu that is the cpu one.
    def get_rng_state(self) -> torch.Tensor:
        return torch.get_rng_state() if self.type == "cpu" else self.module.get_rng_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        if self.type == "cpu":
            torch.set_rng_state(state)
        else:
            self.module.set_rng_state(state)

    def manual_seed(self, seed: int) -> None:
        if self.type == "cpu":
            torch.manual_seed(seed)
        else:
            self.module.manual_seed(seed)

    def memory_stats(self) -> dict:
        """Allocated / peak bytes on the device (process RSS on cpu)."""
        if self.type == "cpu":
            import psutil

            rss = psutil.Process().memory_info().rss
            return {"allocated": rss, "peak": _peak_rss_bytes()}
        return {"allocated": self.module.memory_allocated(), "peak": self.module.max_memory_allocated()}

    def peak_flops(self, dtype: torch.dtype = torch.bfloat16) -> float | None:
        """Datasheet peak for MFU, or MP_PEAK_FLOPS if set. None when unknown (e.g. cpu: the
        benchmarks measure the CPU's GEMM throughput instead)."""
        if os.environ.get("MP_PEAK_FLOPS"):
            return float(os.environ["MP_PEAK_FLOPS"])
        if self.type == "cpu":
            return None
        name = self.device_name().replace(" ", "")
        for key, flops in PEAK_BF16_FLOPS.items():
            if key.replace(" ", "") in name:
                return flops
        return None

    @contextlib.contextmanager
    def stream_context(self):
        yield


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


_ACCELERATOR: Accelerator | None = None


def get_accelerator() -> Accelerator:
    global _ACCELERATOR
    if _ACCELERATOR is None:
        _ACCELERATOR = Accelerator(detect_device_type())
    return _ACCELERATOR


def set_accelerator(device_type: str | None) -> Accelerator:
    global _ACCELERATOR
    if device_type is not None:
        os.environ["MP_DEVICE"] = device_type
    _ACCELERATOR = Accelerator(detect_device_type())
    return _ACCELERATOR
