"""Megatron -> Megatron at another layout (`megatron-patch convert reshard`), either format.

    torch      -> torch       streaming, row by row: the source shards of a row are merged (memory-mapped
                              rank files) and cut for the new layout (hf2mcore.write_torch)
    torch      -> torch_dist  the target's ranks read the source rows the same way
    torch_dist -> torch       one rank loads the model at TP1/PP1/EP1 and writes the new rank files
    torch_dist -> torch_dist  through a TP1 torch-format staging copy inside the output (vocab padding
                              depends on TP, so dist_checkpointing cannot always reshard it on load)

The dtype is kept. The output is atomic and carries hf_config/ and convert_meta.json like hf2mcore's.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from megatron_patch.errors import UserError

from .atomic import atomic_output_dir
from .engine import ShardPlan
from .hf2mcore import (FORMATS, check_dist_layout, check_layout_values, check_torch_layout, describe,
                       dry_run, dtype_name, megatron_args, output_bytes, refuse_existing, spawn, write_side_files,
                       write_torch, write_torch_dist)
from .mcore2hf import TorchSource, dist_to_torch_rank, open_mcore
from .progress import ConversionProgress


def reshard(mcore_path, out, layout, fmt: str | None = None, force: bool = False, hf_config_dir=None,
            show_progress: bool = False) -> dict:
    from megatron_patch.models.builder import ParallelLayout

    check_layout_values(layout)
    layout = ParallelLayout(tp=layout.tp, pp=layout.pp, ep=layout.ep, etp=layout.expert_tp,
                            vpp=layout.vpp if layout.vpp and layout.vpp > 1 else None)
    refuse_existing(out, force)
    ck = open_mcore(mcore_path, hf_config_dir)
    fmt = fmt or ck.fmt
    if fmt not in FORMATS:
        raise UserError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    plan = ShardPlan(ck.family, ck.hf_config, layout)
    (check_torch_layout if fmt == "torch" else check_dist_layout)(plan)
    dtype = ck.dtype()
    source = metas = None
    total = 0
    if ck.fmt == "torch" and fmt == "torch":
        source = TorchSource(ck)
        metas = dry_run(plan, source.meta, None)
        total = output_bytes(metas)
        source.release()
    with atomic_output_dir(out, force) as tmp:
        with ConversionProgress(total, f"reshard -> {fmt}", force=show_progress) as progress:
            stats = None
            if source is not None:
                write_torch(plan, source, tmp, None, megatron_args(plan, dtype, "torch"), progress, metas)
            elif ck.fmt == "torch":
                stats = write_torch_dist(("torch", str(ck.root)), ck.config_dir, layout, dtype, tmp)
            else:
                dist_args = (str(ck.ckpt_dir), str(ck.config_dir), dtype_name(dtype), ck.padded_vocab())
                if fmt == "torch":
                    stats = spawn(dist_to_torch_rank, 1, *dist_args, layout, str(tmp), str(mcore_path))[0]
                else:
                    staging = Path(tmp) / ".staging"
                    spawn(dist_to_torch_rank, 1, *dist_args, ParallelLayout(), str(staging), str(mcore_path))
                    stats = write_torch_dist(("torch", str(staging)), None, layout, dtype, tmp)
                    shutil.rmtree(staging)
            if stats is not None:
                progress.update(stats["bytes"], stats["tensors"])
            write_side_files(tmp, fmt, ck.family.name, layout, dtype, ck.config_dir, ck.tokenizer_dir,
                             mcore_path, "reshard")
            summary, line = progress.summary()
    return {**summary, "line": line, "out": str(Path(out).absolute()), "format": fmt,
            "layout": describe(layout), "dtype": dtype_name(dtype)}
