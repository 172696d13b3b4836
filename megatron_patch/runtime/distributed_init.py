"""Joining the job's process group from torchrun's environment, with the heartbeat started first, and the
exit-status file a launcher reads back (torchrun itself exits 1 whatever its ranks returned). Training and
compare both start this way."""
from __future__ import annotations

import os
from datetime import timedelta

import torch

from megatron_patch.errors import UserError

STATUS_ENV = "MP_EXIT_STATUS_FILE"
STEPS_ENV = "MP_RANK_STEPS_DIR"


def record_exit_code(code: int) -> None:
    """torchrun exits 1 whatever its workers' codes; a launcher that sets MP_EXIT_STATUS_FILE reads the real
    ones back (2 bad input, 3 NaN stop or a rank that crashed/hung) from the lines "RANK CODE" appended here."""
    path = os.environ.get(STATUS_ENV)
    if code and path:
        with open(path, "a") as f:
            f.write(f"{os.environ.get('RANK', '0')} {code}\n")


def record_step(step) -> None:
    """The rank's current step (or "start-up") in DIR/RANK when MP_RANK_STEPS_DIR is set: torchrun's agent
    (training.torchrun_exit) names the step of ranks that died by a signal and could print nothing."""
    directory = os.environ.get(STEPS_ENV)
    if directory:
        try:
            with open(os.path.join(directory, os.environ.get("RANK", "0")), "w") as f:
                f.write(str(step))
        except OSError:
            pass  # the agent's directory is gone: it is ending the job


def recorded_step(directory: str, rank: int) -> str | None:
    try:
        with open(os.path.join(directory, str(rank))) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name}={value!r} is not a number; fix the launcher environment") from None


def init_distributed(acc, timeout_minutes: float | None = None, heartbeat_timeout: float | None = None,
                     on_abort=None):
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); a plain `python` run is
    a world of one. The process group uses the accelerator's backend (gloo / nccl / hccl). With
    `heartbeat_timeout` (and more than one rank) the heartbeat starts on the rendezvous store before the
    process group is made, so a rank that never arrives ends the job within that timeout (runtime.heartbeat).
    Returns (rank, world, the Heartbeat or None)."""
    rank, world, local = (_env_int(name, default) for name, default in
                          (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    if "MASTER_PORT" in os.environ:
        _env_int("MASTER_PORT", 0)
    acc.set_device(local)
    heartbeat = None
    if not torch.distributed.is_initialized():
        minutes = timeout_minutes or float(os.environ.get("MP_DIST_TIMEOUT_MINUTES", "30"))
        timeout = timedelta(minutes=minutes)
        # A world of one needs no rendezvous: an in-memory store opens no port (and leaves the caller's
        # environment alone: in-process runs in one interpreter once leaked MASTER_PORT to later launches).
        store = torch.distributed.HashStore() if world == 1 else None
        if world > 1 and heartbeat_timeout:
            from megatron_patch.runtime.heartbeat import Heartbeat

            store = torch.distributed.PrefixStore("default_pg", _rendezvous_store(rank, world, timeout))
            heartbeat = Heartbeat(store, rank, world, heartbeat_timeout, on_abort=on_abort)
        try:
            torch.distributed.init_process_group(acc.backend, rank=rank, world_size=world, timeout=timeout,
                                                 store=store)
        except BaseException:
            if heartbeat is not None:
                heartbeat.stop()
            raise
    return rank, world, heartbeat


def _rendezvous_store(rank: int, world: int, timeout: timedelta):
    """The store init_process_group's env:// rendezvous makes (torchrun's agent store when it offers one), except
    that rank 0 hosting it does not wait for the others to connect: the heartbeat, not this wait, bounds that."""
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = _env_int("MASTER_PORT", 29500)
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    return torch.distributed.TCPStore(addr, port, world, is_master=rank == 0 and not agent, timeout=timeout,
                                      wait_for_workers=False, multi_tenant=not agent)
