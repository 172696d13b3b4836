"""`make mutants`: put realistic one-line bugs into a copy of the tree, one at a time, and check that the
tests named for each fail. The list is megatron_patch/testing/mutant_list.py.

    python -m megatron_patch.testing.mutants [--only NAME ...] [--list] [--threshold 95] [--timeout 600]

Each mutant is (name, file, exact original snippet, replacement, pytest arguments). Snippets, not line
numbers, so that the list survives edits around them; a snippet that no longer occurs exactly once is
reported STALE and counts as not killed (fix the list). The working tree is never modified: the tracked and
untracked-but-not-ignored files are copied into a temporary directory, which is deleted at the end, also
on Ctrl-C. A mutant is killed when its tests fail (or time out). The last line printed is always
`killed K of N (P %)`; the exit status is 1 when P is under --threshold.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megatron_patch.testing.mutant_list import MUTANTS, Mutant

REPO = Path(__file__).resolve().parents[2]


def copy_tree(src: Path, dst: Path) -> None:
    """The files git would show (tracked + untracked, not ignored), so no .venv, caches or outputs."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=src,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        path = src / rel
        if path.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dst / rel)


def apply(tree: Path, mutant: Mutant) -> str | None:
    """Write the mutated file; returns its original text, or None when the snippet is stale."""
    path = tree / mutant.file
    text = path.read_text() if path.is_file() else ""
    if text.count(mutant.original) != 1:
        return None
    path.write_text(text.replace(mutant.original, mutant.replacement))
    return text


def run_tests(tree: Path, mutant: Mutant, timeout: float) -> tuple[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree), TORCHDYNAMO_DISABLE="1", PYTHONDONTWRITEBYTECODE="1")
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-W", "ignore", *mutant.tests]
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # pytest and the ranks / trainers it started
        proc.wait()
        return "KILLED (timeout)", time.perf_counter() - start
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    elapsed = time.perf_counter() - start
    if rc == 0:
        return "SURVIVED", elapsed
    if rc in (4, 5):  # usage error / no tests collected: the list names tests that do not exist
        return f"ERROR (pytest exit {rc}: check the test names)", elapsed
    return "KILLED", elapsed


def _interrupt(*_):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    p.add_argument("--list", action="store_true", help="print the mutants and exit")
    p.add_argument("--threshold", type=float, default=95.0, help="exit 1 under this kill percentage")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant's tests")
    args = p.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTANTS}
    if unknown:
        print(f"error: no mutant named {sorted(unknown)[0]!r}; see --list", file=sys.stderr)
        return 2
    if args.list:
        for m in mutants:
            print(f"{m.name:40s} {m.file}  ->  {' '.join(m.tests)}")
        return 0
    # SIGTERM unwinds like Ctrl-C: the temporary tree is removed and the running tests are stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    killed, start, status = 0, time.perf_counter(), None
    try:
        with tempfile.TemporaryDirectory(prefix="mp-mutants-") as tmp:
            tree = Path(tmp)
            copy_tree(REPO, tree)
            for i, mutant in enumerate(mutants, 1):
                original = apply(tree, mutant)
                if original is None:
                    verdict, elapsed = "STALE (snippet not found exactly once)", 0.0
                else:
                    try:
                        verdict, elapsed = run_tests(tree, mutant, args.timeout)
                    finally:
                        (tree / mutant.file).write_text(original)
                killed += verdict.startswith("KILLED")
                print(f"[{i}/{len(mutants)}] {verdict:12s} {mutant.name} ({elapsed:.0f}s)", flush=True)
    except KeyboardInterrupt:
        print("interrupted: the mutants not run count as not killed", flush=True)
        status = 130
    n = len(mutants)
    percent = 100.0 * killed / n if n else 0.0
    print(f"wall time {time.perf_counter() - start:.0f}s", flush=True)
    print(f"killed {killed} of {n} ({percent:.1f} %)", flush=True)
    return status if status is not None else 0 if percent >= args.threshold else 1


if __name__ == "__main__":
    sys.exit(main())
