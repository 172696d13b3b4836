"""Runtime shim: one call makes megatron-core run on CPU (gloo), CUDA (nccl) or Ascend NPU (hccl).

    from megatron_patch.runtime import setup
    acc = setup()            # or setup(device="cpu"); MP_DEVICE=cpu|cuda|npu overrides detection

Importing megatron_patch applies nothing; setup() applies the patches for the chosen device once
(calling it again is a no-op), `teardown()` removes them, `patch_status()` lists them.
"""
from __future__ import annotations

from megatron_patch.runtime.accelerator import Accelerator, get_accelerator, set_accelerator
from megatron_patch.runtime.settings import RuntimeSettings, settings_for

_STATE: dict = {"device": None}


def setup(device: str | None = None) -> Accelerator:
    """Pick the accelerator and apply its patches. Idempotent for the same device."""
    acc = set_accelerator(device) if device is not None or _STATE["device"] is None else get_accelerator()
    if _STATE["device"] == acc.type:
        return acc
    if _STATE["device"] is not None:
        teardown()
    from megatron_patch.runtime import adapters, cpu_linear, npu_adapter, routing, static_dispatch  # noqa: F401 - register their patches

    adapters.import_entry_modules()
    adapters.register_torch_proxies(adapters.REGISTRY)
    adapters.REGISTRY.apply(acc.type)
    settings_for(acc.type).apply()
    _STATE["device"] = acc.type
    return acc


def teardown() -> None:
    from megatron_patch.runtime import adapters

    adapters.REGISTRY.remove_all()
    _STATE["device"] = None


def patch_status(device_type: str | None = None) -> list[dict]:
    from megatron_patch.runtime import adapters, cpu_linear, npu_adapter, routing, static_dispatch  # noqa: F401

    device_type = device_type or get_accelerator().type
    adapters.import_entry_modules()
    adapters.register_torch_proxies(adapters.REGISTRY)
    return adapters.REGISTRY.status(device_type)


__all__ = ["setup", "teardown", "patch_status", "get_accelerator", "Accelerator", "RuntimeSettings"]
