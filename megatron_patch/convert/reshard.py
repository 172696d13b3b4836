"""Megatron -> Megatron at another layout (`megatron-patch convert reshard`), either format.

The source is read as a PlanSource (checkpoint.mcore_reader.mcore_source): a torch-format checkpoint row by row from
its memory-mapped rank files, a torch_dist one a group of parameters at a time at TP1 (dist_reader).
The rows are then cut for the new layout by the same writers hf2mcore uses:

    -> torch       mcore_writer.write_torch: rank files streamed shard by shard
    -> torch_dist  dist_writer: one process, a TP1 model on the meta device, tensors made on demand

so the resident set is about one tensor (torch source) or one group (torch_dist source), whatever the
model size. The dtype is kept. The output is atomic and carries hf_config/ and convert_meta.json like
hf2mcore's.
"""
from __future__ import annotations

from pathlib import Path

from megatron_patch.checkpoint.atomic import atomic_output_dir, check_output
from megatron_patch.checkpoint.engine import ShardPlan
from megatron_patch.checkpoint.key_map import TE, Naming
from megatron_patch.checkpoint.mcore_layout import describe_layout
from megatron_patch.checkpoint.mcore_reader import mcore_source, open_mcore
from megatron_patch.checkpoint.mcore_writer import (FORMATS, check_torch_layout, dist_plan, dist_total_bytes,
                                                    dry_run, megatron_args, output_bytes, write_dist,
                                                    write_side_files, write_torch)
from megatron_patch.checkpoint.tensors import dtype_name
from megatron_patch.errors import UserError

from .progress import ConversionProgress


def torch_read_order(plan: ShardPlan) -> list[str]:
    """The HF tensors write_torch reads, in order: stage by stage, table order within a stage."""
    return [hf for pp in range(plan.layout.pp) for p in plan.placed if p.place.pp == pp for hf in p.row.hf]


def reshard(mcore_path, out, layout, fmt: str | None = None, force: bool = False, hf_config_dir=None,
            show_progress: bool = False, transformer_impl: str = TE, moe_grouped_gemm: bool = False) -> dict:
    """The names written follow transformer_impl / moe_grouped_gemm (the input's are detected)."""
    naming = Naming(transformer_impl, moe_grouped_gemm)
    check_output(out, force, inputs=[mcore_path, hf_config_dir])  # before any work
    ck = open_mcore(mcore_path, hf_config_dir)
    fmt = fmt or ck.fmt
    if fmt not in FORMATS:
        raise UserError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    plan = ShardPlan(ck.family, ck.hf_config, layout, naming=naming)
    if fmt == "torch":  # torch_dist holds global tensors: any layout ShardPlan accepts
        check_torch_layout(plan)
    dtype = ck.dtype()
    with mcore_source(ck) as source:
        if fmt == "torch":
            source.expect(torch_read_order(plan))
            metas = dry_run(plan, source.meta, None)  # also checks that the layout divides every tensor
            total = output_bytes(metas)
        else:
            tp1 = dist_plan(source, plan)
            total = dist_total_bytes(source, tp1, dtype)
        with atomic_output_dir(out, force, inputs=[mcore_path, hf_config_dir]) as tmp:
            with ConversionProgress(total, f"reshard -> {fmt}", force=show_progress) as progress:
                if fmt == "torch":
                    write_torch(plan, source, tmp, None, megatron_args(plan, dtype, "torch"), progress, metas)
                else:
                    write_dist(source, plan, tp1, dtype, tmp, progress)
                write_side_files(tmp, fmt, ck.family.name, layout, dtype, ck.config_dir, ck.tokenizer_dir,
                                 mcore_path, "reshard", naming)
                summary, line = progress.summary()
    return {**summary, "line": line, "out": str(Path(out).absolute()), "format": fmt,
            "layout": describe_layout(layout), "dtype": dtype_name(dtype), "naming": naming.describe()}
