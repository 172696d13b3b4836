"""Portable kernels: each has a plain-torch implementation (CPU/CUDA) and an Ascend one (torch_npu).

    from megatron_patch.runtime import kernels
    rms_norm = kernels.get("rms_norm", x.device.type)

Importing this package never imports torch_npu (it needs the Ascend libraries to import at all); the NPU
implementations import it when called, and get() only picks them when it can be imported.
"""

import importlib
from typing import Callable, Dict, Optional, Tuple

# name -> (module, torch implementation, NPU implementation or None when one body serves every backend)
_KERNELS: Dict[str, Tuple[str, str, Optional[str]]] = {
    "core_attention": ("attention", "core_attention", "core_attention_npu"),
    "attention_lse": ("attention_blocks", "attention_lse", None),
    "attention_lse_backward": ("attention_blocks", "attention_lse_backward", None),
    "rms_norm": ("rms_norm", "rms_norm", "rms_norm_npu"),
    "apply_rope": ("rope", "apply_rope", "apply_rope_npu"),
    "deinterleave": ("rope", "deinterleave", None),
    "swiglu": ("swiglu", "swiglu", "swiglu_npu"),
    "weighted_swiglu": ("swiglu", "weighted_swiglu", "weighted_swiglu_npu"),
    "grouped_matmul": ("moe", "grouped_matmul", "grouped_matmul_npu"),
    "permute": ("moe", "permute", "permute_npu"),
    "unpermute": ("moe", "unpermute", "unpermute_npu"),
    "hadamard_rotate": ("hadamard", "hadamard_rotate", None),
}

NAMES = tuple(_KERNELS)


def npu_available() -> bool:
    """True when torch_npu can be imported (imported here, on demand, never at package import)."""
    from megatron_patch.runtime.optional import importable

    return importable("torch_npu")


def get(name: str, device_type: str) -> Callable:
    """The implementation of kernel `name` for a device type ('cpu', 'cuda', 'npu', or a torch.device).

    'npu' gets the torch_npu implementation when torch_npu imports; everything else gets the torch one.
    """
    try:
        module_name, torch_impl, npu_impl = _KERNELS[name]
    except KeyError:
        raise KeyError(f"unknown kernel {name!r}; known: {', '.join(NAMES)}") from None
    device_type = getattr(device_type, "type", device_type)  # accept a torch.device too
    module = importlib.import_module(f"{__name__}.{module_name}")
    if npu_impl is not None and device_type == "npu" and npu_available():
        return getattr(module, npu_impl)
    return getattr(module, torch_impl)
