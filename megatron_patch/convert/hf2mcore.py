"""HF -> Megatron (`megatron-patch convert hf2mcore`): a command over the checkpoint I/O layer (checkpoint/).

    hf2mcore("/models/DeepSeek-V2-Lite", "/ckpt/dsv2", ParallelLayout(tp=2, ep=4), fmt="torch")

Everything that can be wrong is checked before the output exists: the HF directory (hf_reader), the
architecture (families), the layout (builder.check_layout + a dry run of the rank shards on meta
tensors, which also sizes a torch-format output), the tensor names (engine.check_hf_coverage) and shapes
(against the shapes transformers builds from config.json, on the meta device).

The writers are checkpoint/mcore_writer.py (torch format, streamed shard by shard with pwrite) and
checkpoint/dist_writer.py (torch_dist, one process, a TP1 model on the meta device): peak memory about one
tensor, every HF byte read once per distinct shard. A torch_dist checkpoint holds global tensors, so it
loads at any layout; the layout decides only the vocab padding (TP) and the stored args.

Names: `--transformer-impl transformer_engine` (the default, as Megatron-LM's) writes the keys megatron-core's
TE-spec GPTModel asks for, `local` those of its local spec; `--moe-grouped-gemm` writes TEGroupedMLP's expert
names (key_map: the family tables keep one set of names, translated on write).

Every output holds `hf_config/` (config.json + tokenizer files) and `convert_meta.json` (family,
format, layout, dtype, transformer_impl, moe_grouped_gemm), so mcore2hf and reshard need nothing else.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from megatron_patch.checkpoint import mcore_layout
from megatron_patch.checkpoint.atomic import atomic_output_dir, check_output
from megatron_patch.checkpoint.engine import (EMBEDDING, KEEP_DTYPE_SUFFIXES, ShardPlan, cast, check_hf_copies,
                                              check_hf_coverage)
from megatron_patch.checkpoint.hf_config import expected_hf_shapes, load_hf_config
from megatron_patch.checkpoint.hf_reader import HFCheckpoint
from megatron_patch.checkpoint.key_map import TE, Naming
from megatron_patch.checkpoint.mcore_layout import describe_layout
from megatron_patch.checkpoint.mcore_reader import mcore_source, open_mcore
from megatron_patch.checkpoint.mcore_writer import (FORMATS, check_torch_layout, dist_plan, dist_total_bytes,
                                                    dry_run, megatron_args, output_bytes, write_dist,
                                                    write_side_files, write_torch)
from megatron_patch.checkpoint.plan_source import hf_stream
from megatron_patch.checkpoint.tensors import RELEASE_BYTES, dtype_name, parse_dtype, same_bits, tensor_bytes
from megatron_patch.errors import UserError

from .progress import ConversionProgress


class VerificationFailed(RuntimeError):
    """--verify found a tensor that did not survive the round trip bit for bit (exit code 1)."""


def plan_lines(hf_path, layout) -> list[str]:
    """`hf2mcore --dry-run`: which layers each pipeline rank (and virtual stage) gets, from config.json
    alone (no weights needed), with the rank directories Megatron-LM names for them."""
    from megatron_patch.models.builder import check_layout
    from megatron_patch.models.pipeline import stage_map

    hf_config = load_hf_config(hf_path)
    from megatron_patch.models.families import family_for_config

    config = family_for_config(hf_config).to_mcore_config(hf_config)
    check_layout(layout, config)
    stages = stage_map(config, layout)
    lines = [f"plan: {describe_layout(layout)}, {config.num_layers} decoder layers"
             + (f" + {config.mtp_num_layers} MTP" if getattr(config, "mtp_num_layers", None) else "")]
    dirs = {pp: mcore_layout.rank_dir_name(0, pp, 0, layout.pp, layout.ep) for pp in range(layout.pp)}
    for (pp, vp), line in zip(sorted(stages.decoder), stages.lines()):
        more = layout.tp * layout.ep - 1  # the stage's other (tp, ep) rank files
        lines.append(f"{line}  [{dirs[pp]}" + (f" + {more} more TP/EP rank files]" if more else "]"))
    return lines


# ---------------------------------------------------------------------------------------------------
# the HF side
# ---------------------------------------------------------------------------------------------------
class HFSource:
    """A validated HF checkpoint as the converters read it: `read(name)` (lazy slice), `meta(name)`
    (shape/dtype only), `release()` (unmap the shards: bounds the resident set)."""

    def __init__(self, path):
        self.path = Path(path)
        self.ckpt = HFCheckpoint(self.path)
        self.hf_config = load_hf_config(self.path)
        from megatron_patch.models.families import family_for_config

        self.family = family_for_config(self.hf_config)
        self.config_dir = self.path

    def read(self, name: str):
        return self.ckpt.get_slice(name)

    def get(self, name: str) -> torch.Tensor:
        return self.ckpt.get(name)

    def meta(self, name: str) -> torch.Tensor:
        return torch.empty(self.ckpt.shape(name), dtype=self.ckpt.dtype(name), device="meta")

    def keys(self) -> list[str]:
        return self.ckpt.keys()

    def release(self) -> None:
        self.ckpt.close()


def check_not_fp8(source: HFSource) -> None:
    keys = source.keys()
    fp8 = [k for k in keys if k.endswith("_scale_inv") or str(source.ckpt.dtype(k)).startswith("torch.float8")]
    if fp8:
        raise UserError(f"{source.path} holds FP8 weights (e.g. {fp8[0]}); convert them first: megatron-patch "
                        f"convert fp8-to-bf16 --in {source.path} --out DIR")


def check_hf_input(source: HFSource, plan: ShardPlan) -> None:
    """Names, dtypes and shapes of the checkpoint against the config (no tensor data read)."""
    keys = source.keys()
    check_hf_coverage(plan, keys)
    check_hf_copies(plan, source.read)
    expected = expected_hf_shapes(source.hf_config)
    for name in keys:
        want = expected.get(name)
        if want is not None and source.ckpt.shape(name) != want:
            raise UserError(f"tensor {name} has shape {list(source.ckpt.shape(name))} but config.json implies "
                            f"{list(want)}: the config does not match the weights (use the config.json of this model)")


def declared_size_check(model_size: str | None, source: HFSource) -> str | None:
    """MODEL_SIZE (e.g. 16B, 0.5B, A3B) against the checkpoint's parameter count: a number that is off
    by more than 2x is an error; anything without a number is informational."""
    if not model_size:
        return None
    count = sum(math.prod(source.ckpt.shape(k)) for k in source.keys())
    match = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMbBtT])", model_size)
    if not match:
        return f"model size {model_size!r} (informational; checkpoint has {count / 1e9:.3g}B parameters)"
    declared = float(match.group(1)) * {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[match.group(2).lower()]
    if not declared / 2 <= count <= declared * 2:
        raise UserError(f"MODEL_SIZE {model_size} does not match the checkpoint: it has {count / 1e9:.3g}B "
                        "parameters (wrong model directory or size argument?)")
    return f"model size {model_size}: checkpoint has {count / 1e9:.3g}B parameters"


# ---------------------------------------------------------------------------------------------------
# hf2mcore
# ---------------------------------------------------------------------------------------------------
def hf2mcore(hf_path, out, layout, fmt: str = "torch", dtype: str | None = None, force: bool = False,
             verify: bool = False, model_size: str | None = None, show_progress: bool = False,
             transformer_impl: str = TE, moe_grouped_gemm: bool = False) -> dict:
    """Convert; returns the summary (tensors, bytes, seconds, gb_per_s, peak_rss_gib, line, verify).
    transformer_impl / moe_grouped_gemm: Megatron-LM's flags of the run that will load the output (its
    default is the Transformer Engine spec); they decide the names written (key_map)."""
    naming = Naming(transformer_impl, moe_grouped_gemm)
    target = parse_dtype(dtype)
    if fmt not in FORMATS:
        raise UserError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    check_output(out, force, inputs=[hf_path])  # before any work (atomic_output_dir checks again)
    source = HFSource(hf_path)
    check_not_fp8(source)
    size_note = declared_size_check(model_size, source)
    plan = ShardPlan(source.family, source.hf_config, layout, naming=naming)
    check_hf_input(source, plan)
    embedding = next((r.hf[0] for r in plan.rows if r.mcore == EMBEDDING), plan.rows[0].hf[0])
    out_dtype = target or source.meta(embedding).dtype  # the checkpoint's dtype when none is asked for
    if fmt == "torch":  # torch_dist holds global tensors: any layout ShardPlan accepts
        check_torch_layout(plan)
    # also checks that the layout divides every tensor; torch_dist is written and sized at TP1
    metas = dry_run(plan, source.meta, target, every_rank=fmt == "torch")
    tp1 = dist_plan(source, plan) if fmt == "torch_dist" else None
    total = output_bytes(metas) if fmt == "torch" else dist_total_bytes(source, tp1, out_dtype)
    args = megatron_args(plan, out_dtype, fmt)
    result: dict = {}
    with atomic_output_dir(out, force, inputs=[hf_path]) as tmp:
        with ConversionProgress(total, f"hf2mcore {fmt}", force=show_progress) as progress:
            if fmt == "torch":
                write_torch(plan, source, tmp, target, args, progress, metas)
            else:
                write_dist(source, plan, tp1, out_dtype, tmp, progress)
            write_side_files(tmp, fmt, source.family.name, layout, out_dtype, source.config_dir, source.path,
                             hf_path, "hf2mcore", naming)
            stats, line = progress.summary()
        result.update(stats, line=line, out=str(Path(out).absolute()), format=fmt, layout=describe_layout(layout),
                      dtype=dtype_name(out_dtype), size_note=size_note, naming=naming.describe())
        if verify:
            result["verify"] = verify_against_hf(tmp, source, target)
    return result


def compare_stream(stream, hf_source, dtype, plan: ShardPlan) -> dict:
    """Compare (name, tensor) pairs with an HF checkpoint bit for bit (input cast to dtype if given)."""
    mcore_of = {n: p.row.mcore for n, p in plan.primary_rows().items()}
    wanted = set(hf_source.keys())
    seen, bad, nbytes, since = [], [], 0, 0
    for name, got in stream:
        if name not in wanted:  # an HF copy the input lacked (export adds it)
            continue
        mcore = mcore_of.get(name, name)
        expected = cast(mcore, hf_source.get(name), dtype)
        if mcore.endswith(KEEP_DTYPE_SUFFIXES) and got.dtype != expected.dtype:
            # megatron holds these in fp32 whatever the checkpoint had: exact if the values round trip
            got = got.to(expected.dtype) if torch.equal(got.to(expected.dtype).to(got.dtype), got) else got
        seen.append(name)
        nbytes += tensor_bytes(got)
        if not same_bits(got, expected):
            bad.append(name)
        del got, expected
        since += tensor_bytes(hf_source.meta(name))
        if since >= RELEASE_BYTES:  # unmap the input read so far
            hf_source.release()
            since = 0
    hf_source.release()
    return {"seen": len(seen), "bad": bad, "missing": sorted(wanted - set(seen)), "bytes": nbytes}


def verify_against_hf(ckpt_root: Path, source: HFSource, dtype: torch.dtype | None) -> str:
    """Convert the written checkpoint back in memory and compare every tensor bit for bit with the input
    (cast to dtype when one was asked for). Raises VerificationFailed on any difference."""
    ck = open_mcore(ckpt_root, None)
    with mcore_source(ck) as written:  # torch_dist: read a group of parameters at a time (dist_reader)
        result = compare_stream(hf_stream(written, dtype), source, dtype, written.plan)
    bad, missing = result["bad"], result["missing"]
    if bad or missing:
        what = (f"{len(bad)} tensor(s) differ (e.g. {bad[0]})" if bad
                else f"{len(missing)} tensor(s) missing (e.g. {missing[0]})")
        raise VerificationFailed(f"verify FAILED: {what} after converting the output back to HF in memory")
    how = "the input" if dtype is None else f"the input cast to {dtype_name(dtype)}"
    return (f"verify OK: {result['seen']} tensors ({result['bytes'] / 1e9:.3f} GB) bit-identical to {how} after "
            "converting the output back to HF in memory")
