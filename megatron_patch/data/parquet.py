"""Parquet -> JSON lines (one object per row), the form `megatron-patch preprocess --input X.json` reads.

pyarrow is optional (`pip install 'megatron-patch[data]'`): imported only here, when a conversion runs.
Rows are streamed batch by batch; the output is written to a temp name and renamed at the end.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from megatron_patch.errors import UserError


def require_pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading parquet needs pyarrow: pip install 'megatron-patch[data]' (or pip install pyarrow)") from None
    return pq


def parquet_files(src: str | os.PathLike) -> list[Path]:
    """The .parquet files of a directory (recursively, sorted), or the file itself."""
    path = Path(src)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"{src}: no such file or directory")
    files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
    if not files:
        raise UserError(f"{src}: no .parquet files found")
    return files


def parquet_to_jsonl(src: str | os.PathLike, out: str | os.PathLike, batch_rows: int = 8192) -> dict:
    """Write every row of every parquet file under `src` to `out` as JSON lines (all columns; values JSON
    cannot hold, e.g. timestamps, as strings). Returns {"files", "rows", "columns"}."""
    files = parquet_files(src)
    pq = require_pyarrow()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    stats = {"files": len(files), "rows": 0, "columns": []}
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for path in files:
                try:
                    reader = pq.ParquetFile(path)
                except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad file
                    raise UserError(f"{path}: not a readable parquet file ({err})") from None
                stats["columns"] = stats["columns"] or reader.schema_arrow.names
                for batch in reader.iter_batches(batch_size=batch_rows):
                    for row in batch.to_pylist():
                        f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
                        stats["rows"] += 1
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return stats
