"""Megatron -> HF (`megatron-patch convert mcore2hf`); the readers are checkpoint/mcore_reader.py and dist_reader.py.

    mcore2hf("/ckpt/dsv2", "/models/dsv2-hf")            # hf_config/ stored by hf2mcore
    mcore2hf("/megatron/run1", "/hf/out", hf_config_dir="/models/DeepSeek-V2-Lite")

torch format: the rank files of one pipeline stage at a time are memory-mapped, the TP/ETP shards of
each row merged back (engine.ShardPlan.hf_tensors) and written through ShardedSafetensorsWriter; the
mappings are dropped before the next stage, so the resident set is about one stage plus one output
shard. torch_dist: read in this process at TP1/PP1/EP1 (dist_reader), a group of parameters (about
256 MiB) at a time, so the resident set is about one group plus one output shard.

Either spec's names are read (key_map, detected per checkpoint): megatron-core's local or Transformer
Engine spec, SequentialMLP or grouped experts, Pai-Megatron-Patch's TP-split MLA down projections; a key in
neither set is refused before anything is written.

The HF config comes from the checkpoint's own hf_config/ (written by hf2mcore and reshard), else from
--hf-config; --hf-config also supplies the tokenizer files.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_patch.checkpoint.atomic import atomic_output_dir, check_output
from megatron_patch.checkpoint.hf_writer import ShardedSafetensorsWriter, copy_tokenizer_files
from megatron_patch.checkpoint.mcore_reader import mcore_source, open_mcore
from megatron_patch.checkpoint.plan_source import hf_bytes, hf_stream
from megatron_patch.checkpoint.tensors import parse_dtype, tensor_bytes
from megatron_patch.errors import UserError

from .progress import ConversionProgress

DEFAULT_MAX_SHARD_BYTES = 1024**3


# ---------------------------------------------------------------------------------------------------
# writing / comparing HF tensor streams
# ---------------------------------------------------------------------------------------------------
def write_hf_stream(stream, out: Path, max_shard_bytes: int, progress) -> dict:
    writer = ShardedSafetensorsWriter(out, max_shard_bytes)
    tensors = nbytes = 0
    for name, tensor in stream:
        writer.add(name, tensor)
        tensors, nbytes = tensors + 1, nbytes + tensor_bytes(tensor)
        if progress is not None:
            progress.update(tensor_bytes(tensor))
        del tensor
    writer.close()
    return {"tensors": tensors, "bytes": nbytes}


def write_hf_config(config_dir: Path, out: Path, dtype: torch.dtype | None) -> None:
    config = json.loads((Path(config_dir) / "config.json").read_text())
    if dtype is not None:
        name = str(dtype).replace("torch.", "")
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = name
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------
# mcore2hf
# ---------------------------------------------------------------------------------------------------
def mcore2hf(mcore_path, out, hf_config_dir=None, dtype: str | None = None, force: bool = False,
             max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, show_progress: bool = False) -> dict:
    target = parse_dtype(dtype)
    if max_shard_bytes <= 0:
        raise UserError("--max-shard-size must be positive")
    check_output(out, force, inputs=[mcore_path, hf_config_dir])  # before any work
    ck = open_mcore(mcore_path, hf_config_dir)
    with mcore_source(ck) as source, atomic_output_dir(out, force, inputs=[mcore_path, hf_config_dir]) as tmp:  # a mismatch fails before
        with ConversionProgress(hf_bytes(source, target), "mcore2hf", force=show_progress) as progress:
            write_hf_stream(hf_stream(source, target), tmp, max_shard_bytes, progress)
            stats, line = progress.summary()
        write_hf_config(ck.config_dir, tmp, target or ck.dtype())
        for src in dict.fromkeys((ck.config_dir, ck.tokenizer_dir)):
            copy_tokenizer_files(src, tmp)
    return {**stats, "line": line, "out": str(Path(out).absolute()), "format": ck.fmt}

