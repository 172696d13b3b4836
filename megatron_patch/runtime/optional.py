"""Optional packages (torch_npu, transformer_engine): imported on demand, never at package import."""
from __future__ import annotations

import importlib


def importable(module: str) -> bool:
    """True when `module` imports (installed and loadable: a broken install counts as absent)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
