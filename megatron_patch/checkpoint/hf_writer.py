"""Write an HF-style sharded safetensors checkpoint with bounded memory.

Tensors are buffered until a shard is full, then written and dropped. The final shard count is
only known at the end, so shards get temporary names and are renamed to HF's
`model-0000k-of-0000N.safetensors` in `close()`.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from megatron_patch.checkpoint.hf_reader import INDEX_NAME, SINGLE_NAME

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

# Files a tokenizer / generation setup needs next to the weights (copied when present).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor that owns exactly its storage.

    A view (e.g. one chunk of a fused weight) would keep its whole base alive while buffered, and
    safetensors refuses to save tensors that share memory; copying views avoids both.
    """
    tensor = tensor.detach().to("cpu")
    if (
        not tensor.is_contiguous()
        or tensor.storage_offset() != 0
        or tensor.untyped_storage().nbytes() != _nbytes(tensor)
    ):
        tensor = tensor.contiguous().clone()
    return tensor


class ShardedSafetensorsWriter:
    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        if max_shard_bytes <= 0:
            raise ValueError("max_shard_bytes must be positive")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.total_bytes = 0
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shard_files: list[str] = []  # temporary names, in write order
        self._shard_of: dict[str, int] = {}  # tensor name -> shard position
        self._closed = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._closed:
            raise RuntimeError("writer is closed")
        if name in self._shard_of:
            raise ValueError(f"tensor {name} added twice")
        tensor = _owned(tensor)
        size = _nbytes(tensor)
        # Start a new shard rather than overflow the current one; a tensor larger than the
        # limit gets a shard of its own.
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor
        self._buffer_bytes += size
        self._shard_of[name] = len(self._shard_files)
        self.total_bytes += size
        if self._buffer_bytes >= self.max_shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        tmp_name = f".shard-{len(self._shard_files):05d}.safetensors.partial"
        save_file(self._buffer, str(self.out_dir / tmp_name), metadata={"format": "pt"})
        self._shard_files.append(tmp_name)
        self._buffer = {}
        self._buffer_bytes = 0

    def close(self) -> dict[str, str]:
        """Write the last shard, give shards their final names, write the index. Returns the weight map."""
        if self._closed:
            raise RuntimeError("writer is closed")
        self._flush()
        self._closed = True
        if not self._shard_files:  # nothing added: still a valid (empty) checkpoint
            save_file({}, str(self.out_dir / SINGLE_NAME), metadata={"format": "pt"})
            return {}
        count = len(self._shard_files)
        if count == 1:
            final_names = [SINGLE_NAME]
        else:
            final_names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        for tmp_name, final_name in zip(self._shard_files, final_names):
            os.replace(self.out_dir / tmp_name, self.out_dir / final_name)
        weight_map = {name: final_names[i] for name, i in self._shard_of.items()}
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return weight_map

    def __enter__(self) -> "ShardedSafetensorsWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None and not self._closed:
            self.close()


def copy_tokenizer_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> list[str]:
    """Copy the tokenizer and generation-config files that exist in src_dir; return their names."""
    src, dst = Path(src_dir), Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied
