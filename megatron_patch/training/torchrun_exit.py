"""torchrun's exit code for our jobs: the workers' code, not always 1.

torchrun (torch.distributed.run) re-raises any worker failure as ChildFailedError, so Python exits 1 whatever
the ranks returned. Our documented codes (2 bad input, 3 a NaN stop or a stopped/dead rank) would be lost.
torchrun imports every `torchrun.handlers` entry point at start-up (its rendezvous plugin hook); ours
(pyproject.toml) registers no rendezvous backend, it only installs `map_exit_code` in the agent when the
worker command is megatron-patch's, so `torchrun ... -m megatron_patch.training.pretrain` and
`torchrun ... megatron-patch train` (and examples/*.py under torchrun) end with the ranks' code: 3 when a rank returned 3, else 2 when one
returned 2, else torchrun's 1 when one returned 1 (a traceback, as in one process), else 3 when ranks only died
by signals (a dead rank; the survivors' SIGTERM comes from the agent itself). Its one line gives each failed
rank's last step, which the ranks record in a directory the agent hands them (MP_RANK_STEPS_DIR): a rank ended by
a signal prints nothing itself.
"""
from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path

OUR_COMMANDS = ("megatron_patch", "megatron-patch")
_code: list[int] = []


def exit_code_of(failure_codes) -> int | None:
    """The agent's exit code for its failed ranks' codes (None: leave torchrun's 1). Precedence, not the
    first failure: torchrun's failure timestamps have one-second resolution."""
    codes = set(failure_codes)
    for code in (3, 2):
        if code in codes:
            return code
    if codes and all(code < 0 for code in codes):
        return 3
    return None


def _is_ours(arg: str) -> bool:
    """The worker command names megatron-patch, or is one of this checkout's example scripts."""
    if any(name in arg for name in OUR_COMMANDS):
        return True
    examples = Path(__file__).resolve().parents[2] / "examples"
    return arg.endswith(".py") and Path(arg).resolve().is_relative_to(examples)


def _is_our_agent(argv: list[str]) -> bool:
    launcher = os.path.basename(argv[0]) if argv else ""
    is_agent = launcher == "torchrun" or argv[0].replace(os.sep, "/").endswith("torch/distributed/run.py")
    return is_agent and any(_is_ours(arg) for arg in argv[1:])


def _excepthook(kind, value, tb, previous=sys.excepthook):
    """A mapped failure ends with one line (the ranks printed their `error:` line already) instead of
    torchrun's traceback and failure table; anything else is reported by torchrun as usual."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    code = exit_code_of(f.exitcode for f in value.failures.values()) if isinstance(value, ChildFailedError) else None
    if code is None:
        previous(kind, value, tb)
        return
    ranks = ", ".join(f"rank {rank}: {_describe(f.exitcode)}{_step_of(rank)}" for rank, f in sorted(value.failures.items()))
    print(f"torchrun: the ranks of {value.name} exited ({ranks}); exit code {code}", file=sys.stderr, flush=True)
    _code.append(code)


def _describe(exitcode: int) -> str:
    """-9 -> '-9 (SIGKILL)': which rank died, and how, when no rank got to print its own line."""
    from megatron_patch.runtime.processes import signal_name

    name = signal_name(-exitcode) if exitcode < 0 else None
    return f"{exitcode} ({name})" if name else str(exitcode)


def _step_of(rank: int) -> str:
    """' at step 7' from the step the rank recorded last (runtime.distributed_init.record_step): a rank that died
    by a signal printed nothing, so this line is the only one to say where the job was."""
    from megatron_patch.runtime.distributed_init import STEPS_ENV, recorded_step
    from megatron_patch.runtime.heartbeat import STARTUP

    step = recorded_step(os.environ[STEPS_ENV], rank) if STEPS_ENV in os.environ else None
    return "" if step is None else " during start-up" if step == STARTUP else f" at step {step}"


def _exit_with_mapped_code() -> None:
    """Registered first, so it runs after the agent's own atexit handlers; os._exit is the only way past
    Python's fixed exit status 1 for an uncaught exception."""
    if _code:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_code[0])


def install() -> None:
    sys.excepthook = lambda kind, value, tb, previous=sys.excepthook: _excepthook(kind, value, tb, previous)
    atexit.register(_exit_with_mapped_code)
    _collect_steps()
    _wake_stopped_workers()


def _collect_steps() -> None:
    """The ranks inherit the agent's environment: each records its step in this directory (removed at exit, by a
    handler that runs before _exit_with_mapped_code's os._exit)."""
    import shutil
    import tempfile

    from megatron_patch.runtime.distributed_init import STEPS_ENV

    os.environ[STEPS_ENV] = tempfile.mkdtemp(prefix="mp-steps-")
    atexit.register(shutil.rmtree, os.environ[STEPS_ENV], ignore_errors=True)


def _wake_stopped_workers() -> None:
    """torchrun ends the other ranks with SIGTERM and waits 30 s before SIGKILL; a stopped rank (SIGSTOP, the case
    the heartbeat reports) cannot act on SIGTERM until continued, so the job lingered those 30 s. A SIGCONT after
    torchrun's signal lets it end at once."""
    import signal

    from torch.distributed.elastic.multiprocessing.subprocess_handler import subprocess_handler

    handler = subprocess_handler.SubprocessHandler
    close = handler.close

    def close_and_continue(self, death_sig=None):
        close(self, death_sig=death_sig)
        try:
            os.killpg(self.proc.pid, signal.SIGCONT)
        except (ProcessLookupError, PermissionError):
            pass

    handler.close = close_and_continue


def rendezvous_plugin():
    """The `torchrun.handlers` entry point. torchrun calls it once per process that imports its rendezvous
    package and registers what it returns as a rendezvous backend named megatron_patch_exit_codes (never
    selected unless asked for by --rdzv-backend, which then refuses)."""
    if _is_our_agent(sys.argv) and not _installed:
        _installed.append(True)
        install()

    def refuse(params):
        raise ValueError("megatron_patch_exit_codes is not a rendezvous backend (it maps torchrun's exit code for "
                         "megatron-patch jobs); use --rdzv-backend c10d or static")

    return refuse


_installed: list[bool] = []
