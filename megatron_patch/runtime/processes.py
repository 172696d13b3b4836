"""Process liveness, for cleaning up after dead processes (stale temporaries, locks, rank scratch dirs)."""
from __future__ import annotations

import os


def signal_name(number: int) -> str | None:
    """9 -> 'SIGKILL'; None when the number names no signal."""
    import signal

    try:
        return signal.Signals(number).name
    except ValueError:
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
