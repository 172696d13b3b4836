"""Dtypes by their command-line names, and tensors as bytes (sizes, raw views, bit-for-bit equality)."""
from __future__ import annotations

import torch

from megatron_patch.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RELEASE_BYTES = 128 * 1024**2  # unmap the input after about this many bytes read (bounds the resident set)


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype).replace("torch.", ""))


def dtype_overrides(dtype: torch.dtype) -> dict:
    """TransformerConfig fields for building a model in dtype."""
    return {"params_dtype": dtype, "bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def raw_bytes(t: torch.Tensor):
    """The bytes of a CPU tensor as a buffer (bf16 has no numpy dtype: view as uint8)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (NaN payloads and -0.0 included), dtype and shape too."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))
