"""A stand-in for the `torch` module inside megatron-core modules that assume CUDA.

megatron-core writes `torch.zeros(..., device="cuda")`, `torch.cuda.current_device()`,
`torch.cuda.Stream()` and the like in dozens of places. Rather than copying each function, the
adapter rebinds the global name `torch` in those modules to a proxy that
  * maps device "cuda" to the accelerator's device in tensor factories and autocast, and
  * answers `torch.cuda.*` with a facade over the accelerator (torch.npu on Ascend, no-op streams
    and the CPU generator on CPU).
Everything else is the real torch, so the proxy is invisible to code that does not touch CUDA.
"""
from __future__ import annotations

import contextlib
import functools
import types

import torch

from megatron_patch.runtime.accelerator import get_accelerator

_FACTORIES = (
    "tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
    "zeros_like", "ones_like", "empty_like", "full_like", "as_tensor",
)


def _redirect_device(device):
    if device is None:
        return None
    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    if kind == "cuda":
        return get_accelerator().current_device()
    return device


def _factory(fn):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _redirect_device(kwargs["device"])
            if get_accelerator().type == "cpu":
                kwargs.pop("pin_memory", None)  # pinning needs an accelerator (also for device="cpu")
        return fn(*args, **kwargs)

    return call


class _NullStream:
    """Streams and events on a device without them: everything runs in order already."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def wait(self, *args, **kwargs):
        pass

    def __eq__(self, other):
        return isinstance(other, _NullStream)

    def __hash__(self):
        return 0


class _NullNvtx:
    @staticmethod
    def range_push(*args, **kwargs):
        pass

    @staticmethod
    def range_pop(*args, **kwargs):
        pass

    @staticmethod
    @contextlib.contextmanager
    def range(*args, **kwargs):
        yield


class CudaFacade(types.ModuleType):
    """`torch.cuda` as seen by patched megatron modules: the accelerator behind it."""

    def __init__(self):
        super().__init__("torch.cuda")

    def __getattr__(self, name):
        acc = get_accelerator()
        if acc.type == "cpu":
            if name in _CPU_CUDA:
                return _CPU_CUDA[name]
            return getattr(torch.cuda, name)
        return getattr(acc.module, name, None) or getattr(torch.cuda, name)


def _cpu_stream_ctx(*args, **kwargs):
    return contextlib.nullcontext()


_CPU_CUDA = {
    "current_device": lambda: get_accelerator().current_device(),
    "device_count": lambda: 1,
    "is_available": lambda: False,
    "synchronize": lambda *a, **k: None,
    "empty_cache": lambda: None,
    "Stream": _NullStream,
    "Event": _NullStream,
    "current_stream": lambda *a, **k: _NullStream(),
    "default_stream": lambda *a, **k: _NullStream(),
    "stream": _cpu_stream_ctx,
    "nvtx": _NullNvtx,
    "get_rng_state": lambda *a, **k: torch.get_rng_state(),
    "set_rng_state": lambda state, *a, **k: torch.set_rng_state(state),
    "manual_seed": lambda seed: torch.manual_seed(seed),
    "manual_seed_all": lambda seed: torch.manual_seed(seed),
    "default_generators": (torch.default_generator,),
    "memory_allocated": lambda *a, **k: get_accelerator().memory_stats()["allocated"],
    "max_memory_allocated": lambda *a, **k: get_accelerator().memory_stats()["peak"],
    "memory_reserved": lambda *a, **k: get_accelerator().memory_stats()["allocated"],
    "max_memory_reserved": lambda *a, **k: get_accelerator().memory_stats()["peak"],
    "reset_peak_memory_stats": lambda *a, **k: None,
    "get_device_name": lambda *a, **k: get_accelerator().device_name(),
    "get_device_capability": lambda *a, **k: (0, 0),
}


class TorchProxy(types.ModuleType):
    def __init__(self):
        super().__init__("torch")
        self.cuda = CudaFacade()
        for name in _FACTORIES:
            setattr(self, name, _factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def autocast(device_type="cuda", *args, **kwargs):
        return torch.autocast(_redirect_device(device_type).type if device_type == "cuda" else device_type,
                              *args, **kwargs)


TORCH_PROXY = TorchProxy()
