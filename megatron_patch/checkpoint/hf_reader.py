"""Lazy, validated access to a Hugging Face model directory (config.json + safetensors shards).

Everything that can be wrong with the files is checked when the checkpoint is opened, by reading
only the small safetensors headers, so a conversion fails in the first second instead of after an
hour. Tensor data is read later, on demand, through safetensors' mmap (a slice reads only its bytes).
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from megatron_patch.errors import UserError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# safetensors dtype codes -> torch dtypes (getattr: some float8 types are missing in older torch).
_DTYPES = {
    code: getattr(torch, name)
    for code, name in {
        "BOOL": "bool",
        "U8": "uint8",
        "I8": "int8",
        "I16": "int16",
        "U16": "uint16",
        "I32": "int32",
        "U32": "uint32",
        "I64": "int64",
        "U64": "uint64",
        "F16": "float16",
        "BF16": "bfloat16",
        "F32": "float32",
        "F64": "float64",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
        "F8_E8M0": "float8_e8m0fnu",
    }.items()
    if hasattr(torch, name)
}

# A real header is a few MB at most; anything bigger means the length prefix is garbage.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_safetensors_header(path: Path) -> dict:
    """Parse and validate one shard's header; return {tensor name: {dtype, shape, data_offsets}}."""
    name = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise UserError(f"shard {name} is truncated: {size} bytes, too short for a safetensors header (re-download it)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER_BYTES:
                raise UserError(f"shard {name} has an unreadable safetensors header (length prefix {header_len}); it is not a safetensors file or is corrupt (re-download it)")
            if 8 + header_len > size:
                raise UserError(f"shard {name} is truncated: header needs {8 + header_len} bytes, file has {size} (re-download it)")
            raw = f.read(header_len)
    except OSError as err:
        raise UserError(f"cannot read shard {path}: {err.strerror} (check permissions)") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except ValueError as err:
        raise UserError(f"shard {name} has an unreadable safetensors header ({err}); the file is corrupt (re-download it)") from None

    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    data_end = 0
    for tname, info in tensors.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or "dtype" not in info
            or not isinstance(info.get("shape"), list)
        ):
            raise UserError(f"shard {name} has an unreadable safetensors header (bad entry for {tname}); re-download it")
        data_end = max(data_end, offsets[1])
    needed = 8 + header_len + data_end
    if needed > size:
        raise UserError(f"shard {name} is truncated: header says {needed} bytes, file has {size} (re-download it)")
    return tensors


class TensorSlice:
    """A lazy view of one tensor: `.shape`, `.dtype`, and numpy-style indexing returning a torch tensor."""

    def __init__(self, raw_slice, shape: tuple[int, ...], dtype: torch.dtype):
        self._raw = raw_slice
        self.shape = shape
        self.dtype = dtype

    def __getitem__(self, index) -> torch.Tensor:
        return self._raw[index]

    def __len__(self) -> int:
        return self.shape[0]


class HFCheckpoint:
    """An HF model directory. Construction validates everything; tensors are read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"HF checkpoint directory not found: {self.path} (check the path)")
        self.config = self._read_config()
        self._weight_map = self._read_weight_map()  # tensor name -> shard file name
        self._headers: dict[str, dict] = {}
        for shard in dict.fromkeys(self._weight_map.values()):
            shard_path = self.path / shard
            if not shard_path.is_file():
                raise UserError(f"{INDEX_NAME} names missing shard {shard} in {self.path} (download the missing file or fix the index)")
            self._headers[shard] = read_safetensors_header(shard_path)
        for tname, shard in self._weight_map.items():
            if tname not in self._headers[shard]:
                raise UserError(f"tensor {tname} is listed in {INDEX_NAME} under {shard}, but that shard does not contain it (re-download the shard or fix the index)")
        self._handles: dict[str, object] = {}  # one safe_open per shard, opened on first use

    def _read_config(self) -> dict:
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise UserError(f"no config.json in {self.path}: not an HF model directory (point at the folder that holds config.json)")
        try:
            return json.loads(config_path.read_text())
        except ValueError as err:
            raise UserError(f"config.json in {self.path} is not valid JSON ({err}); fix or re-download it") from None

    def _read_weight_map(self) -> dict[str, str]:
        index_path = self.path / INDEX_NAME
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise ValueError("weight_map is not an object")
            except (ValueError, KeyError, TypeError) as err:
                raise UserError(f"{INDEX_NAME} in {self.path} is unreadable ({err}); fix or re-download it") from None
            return dict(weight_map)
        single = self.path / SINGLE_NAME
        if single.is_file():
            return {tname: SINGLE_NAME for tname in read_safetensors_header(single)}
        raise UserError(f"no {SINGLE_NAME} or {INDEX_NAME} in {self.path}: no safetensors weights to read (download the weights)")

    # --- metadata (header only, no tensor data) ---

    def keys(self) -> list[str]:
        return list(self._weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self._weight_map

    def __len__(self) -> int:
        return len(self._weight_map)

    def _info(self, name: str) -> dict:
        try:
            return self._headers[self._weight_map[name]][name]
        except KeyError:
            raise UserError(f"tensor {name} not found in {self.path} (is this the right model?)") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info(name)["shape"])

    def dtype(self, name: str) -> torch.dtype:
        code = self._info(name)["dtype"]
        if code not in _DTYPES:
            raise UserError(f"tensor {name} has dtype {code}, which this torch build cannot represent (upgrade torch)")
        return _DTYPES[code]

    def nbytes(self, name: str) -> int:
        begin, end = self._info(name)["data_offsets"]
        return end - begin

    def shard_of(self, name: str) -> str:
        self._info(name)
        return self._weight_map[name]

    def shards(self) -> dict[str, list[str]]:
        """Shard file -> its indexed tensor names in on-disk order (reading in this order is sequential)."""
        out: dict[str, list[str]] = {}
        for shard in sorted(self._headers):
            names = [n for n, s in self._weight_map.items() if s == shard]
            header = self._headers[shard]
            out[shard] = sorted(names, key=lambda n: header[n]["data_offsets"][0])
        return out

    # --- tensor data ---

    def _handle(self, shard: str):
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.path / shard), framework="pt", device="cpu")
        return self._handles[shard]

    def get_slice(self, name: str) -> TensorSlice:
        shard = self.shard_of(name)
        return TensorSlice(self._handle(shard).get_slice(name), self.shape(name), self.dtype(name))

    def get(self, name: str) -> torch.Tensor:
        return self._handle(self.shard_of(name)).get_tensor(name)

    def close(self) -> None:
        self._handles.clear()  # dropping the safe_open objects unmaps the files

    def __enter__(self) -> "HFCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
