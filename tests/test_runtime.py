"""Runtime shim: patch registry semantics, import without side effects, env-check, rank harness failures."""
import json
import os
import subprocess
import sys
import time
import types

import pytest
import torch

from megatron_patch.runtime.patching import MISSING, Patch, PatchRegistry
from megatron_patch.runtime.multirank import RankFailure, run_ranks

PY = sys.executable


@pytest.fixture
def fake_megatron_modules(monkeypatch):
    """megatron.fake_src defines f; megatron.fake_user did `from megatron.fake_src import f`."""
    src = types.ModuleType("megatron.fake_src")
    src.f = lambda: "original"
    user = types.ModuleType("megatron.fake_user")
    user.f = src.f
    monkeypatch.setitem(sys.modules, "megatron.fake_src", src)
    monkeypatch.setitem(sys.modules, "megatron.fake_user", user)
    return src, user


def _registry(**kwargs):
    reg = PatchRegistry()
    reg.register(Patch("megatron.fake_src.f", lambda orig: (lambda: "patched"), "test", **kwargs))
    return reg


def test_patch_rebinds_from_import_copies_and_removes_them(fake_megatron_modules):
    src, user = fake_megatron_modules
    original = src.f
    reg = _registry(devices=("cpu",))
    reg.apply("cpu")
    assert src.f() == "patched" and user.f() == "patched"
    reg.apply("cpu")  # idempotent: the patch is not wrapped twice
    assert len(reg.patches[0]._applied) == 2
    reg.remove_all()
    assert src.f is original and user.f is original


def test_patch_guards_device_and_version(fake_megatron_modules):
    src, _ = fake_megatron_modules
    assert _registry(devices=("npu",)).apply("cpu") == []
    assert _registry(versions="<0.1").apply("cpu") == []
    assert _registry(needed=lambda: False).apply("cpu") == []
    status = _registry(versions="<0.1").status("cpu")[0]
    assert not status["applies"] and "outside" in status["why"]
    assert src.f() == "original"


def test_patch_can_add_a_missing_attribute(fake_megatron_modules):
    src, _ = fake_megatron_modules
    reg = PatchRegistry()
    reg.register(Patch("megatron.fake_src.absent", lambda orig: orig is MISSING, "test"))
    reg.apply("cpu")
    assert src.absent is True
    reg.remove_all()
    assert not hasattr(src, "absent")


def test_import_has_no_side_effects():
    """Importing megatron_patch (and megatron-core after it) applies no patch and prints nothing of ours."""
    code = (
        "import megatron_patch, megatron_patch.runtime, megatron_patch.runtime.kernels, megatron_patch.cli\n"
        "import megatron.core.tensor_parallel.random as r, megatron.core.transformer.torch_norm as n\n"
        "import sys\n"
        "assert r._set_cuda_rng_state.__module__ == 'megatron.core.tensor_parallel.random'\n"
        "assert n.WrappedTorchNorm.__module__ == 'megatron.core.transformer.torch_norm'\n"
        "assert 'torch_npu' not in sys.modules and 'transformer_engine' not in sys.modules\n"
        "from megatron_patch.runtime import setup\n"
        "setup('cpu'); setup('cpu')\n"
        "assert n.WrappedTorchNorm.__name__ == 'PortableNorm'\n"
    )
    proc = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert "megatron_patch" not in proc.stderr


def test_env_check_json_on_cpu():
    env = {k: v for k, v in os.environ.items() if k != "MP_DEVICE"}
    proc = subprocess.run([PY, "-m", "megatron_patch.cli", "env-check", "--json"], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["device"] == "cpu" and info["backend"] == "gloo"
    assert info["versions"]["megatron-core"]
    assert any(p["target"].endswith("_set_cuda_rng_state") and p["applies"] for p in info["patches"])


def test_env_check_rejects_unknown_device():
    proc = subprocess.run([PY, "-m", "megatron_patch.cli", "env-check"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "MP_DEVICE": "tpu"})
    assert proc.returncode == 2 and "MP_DEVICE" in proc.stderr


def _one_rank_raises(rank, world):
    if rank == 1:
        raise RuntimeError("boom on rank 1")
    torch.distributed.barrier()  # rank 0 waits for a peer that is gone: must not hang the test
    return rank


def _hangs(rank, world):
    time.sleep(600)


def test_one_rank_raising_fails_every_rank_quickly():
    start = time.monotonic()
    with pytest.raises(RankFailure) as info:
        run_ranks(_one_rank_raises, 2, timeout=60)
    assert "boom on rank 1" in str(info.value)
    assert all(code not in (None, 0) for code in info.value.exitcodes)
    assert time.monotonic() - start < 60


def _rank_1_ends_by(rank, world, sig):
    if rank == 1:
        time.sleep(1.5)  # past start-up: its beat says so
        os.kill(os.getpid(), sig)
    torch.distributed.barrier()  # rank 0 waits for it (the process group's timeout is the run's 120 s)


def test_a_stopped_or_killed_rank_is_one_line_within_the_heartbeat_timeout():
    """The parent watches the ranks' heartbeats: a stopped rank fails the run within the heartbeat timeout, not at
    the deadline (nor at the process group's timeout); a killed one at once; either as one line naming it and the
    phase (the peers' tracebacks say only 'peer gone')."""
    import signal

    from megatron_patch.runtime.multirank import _signal_deaths

    start = time.monotonic()
    with pytest.raises(RankFailure) as info:
        run_ranks(_rank_1_ends_by, 2, timeout=120, args=(signal.SIGSTOP,), heartbeat_timeout=3)
    assert info.value.one_line, str(info.value)[-2000:]
    assert str(info.value).splitlines()[0] == "rank 1 stopped responding while running (no heartbeat for 3 s)"
    assert time.monotonic() - start < 60

    class Beats:
        def phase(self, rank):
            return ["during start-up", "while running"][rank]

    assert _signal_deaths([None, 1, 0], Beats()) is None  # a traceback is not one line
    assert _signal_deaths([-9, 1], Beats()) == "rank 0 was killed by SIGKILL during start-up"
    assert _signal_deaths([None, -11], Beats()) == "rank 1 was killed by SIGSEGV while running"


def test_a_rank_stopped_before_its_first_heartbeat_is_told_from_a_slow_one():
    """Before a rank's first beat (its imports) only the stopped process state counts, not slowness."""
    import signal

    from megatron_patch.runtime.multirank import _process_stopped

    proc = subprocess.Popen(["sleep", "30"])
    try:
        assert not _process_stopped(proc.pid)
        proc.send_signal(signal.SIGSTOP)
        for _ in range(100):
            if _process_stopped(proc.pid):
                break
            time.sleep(0.01)
        assert _process_stopped(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def test_hung_ranks_are_killed_at_the_deadline():
    with pytest.raises(RankFailure) as info:
        run_ranks(_hangs, 2, timeout=15)
    assert "timed out" in str(info.value)
    assert all(code not in (None, 0) for code in info.value.exitcodes)
