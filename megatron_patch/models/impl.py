"""Megatron-LM's `--transformer-impl`, shared by `train` and `compare`: which megatron-core layer spec the
model is built with. `auto` (ours, the default) is Megatron-LM's choice where it can be made: the
Transformer Engine spec on CUDA with `transformer_engine` importable, else (CPU, NPU, no TE) the local
spec with the portable modules (models/spec.py). An explicit `transformer_engine` builds the TE spec on any
device where TE imports (on CPU that is the test double, tests/te_double)."""
from __future__ import annotations

import argparse

from megatron_patch.errors import UserError

TE = "transformer_engine"
LOCAL = "local"
IMPLS = (TE, LOCAL)
AUTO = "auto"
CHOICES = (AUTO, TE, LOCAL)


def add_impl_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--transformer-impl", choices=CHOICES, default=AUTO,
                   help="megatron-core layer spec: transformer_engine (Megatron-LM's default) or local; auto: "
                        "transformer_engine on CUDA when it imports, else local (CPU, NPU)")


def te_importable() -> bool:
    from megatron_patch.runtime.optional import importable

    return importable("transformer_engine")


def check_impl(choice: str) -> None:
    """Refuse an explicit transformer_engine where TE does not import (before any rank starts)."""
    if choice == TE and not te_importable():
        raise UserError("--transformer-impl transformer_engine: transformer_engine is not importable here; "
                        "install Transformer Engine or pass --transformer-impl local")


def resolve_impl(choice: str, device_type: str) -> str:
    """transformer_engine or local for a choice on a device type ("cuda", "cpu", "npu")."""
    if choice == AUTO:
        return TE if device_type == "cuda" and te_importable() else LOCAL
    if choice not in (TE, LOCAL):
        raise UserError(f"unknown --transformer-impl {choice!r}; choose one of {', '.join(CHOICES)}")
    check_impl(choice)
    return choice
