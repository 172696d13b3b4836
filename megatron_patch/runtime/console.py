"""What a command's process shows its user: one `error:` line per node (not one per rank), megatron's
import-time notes hidden, and a file-size limit as an error line rather than a silent SIGXFSZ kill.
Shared by the `megatron-patch` command and the torchrun entry point (training/pretrain.py)."""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

from megatron_patch.runtime.processes import pid_alive


def quiet_known_warnings() -> None:
    """megatron-core warns at import that TE/Apex are absent (expected: the runtime picks kernels) and
    torch's checkpoint code warns about its own deprecations; neither is actionable for a user."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed.*")
    warnings.filterwarnings("ignore", message=r".*full scope is deprecated.*")
    warnings.filterwarnings("ignore", message=r".*CUDA_DEVICE_MAX_CONNECTIONS.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.c10d_logger")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.checkpoint.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"megatron\.core\.dist_checkpointing.*")


def file_size_limit_as_error() -> None:
    """Past `ulimit -f` the kernel kills the writer with SIGXFSZ (no message, a half-written file); ignored,
    the write fails with EFBIG instead, which the output code turns into one `error:` line."""
    import signal

    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def print_once_per_node(line: str) -> None:
    """Bad input fails every rank the same way: under torchrun, the first local rank to reach a line prints it
    and the others, finding its claim file (named after the agent's pid and the line), stay silent; a line
    that differs between ranks is printed by each. Claims of agents that are gone are removed here."""
    if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1 and "TORCHELASTIC_RUN_ID" in os.environ:
        scratch = Path(tempfile.gettempdir())
        for stale in scratch.glob(f"{ERROR_CLAIM}*-*"):
            pid = stale.name[len(ERROR_CLAIM):].split("-", 1)[0]
            if pid.isdigit() and not pid_alive(int(pid)):
                stale.unlink(missing_ok=True)
        digest = hashlib.sha1(line.encode()).hexdigest()[:16]
        try:
            os.close(os.open(scratch / f"{ERROR_CLAIM}{os.getppid()}-{digest}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        except OSError:
            pass  # no claim possible: print it
    print(line, file=sys.stderr, flush=True)


ERROR_CLAIM = "mp-error-"
