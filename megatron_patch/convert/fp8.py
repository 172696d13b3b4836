"""DeepSeek-V3 block-scaled FP8 -> BF16 (`megatron-patch convert fp8-to-bf16`).

Each float8_e4m3fn `X.weight` [rows, cols] has a float32 `X.weight_scale_inv`
[ceil(rows/128), ceil(cols/128)]: one multiplier per 128x128 block (edge blocks are partial).
bf16 = (fp8.float() * block multiplier).to(bf16). Everything else is copied byte for byte.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch

from megatron_patch.errors import UserError

from megatron_patch.checkpoint.atomic import atomic_output_dir, check_output
from megatron_patch.checkpoint.hf_reader import HFCheckpoint
from megatron_patch.checkpoint.hf_writer import DEFAULT_MAX_SHARD_BYTES, ShardedSafetensorsWriter, copy_tokenizer_files
from .progress import ConversionProgress

BLOCK = 128
SCALE_SUFFIX = "_scale_inv"
_FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, n))


def dequantize_fp8_blockwise(weight: torch.Tensor, scale_inv: torch.Tensor, name: str = "weight", block: int = BLOCK) -> torch.Tensor:
    if weight.dim() != 2:
        raise UserError(f"fp8 tensor {name} has shape {tuple(weight.shape)}; only 2-D block-scaled weights are supported")
    rows, cols = weight.shape
    expected = (math.ceil(rows / block), math.ceil(cols / block))
    if tuple(scale_inv.shape) != expected:
        raise UserError(f"{name}{SCALE_SUFFIX} has shape {tuple(scale_inv.shape)}, expected {expected} for {block}x{block} blocks of a {rows}x{cols} weight (the checkpoint is not DeepSeek block-scaled FP8)")
    scale = scale_inv.to(torch.float32)
    out = torch.empty((rows, cols), dtype=torch.bfloat16)
    # One band of `block` rows at a time keeps the float32 temporaries small.
    for i in range(expected[0]):
        r0, r1 = i * block, min((i + 1) * block, rows)
        col_scale = scale[i].repeat_interleave(block)[:cols]
        band = weight[r0:r1].to(torch.float32)
        band.mul_(col_scale)
        out[r0:r1].copy_(band)  # copy_ casts to bf16 (round to nearest even), like .to()
    return out


def _plan(src: HFCheckpoint) -> tuple[list[str], set[str]]:
    """(tensors to write, the fp8 weights among them); fails before any output exists."""
    fp8 = set()
    for name in src.keys():
        dtype = src.dtype(name)
        if dtype == torch.float8_e4m3fn and name.endswith(".weight"):
            if name + SCALE_SUFFIX not in src:
                raise UserError(f"fp8 weight {name} has no {name}{SCALE_SUFFIX} in {src.path} (the checkpoint is incomplete; re-download it)")
            fp8.add(name)
        elif dtype in _FP8_DTYPES:
            raise UserError(f"tensor {name} is {dtype} without a DeepSeek block scale; only float8_e4m3fn *.weight + *.weight_scale_inv is supported")
    if not fp8:
        raise UserError(f"no float8_e4m3fn weights in {src.path}: nothing to convert (is it already bf16?)")
    outputs = [n for names in src.shards().values() for n in names if not n.endswith(SCALE_SUFFIX)]
    return outputs, fp8


def _write_config(config: dict, out_dir: Path) -> None:
    config = dict(config)
    config.pop("quantization_config", None)  # otherwise transformers would try to load the bf16 weights as fp8
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _copy_remote_code(src_dir: Path, out_dir: Path) -> None:
    # config.json's auto_map may point at configuration_*.py / modeling_*.py (trust_remote_code).
    for path in src_dir.glob("*.py"):
        shutil.copyfile(path, out_dir / path.name)


def fp8_to_bf16(
    in_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    show_progress: bool = False,
) -> dict:
    """Convert a block-scaled FP8 HF checkpoint to BF16, shard by shard, into a fresh out_dir.

    Returns the progress summary (tensors, bytes, seconds, gb_per_s, peak_rss_gib) plus
    `line` (one-line text), `out_dir` and `shards`. show_progress forces the bar off a TTY.
    """
    check_output(out_dir, force, inputs=[in_dir])  # before any work
    with HFCheckpoint(in_dir) as src:
        outputs, fp8 = _plan(src)
        total = sum(math.prod(src.shape(n)) * 2 if n in fp8 else src.nbytes(n) for n in outputs)
        with atomic_output_dir(out_dir, force, inputs=[in_dir]) as tmp, ConversionProgress(total, "fp8 -> bf16", force=show_progress) as progress:
            writer = ShardedSafetensorsWriter(tmp, max_shard_bytes)
            for name in outputs:
                tensor = src.get(name)
                if name in fp8:
                    # The scale may live in another shard; HFCheckpoint keeps both open.
                    tensor = dequantize_fp8_blockwise(tensor, src.get(name + SCALE_SUFFIX), name)
                writer.add(name, tensor)
                progress.update(tensor.numel() * tensor.element_size())
                del tensor
            shards = len(set(writer.close().values())) or 1
            _write_config(src.config, tmp)
            copy_tokenizer_files(src.path, tmp)
            _copy_remote_code(src.path, tmp)
            stats, line = progress.summary()
    return {**stats, "line": line, "out_dir": str(Path(out_dir).absolute()), "shards": shards}
