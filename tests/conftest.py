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


TE_DOUBLE = Path(__file__).resolve().parent / "te_double"


@pytest.fixture
def te_double(monkeypatch):
    """Put the transformer_engine test double on sys.path for one test, so that ranks it spawns
    (multirank.run_ranks copies sys.path) import it. Nothing is imported here: megatron modules this
    process already loaded keep their no-TE view, which is why TE-spec models are built in spawned ranks
    (tests/te_harness.py). Teardown removes the path and any transformer_engine module the test imported."""
    monkeypatch.syspath_prepend(str(TE_DOUBLE))
    before = {name for name in sys.modules if name.split(".")[0] == "transformer_engine"}
    yield TE_DOUBLE
    for name in [n for n in sys.modules if n.split(".")[0] == "transformer_engine" and n not in before]:
        del sys.modules[name]


@pytest.fixture(scope="session")
def te_minis(tmp_path_factory):
    """Tiny random HF models for the TE tests, made once per session: {family: directory}
    (tests/te_harness.py MINI_FAMILIES: DeepSeek-V3 with MTP, Qwen3-MoE)."""
    from te_harness import make_minis

    return make_minis(tmp_path_factory.mktemp("te-minis"))


@pytest.fixture
def torch_ops_only(monkeypatch):
    """cpu_native's compiled kernels off (MP_CPU_NATIVE=torch): for tests of torch's own ops and their bits."""
    from megatron_patch.runtime.kernels import cpu_native

    monkeypatch.setenv(cpu_native.ENV, "torch")
    cpu_native._library.cache_clear()
    yield
    cpu_native._library.cache_clear()


@pytest.fixture
def one_thread():
    """This process on one thread, where cpu_native's GEMM runs (it is single-threaded)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# `make test` runs the files on two pytest-xdist workers, one file per worker at a time (--dist loadfile), in
# collection order. These files take the longest (measured: about 1-4 minutes each on a 2-core box); started
# first, they leave the short files to fill in at the end instead of one long file running alone.
LONGEST_FIRST = ("test_training.py", "test_lora_experts.py", "test_context_parallel.py", "test_te_build.py",
                 "test_sft_lora.py", "test_compare.py", "test_seed_commands.py", "test_parallel_layouts.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: tests keep their order in a file
