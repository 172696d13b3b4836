"""Run a function on N ranks of a local process group (gloo on CPU), with a hard timeout.

    results = run_ranks(my_fn, world_size=4, timeout=120, args=(...,))

`my_fn(rank, world_size, *args)` must be importable (module level). Each rank is a spawned process with
torch.distributed initialised and the runtime set up. If any rank raises, or the deadline passes, the
remaining ranks are killed and RankFailure carries the first traceback, so a hang or a crash fails the
test instead of stalling CI. Returns the list of per-rank return values (via torch.save files).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path


class RankFailure(RuntimeError):
    """`one_line`: a rank was killed by a signal or stopped responding; the message says which, and the other
    ranks' tracebacks (a peer gone) would only hide it."""

    def __init__(self, message: str, exitcodes: list[int | None], one_line: bool = False):
        super().__init__(message)
        self.exitcodes = exitcodes
        self.one_line = one_line


def in_torchrun() -> bool:
    """Launched by torchrun (or already in a process group): the ranks exist, none are to be spawned."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() or ("WORLD_SIZE" in os.environ and "RANK" in os.environ)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_checkpoint_workers() -> None:
    """megatron's dist_checkpointing writer keeps a multiprocessing Manager (a server process) for its
    results queue; a rank that ends with os._exit would leave it running forever, holding the caller's
    stdout. Shut it down."""
    import sys

    filesystem_async = sys.modules.get("megatron.core.dist_checkpointing.strategies.filesystem_async")
    if filesystem_async is None:
        return
    manager = getattr(getattr(filesystem_async, "_results_queue", None), "_manager", None)
    if manager is not None:
        manager.shutdown()
    filesystem_async._results_queue = None


_forked_children_die_with_us: list[int] = []  # [the pid forking], once the hook is installed


def _prctl():
    import ctypes
    import sys

    return ctypes.CDLL(None).prctl if sys.platform.startswith("linux") else None


def _die_with(parent: int, prctl=None) -> None:
    """In a child of a rank (the checkpoint results queue's server, a forked writer): end it (SIGKILL) when the
    rank ends, however it ends. (Linux's parent-death signal follows the forking thread: these are started from
    the main thread.) A forked child gets `prctl` resolved before the fork: no dlopen after forking a process
    with threads."""
    import signal

    prctl = prctl or _prctl()
    if prctl is not None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the rank died before the line above
        os._exit(0)


def start_checkpoint_workers() -> None:
    """megatron's writer starts its results queue's Manager (a server process) at the first save, and forks its
    writer processes at every save; a rank killed by a signal (a dead peer's torchrun SIGTERMs it) leaves them
    running (the server forever), holding the launcher's stdout (whoever reads it waits); one killed while the
    server starts gets a BrokenPipeError traceback. Bind them to this process's life: the server started here,
    every forked child (the writers; multiprocessing's fork, not subprocess) with a parent-death signal."""
    import multiprocessing.managers

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    prctl = _prctl()
    if not _forked_children_die_with_us and prctl is not None:
        _forked_children_die_with_us.append(os.getpid())
        os.register_at_fork(before=lambda: _forked_children_die_with_us.__setitem__(0, os.getpid()),
                            after_in_child=lambda: _die_with(_forked_children_die_with_us[0], prctl))
    manager = multiprocessing.managers.SyncManager(ctx=mp.get_context("spawn"))
    manager.start(_die_with, (os.getpid(),))
    filesystem_async._results_queue = manager.Queue()


def _rank_main(fn, rank, world_size, port, out_dir, args, device, env, timeout, heartbeat_timeout):
    import torch

    os.environ.update(env)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    try:
        from megatron_patch.runtime.heartbeat import Heartbeat

        # the parent hosts the store and watches the beats (a stopped rank is found within heartbeat_timeout; the
        # process group's own timeout is the run's, so it does not fire first)
        store = torch.distributed.TCPStore("127.0.0.1", port, world_size, is_master=False,
                                           timeout=timedelta(seconds=timeout))
        heartbeat = Heartbeat(store, rank, world_size, heartbeat_timeout, watch=False) if heartbeat_timeout else None
        from megatron_patch.runtime import setup

        acc = setup(device)
        acc.set_device(rank)
        torch.distributed.init_process_group(acc.backend, rank=rank, world_size=world_size,
                                             timeout=timedelta(seconds=timeout),
                                             store=torch.distributed.PrefixStore("default_pg", store))
        if heartbeat is not None:
            heartbeat.step = 0  # start-up is over
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:  # noqa: BLE001 - report every failure to the parent, then exit non-zero
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        stop_checkpoint_workers()
        os._exit(1)
    stop_checkpoint_workers()
    try:
        torch.distributed.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass
    os._exit(0)


SCRATCH_PREFIX = "mp-ranks-"


def clean_stale_scratch() -> None:
    """Remove the rank scratch directories of runs whose process is gone (a killed compare cannot)."""
    import shutil

    from megatron_patch.runtime.processes import pid_alive

    for path in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*-*"):
        pid = path.name[len(SCRATCH_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def run_ranks(fn, world_size: int, timeout: float = 180.0, args: tuple = (), device: str = "cpu",
              env: dict | None = None, heartbeat_timeout: float | None = 60.0) -> list:
    import torch

    ctx = mp.get_context("spawn")
    clean_stale_scratch()
    store = torch.distributed.TCPStore("127.0.0.1", 0, world_size + 1, is_master=True, wait_for_workers=False,
                                       timeout=timedelta(seconds=timeout))
    with tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-") as out_dir:
        procs = [ctx.Process(target=_rank_main,
                             args=(fn, r, world_size, store.port, out_dir, args, device, dict(env or {}), timeout,
                                   heartbeat_timeout))
                 for r in range(world_size)]
        # Not daemonic: megatron's checkpoint writer starts a multiprocessing Manager inside a rank.
        # The loop below kills every rank on failure, timeout or interrupt instead.
        for p in procs:
            p.start()
        try:
            return _wait(procs, out_dir, world_size, timeout, _Beats(store, procs, heartbeat_timeout))
        finally:
            for p in procs:
                if p.exitcode is None:
                    p.kill()


class _Beats:
    """The parent's view of the ranks' heartbeats (runtime.heartbeat, beating only): the rank that stopped
    responding, or None. A rank that has not beaten yet is still importing (slow on a loaded machine, not
    stopped) unless its process is in the stopped state (SIGSTOP) that long."""

    def __init__(self, store, procs, timeout: float | None):
        self.store, self.procs, self.timeout = store, procs, timeout
        self.seen = {r: (None, time.monotonic()) for r in range(len(procs))}
        self.next_check = 0.0

    def stopped(self, codes) -> str | None:
        from megatron_patch.runtime.heartbeat import Heartbeat

        now = time.monotonic()
        if not self.timeout or now < self.next_check:
            return None
        self.next_check = now + min(1.0, self.timeout / 5)
        for rank, (last, since) in self.seen.items():
            if codes[rank] is not None:
                continue
            key = Heartbeat._key(rank)
            value = self.store.get(key).decode() if self.store.check([key]) else None
            if value != last or value is None and not _process_stopped(self.procs[rank].pid):
                self.seen[rank] = (value, now)
            elif now - since > self.timeout:
                return f"rank {rank} stopped responding {self.phase(rank)} (no heartbeat for {self.timeout:.0f} s)"
        return None

    def phase(self, rank: int) -> str:
        from megatron_patch.runtime.heartbeat import STARTUP, Heartbeat

        if not self.timeout:  # no beats to tell
            return "(phase unknown: no heartbeat)"
        return "during start-up" if Heartbeat.step_of(self.seen[rank][0]) == STARTUP else "while running"


def _process_stopped(pid: int) -> bool:
    """The process is stopped (SIGSTOP, state T in /proc); False where that cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def _signal_deaths(codes, beats) -> str | None:
    """'rank 1 was killed by SIGKILL while running' for ranks that ended by a signal (before we killed the rest)."""
    from megatron_patch.runtime.processes import signal_name

    dead = [(rank, -code) for rank, code in enumerate(codes) if code is not None and code < 0]
    return "; ".join(f"rank {rank} was killed by {signal_name(sig) or sig} {beats.phase(rank)}" for rank, sig in dead) or None


def _wait(procs, out_dir, world_size, timeout, beats):
    """Poll the ranks; the first non-zero exit, a rank that stopped beating, or the deadline fails the whole run."""
    deadline = time.monotonic() + timeout
    failure, one_line = None, False
    while True:
        codes = [p.exitcode for p in procs]
        if any(c not in (None, 0) for c in codes):
            failure = _signal_deaths(codes, beats)
            one_line = failure is not None
            failure = failure or "a rank failed"
            break
        if all(c == 0 for c in codes):
            break
        stopped = beats.stopped(codes)
        if stopped:
            failure, one_line = stopped, True
            break
        if time.monotonic() > deadline:
            failure = f"timed out after {timeout:.0f} s (a rank hung)"
            break
        time.sleep(0.05)
    if failure:
        for p in procs:
            if p.exitcode is None:
                p.kill()
        for p in procs:
            p.join(5)
        errors = sorted(Path(out_dir).glob("rank*.err"))
        detail = "\n".join(f"--- {e.stem} ---\n{e.read_text()}" for e in errors)
        codes = [p.exitcode for p in procs]
        header = failure if one_line else f"{failure}; exit codes {codes}"  # (one_line: the others we killed)
        raise RankFailure(f"{header}\n{detail}", codes, one_line=one_line)
    for p in procs:
        p.join()
    import torch

    # Our own ranks' return values in our private scratch directory (multiprocessing's pickle transport by
    # another road), not checkpoint input: any picklable result is allowed.
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
