"""Errors meant for the user: one line naming the problem and the fix. The CLI prints them and exits 2."""


class UserError(Exception):
    pass


def exception_chain(err: BaseException) -> list[BaseException]:
    """`err` and everything it wraps: causes, contexts, and the per-rank failures torch DCP collects in a
    CheckpointException (`failures`: rank -> exception, or (exception, traceback))."""
    seen, stack, found = set(), [err], []
    while stack:
        e = stack.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        found.append(e)
        stack += [e.__cause__, e.__context__]
        for failure in (getattr(e, "failures", None) or {}).values():
            stack.append(failure[0] if isinstance(failure, tuple) else failure)
    return found


def print_once_per_node(line: str) -> None:
    """Bad input fails every rank the same way: under torchrun, the first local rank to reach a line prints it
    and the others, finding its claim file (named after the agent's pid and the line), stay silent; a line
    that differs between ranks is printed by each. Claims of agents that are gone are removed here."""
    import hashlib
    import os
    import sys
    import tempfile
    from pathlib import Path

    from megatron_patch.runtime.processes import pid_alive

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
