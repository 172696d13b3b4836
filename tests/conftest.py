"""Shared fixtures."""
import importlib
import sys
from pathlib import Path

import pytest

NPU_DOUBLE = Path(__file__).resolve().parent / "npu_double"


@pytest.fixture
def npu_double(monkeypatch):
    """Make the torch_npu test double importable for one test; monkeypatch removes it again afterwards."""
    monkeypatch.syspath_prepend(str(NPU_DOUBLE))
    # Record "no torch_npu module" so that teardown deletes whatever the test imports.
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    del sys.modules["torch_npu"]
    module = importlib.import_module("torch_npu")
    assert Path(module.__file__).is_relative_to(NPU_DOUBLE)
    return module
