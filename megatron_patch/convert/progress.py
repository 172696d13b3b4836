"""Progress bar and end-of-run summary for conversions (bytes, tensors, throughput, peak memory)."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far, in GiB."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # ru_maxrss is KiB on Linux but bytes on macOS.
        return peak / 1024**3 if sys.platform == "darwin" else peak / 1024**2
    except (ImportError, AttributeError):  # Windows: no resource module
        import psutil

        info = psutil.Process().memory_info()
        return getattr(info, "peak_wset", info.rss) / 1024**3


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.2f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    raise AssertionError


class ConversionProgress:
    """A tqdm byte counter. Hidden when stderr is not a terminal (logs stay clean) unless force=True,
    but it always counts, so summary() works either way."""

    def __init__(self, total_bytes: int, desc: str, force: bool = False, file=None):
        file = file if file is not None else sys.stderr
        show = force or (hasattr(file, "isatty") and file.isatty())
        self.total_bytes = total_bytes
        self.bytes = 0
        self.tensors = 0
        self._start = time.perf_counter()
        self._bar = tqdm(
            total=total_bytes,
            desc=desc,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            dynamic_ncols=True,
            file=file,
            disable=not show,
        )

    def update(self, nbytes: int, ntensors: int = 1) -> None:
        self.bytes += nbytes
        self.tensors += ntensors
        self._bar.update(nbytes)

    def summary(self) -> tuple[dict, str]:
        """Return (numbers, one-line human summary)."""
        seconds = time.perf_counter() - self._start
        stats = {
            "tensors": self.tensors,
            "bytes": self.bytes,
            "seconds": round(seconds, 3),
            "gb_per_s": round(self.bytes / 1e9 / seconds, 3) if seconds > 0 else 0.0,
            "peak_rss_gib": round(peak_rss_gib(), 2),
        }
        line = (
            f"{stats['tensors']} tensors, {_human(self.bytes)} in {seconds:.1f} s "
            f"({stats['gb_per_s']:.2f} GB/s), peak RSS {stats['peak_rss_gib']:.2f} GiB"
        )
        return stats, line

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> "ConversionProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
