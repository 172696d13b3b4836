"""All-or-nothing output directories: a conversion either produces the complete result or nothing."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from megatron_patch.errors import UserError


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_output_dir(final_path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to final_path only if the block succeeds.

    The sibling lives in the same parent so the final rename stays on one filesystem (atomic).
    """
    final = Path(final_path).absolute()
    if final.exists() and not force:
        raise UserError(f"output {final} already exists (pass --force to replace it, or choose another path)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    _remove(tmp)  # leftover of an earlier crashed run that had the same pid
    tmp.mkdir()
    try:
        yield tmp
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
    except BaseException:  # includes KeyboardInterrupt: never leave a half-written output behind
        _remove(tmp)
        raise
