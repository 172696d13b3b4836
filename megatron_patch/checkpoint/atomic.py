"""All-or-nothing output directories: a conversion either produces the complete result or nothing.

- An output may not be, contain or lie inside an input (`inputs`): writing it would destroy the input.
- `--force` replaces only an earlier output of megatron-patch (it carries MARKER) or an empty directory;
  anything else needs an explicit fresh path: we never delete what we did not write.
- One writer per output: a lock file next to it names the holder's pid; a second writer is refused.
- Temporaries of dead processes (`.OUT.tmp-PID`) are removed at the next run; an `.OUT.old-PID` left by a
  process killed while replacing OUT is put back.
- A full or read-only disk is one line naming the path.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import resource
import shutil
import time
from pathlib import Path
from typing import Iterable, Iterator

from megatron_patch.errors import UserError, exception_chain
from megatron_patch.runtime.processes import pid_alive

MARKER = ".megatron-patch-output"  # written into every output; --force replaces only what carries it


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def overlap(out: Path, inp: Path) -> str | None:
    """How `out` overlaps `inp`: 'is', 'contains', 'is inside', or None."""
    o, i = out.resolve(), inp.resolve()
    if o == i:
        return "is"
    if i.is_relative_to(o):
        return "contains"
    if o.is_relative_to(i):
        return "is inside"
    return None


def check_output(final_path, force: bool, inputs: Iterable = ()) -> Path:
    """Refuse an output that overlaps an input, or exists (without --force, or not written by us)."""
    final = Path(final_path).absolute()
    for inp in inputs:
        if inp is None:
            continue
        relation = overlap(final, Path(inp))
        if relation:
            raise UserError(f"output {final} {relation} the input {Path(inp).absolute()}: writing it would destroy "
                            "the input; choose an output path outside every input")
    if final.exists() or final.is_symlink():
        if not force:
            raise UserError(f"output {final} already exists (pass --force to replace it, or choose another path)")
        if final.is_symlink() or not final.is_dir():
            raise UserError(f"output {final} exists and is not a directory: --force replaces only an earlier "
                            "output of megatron-patch; choose a fresh path")
        if not (final / MARKER).is_file() and any(final.iterdir()):
            raise UserError(f"output {final} exists and was not written by megatron-patch (no {MARKER} in it): "
                            "--force replaces only an earlier output of megatron-patch; choose a fresh path (or "
                            "remove it yourself)")
    return final


def _clean_stale(final: Path) -> None:
    """Remove temporaries of dead runs; put back an output a dead run had moved aside to replace it."""
    for kind in ("tmp", "old", "lock"):
        for path in final.parent.glob(f".{final.name}.{kind}-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or pid_alive(int(pid)):
                continue
            if kind == "old" and not final.exists():
                os.rename(path, final)
            else:
                _remove(path)


@contextlib.contextmanager
def output_lock(final: Path, needed: int | None = None) -> Iterator[None]:
    """Exclusive right to write `final`: a `.NAME.lock` file next to it holding our pid, created whole
    (written under a private name, then hard-linked: the link fails if the lock exists)."""
    lock = final.parent / f".{final.name}.lock"
    mine = final.parent / f".{final.name}.lock-{os.getpid()}"
    try:
        mine.write_text(str(os.getpid()))
        for _ in range(3):
            try:
                os.link(mine, lock)
                break
            except FileExistsError:
                try:
                    holder = int(lock.read_text().strip())
                except (OSError, ValueError):
                    holder = 0
                if holder and holder != os.getpid() and pid_alive(holder):
                    raise UserError(f"output {final} is being written by another process (pid {holder}, lock "
                                    f"{lock}); wait for it to finish or choose another path") from None
                lock.unlink(missing_ok=True)  # stale: its holder is gone
        else:
            raise UserError(f"cannot take the lock {lock} (another process keeps re-creating it); choose another path")
    except OSError as err:
        raise disk_error(err, final.parent, needed) or err
    finally:
        with contextlib.suppress(OSError):  # a read-only disk refuses even to unlink a missing file (EROFS)
            mine.unlink(missing_ok=True)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _tree_size(paths: Iterable) -> int:
    total = 0
    for path in paths:
        path = Path(path) if path is not None else None
        if path is not None and path.is_file():
            total += path.stat().st_size
        elif path is not None and path.is_dir():
            total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return total


def disk_error(err: BaseException, where: Path, needed: int | None = None) -> UserError | None:
    """One line for a read-only, full or size-limited disk naming the path and the bytes needed (torch's
    writer reports a full disk as 'unexpected pos'; `ulimit -f` gives EFBIG once SIGXFSZ is ignored)."""
    chain = exception_chain(err)
    codes = [e.errno for e in chain if isinstance(e, OSError) and e.errno]
    # safetensors' (Rust) writer reports the OS error as text: "... (os error 28)"
    codes += [int(n) for e in chain for n in re.findall(r"\(os error (\d+)\)", str(e))]
    code = codes[0] if codes else None
    text = " ".join(str(e) for e in chain)
    need = f"needs about {needed} bytes, " if needed else ""
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        room = f" with about {needed} bytes free" if needed else ""
        return UserError(f"cannot write to {where} ({os.strerror(code)}); choose a writable output path{room}")
    failed_write = code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or code is None and any(
        t in text for t in ("unexpected pos", "PytorchStreamWriter failed", "No space left", "File too large"))
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if failed_write and (code == errno.EFBIG or limit != resource.RLIM_INFINITY):
        return UserError(f"cannot write to {where}: a file would exceed the file size limit of {limit} bytes "
                         f"(ulimit -f); the output {need}raise the limit or choose another output path")
    if failed_write:
        try:  # (where may be gone already: the failed output was removed)
            free = f"{shutil.disk_usage(next(p for p in (where, *where.parents) if p.exists())).free} bytes free"
        except OSError:
            free = "free space unknown"
        return UserError(f"no space left on the device of {where} (the output {need}{free}); free space there or "
                         "choose another output path")
    return None


def write_marker(directory: Path) -> None:
    (Path(directory) / MARKER).write_text(json.dumps({"written_by": "megatron-patch", "pid": os.getpid(),
                                                      "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")


@contextlib.contextmanager
def atomic_output_dir(final_path: str | os.PathLike, force: bool = False, inputs: Iterable = ()) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to final_path only if the block succeeds.

    The sibling lives in the same parent so the final rename stays on one filesystem (atomic).
    """
    inputs = [p for p in inputs if p is not None]
    final = check_output(final_path, force, inputs)
    needed = _tree_size(inputs)  # what a full or read-only disk's message names
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if isinstance(err, (FileExistsError, NotADirectoryError)):
            raise UserError(f"cannot create {final}: a parent path is a file, not a directory; choose another "
                            "output path") from None
        raise disk_error(err, final.parent, needed) or err
    with output_lock(final, needed):
        check_output(final, force)  # again, now that we hold the lock (another writer may have finished)
        _clean_stale(final)
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
        _remove(tmp)  # leftover of an earlier crashed run that had the same pid
        try:
            tmp.mkdir()
            yield tmp
            write_marker(tmp)
            if final.exists():
                # force: move the old output aside first so a failed rename can put it back.
                old = final.parent / f".{final.name}.old-{os.getpid()}"
                _remove(old)
                os.rename(final, old)
                try:
                    os.rename(tmp, final)
                except BaseException:
                    os.rename(old, final)
                    raise
                _remove(old)
            else:
                os.rename(tmp, final)
        except BaseException as err:  # includes KeyboardInterrupt: never leave a half-written output behind
            _remove(tmp)
            disk = disk_error(err, final.parent, needed) if not isinstance(err, UserError) else None
            if disk is not None:
                raise disk from None
            raise
