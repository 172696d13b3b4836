"""HF -> Megatron (`megatron-patch convert hf2mcore`), and the Megatron writers reshard reuses.

    hf2mcore("/models/DeepSeek-V2-Lite", "/ckpt/dsv2", ParallelLayout(tp=2, ep=4), fmt="torch")

Everything that can be wrong is checked before the output exists: the HF directory (hf_reader), the
architecture (families), the layout (builder.check_layout + a dry run of every rank's shards on meta
tensors, which also sizes the progress bar), the tensor names (engine.check_hf_coverage) and shapes
(against the shapes transformers builds from config.json, on the meta device).

torch format (Megatron-LM's `--ckpt-format torch`, iteration `release`): one file per (tp, pp, ep)
rank, as Megatron-LM names them. It streams: each rank file is first written with its pickled structure
and reserved (sparse) space for the tensor bytes (`torch.serialization.skip_data`), then every shard is
computed once, from lazy safetensors slices, and written with pwrite into every file that holds it (an
EP-replicated dense weight goes into all EP files of its TP rank). Peak memory is about one tensor,
whatever the model size; every HF byte is read once per distinct shard.

torch_dist (megatron-core dist_checkpointing): written by one process from a TP1 model on the meta
device, each tensor made from its lazy HF slices only when torch DCP's writer asks for it (dist_writer):
peak memory about one tensor, every HF byte read once. The checkpoint holds global tensors, so it loads
at any layout; the layout decides only the vocab padding (TP) and the stored args.

Names: `--transformer-impl transformer_engine` (the default, as Megatron-LM's) writes the keys megatron-core's
TE-spec GPTModel asks for, `local` those of its local spec; `--moe-grouped-gemm` writes TEGroupedMLP's expert
names (key_map: the family tables keep one set of names, translated on write).

Every output holds `hf_config/` (config.json + tokenizer files) and `convert_meta.json` (family,
format, layout, dtype, transformer_impl, moe_grouped_gemm), so mcore2hf and reshard need nothing else.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import zipfile
from pathlib import Path

import torch

from megatron_patch.checkpoint import mcore_layout
from megatron_patch.checkpoint.mcore_layout import layout_dict
from megatron_patch.checkpoint.hf_config import expected_hf_shapes, load_hf_config
from megatron_patch.checkpoint.safe_load import torch_load
from megatron_patch.checkpoint.tensors import RELEASE_BYTES, dtype_name, parse_dtype, raw_bytes, tensor_bytes
from megatron_patch.errors import UserError

from megatron_patch.checkpoint.atomic import atomic_output_dir, check_output
from megatron_patch.checkpoint.engine import EMBEDDING, RankPosition, ShardPlan, check_hf_copies, check_hf_coverage
from megatron_patch.checkpoint.key_map import LOCAL, TE, Naming
from megatron_patch.checkpoint.hf_reader import HFCheckpoint
from megatron_patch.checkpoint.hf_writer import copy_tokenizer_files
from .progress import ConversionProgress

FORMATS = ("torch", "torch_dist")
ITERATION = "release"  # no optimizer state: Megatron-LM loads a release checkpoint as iteration 0
META_NAME = "convert_meta.json"
HF_CONFIG_DIR = "hf_config"


class VerificationFailed(RuntimeError):
    """--verify found a tensor that did not survive the round trip bit for bit (exit code 1)."""


# ---------------------------------------------------------------------------------------------------
# small helpers shared by hf2mcore, mcore2hf and reshard
# ---------------------------------------------------------------------------------------------------
def check_layout_values(layout) -> None:
    for name in ("tp", "pp", "ep"):
        if getattr(layout, name) < 1:
            raise UserError(f"--{name} {getattr(layout, name)}: must be >= 1")
    if layout.expert_tp < 1:
        raise UserError(f"--etp {layout.expert_tp}: must be >= 1")
    if layout.vpp is not None and layout.vpp < 1:
        raise UserError(f"--vpp {layout.vpp}: must be >= 1")
    if layout.vpp and layout.vpp > 1 and layout.pp == 1:
        raise UserError(f"--vpp {layout.vpp} needs pipeline parallelism: pass --pp > 1 (virtual stages split a stage)")


def refuse_existing(out, force: bool, inputs=()) -> None:
    """Fail before any work (atomic_output_dir checks again when the writing starts)."""
    check_output(out, force, inputs)


def normalized_layout(layout):
    """The layout as converters store it: VPP 1 is no VPP."""
    return dataclasses.replace(layout, vpp=layout.vpp if layout.vpp and layout.vpp > 1 else None)


def describe(layout) -> str:
    """TP2xPP1xEP4xETP2 (+VPPn, + the uneven split): what a checkpoint depends on (not sequence parallel)."""
    text = f"TP{layout.tp}xPP{layout.pp}xEP{layout.ep}xETP{layout.expert_tp}"
    text += f"xVPP{layout.vpp}" if layout.vpp and layout.vpp > 1 else ""
    split = layout.describe_split()
    return text + (f" ({split})" if split else "")


def plan_lines(hf_path, layout) -> list[str]:
    """`hf2mcore --dry-run`: which layers each pipeline rank (and virtual stage) gets, from config.json
    alone (no weights needed), with the rank directories Megatron-LM names for them."""
    from megatron_patch.models.builder import check_layout
    from megatron_patch.models.pipeline import stage_map

    check_layout_values(layout)
    hf_config = load_hf_config(hf_path)
    from megatron_patch.models.families import family_for_config

    config = family_for_config(hf_config).to_mcore_config(hf_config)
    layout = normalized_layout(layout)
    check_layout(layout, config)
    stages = stage_map(config, layout)
    lines = [f"plan: {describe(layout)}, {config.num_layers} decoder layers"
             + (f" + {config.mtp_num_layers} MTP" if getattr(config, "mtp_num_layers", None) else "")]
    dirs = {pp: mcore_layout.rank_dir_name(0, pp, 0, layout.pp, layout.ep) for pp in range(layout.pp)}
    for (pp, vp), line in zip(sorted(stages.decoder), stages.lines()):
        more = layout.tp * layout.ep - 1  # the stage's other (tp, ep) rank files
        lines.append(f"{line}  [{dirs[pp]}" + (f" + {more} more TP/EP rank files]" if more else "]"))
    return lines


def _plain(value) -> bool:
    """A value Megatron-LM's args can hold and a weights-only unpickler reads (no functions, no enums)."""
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str, torch.dtype))


def megatron_args(plan: ShardPlan, dtype: torch.dtype, fmt: str) -> dict:
    """The `args` fields Megatron-LM's loader checks (check_checkpoint_args) or adopts with
    --use-checkpoint-args (load_args_from_checkpoint), plus every plain TransformerConfig field of the
    family's config under its own name (Megatron-LM's core_transformer_config_from_args copies args by
    config field name: MLA, rope/yarn, router, MTP fields alike), transformer_impl and moe_grouped_gemm."""
    cfg, ma, lay = plan.mcore_config, plan.model_args, plan.layout
    layout_fields = set(lay.config_overrides())  # set from the layout (build_args)
    config_fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                     if f.name not in layout_fields and _plain(getattr(cfg, f.name))}
    heads = cfg.num_attention_heads
    groups = cfg.num_query_groups or heads
    stages = lay.pp * (lay.vpp or 1)
    args = dict(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=heads, num_query_groups=groups, group_query_attention=groups != heads,
        kv_channels=cfg.kv_channels, max_position_embeddings=ma.max_position_embeddings,
        position_embedding_type=ma.position_embedding_type, add_position_embedding=False,
        use_rotary_position_embeddings=ma.position_embedding_type == "rope", rotary_base=ma.rotary_base,
        rotary_percent=ma.rotary_percent, add_bias_linear=cfg.add_bias_linear, add_qkv_bias=cfg.add_qkv_bias,
        swiglu=cfg.gated_linear_unit, untie_embeddings_and_output_weights=ma.untie_embeddings_and_output_weights,
        normalization=cfg.normalization, norm_epsilon=cfg.layernorm_epsilon, qk_layernorm=cfg.qk_layernorm,
        vocab_size=ma.vocab_size, padded_vocab_size=ma.padded_vocab_size(lay.tp),
        make_vocab_size_divisible_by=ma.make_vocab_size_divisible_by, tokenizer_type="HuggingFaceTokenizer",
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        num_experts=cfg.num_moe_experts, moe_router_topk=cfg.moe_router_topk,
        moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size,
        moe_layer_freq=cfg.moe_layer_freq,
        multi_latent_attention=bool(getattr(cfg, "multi_latent_attention", False)),
        q_lora_rank=getattr(cfg, "q_lora_rank", None), kv_lora_rank=getattr(cfg, "kv_lora_rank", None),
        qk_head_dim=getattr(cfg, "qk_head_dim", None), qk_pos_emb_head_dim=getattr(cfg, "qk_pos_emb_head_dim", None),
        v_head_dim=getattr(cfg, "v_head_dim", None), mtp_num_layers=getattr(cfg, "mtp_num_layers", None),
        # Megatron-LM: an even split names its chunk size, an uneven one the chunk count
        num_layers_per_virtual_pipeline_stage=(cfg.num_layers // stages if lay.vpp and lay.vpp > 1
                                               and not lay.uneven else None),
        num_virtual_stages_per_pipeline_rank=lay.vpp if lay.vpp and lay.vpp > 1 and lay.uneven else None,
        **lay.split_fields(),
        sequence_parallel=lay.sequence_parallel, consumed_train_samples=0, consumed_valid_samples=0,
        ckpt_format=fmt, rotary_interleaved=cfg.rotary_interleaved, pipeline_dtype=dtype,
        transformer_impl=plan.naming.impl, moe_grouped_gemm=plan.naming.grouped,
    )
    return {**config_fields, **args}


def write_side_files(out: Path, fmt: str, family: str, layout, dtype: torch.dtype, config_dir: Path,
                     tokenizer_dir: Path | None, source: str, command: str, naming: Naming) -> None:
    """hf_config/ (config.json + tokenizer files) and convert_meta.json."""
    dst = out / HF_CONFIG_DIR
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(config_dir) / "config.json", dst / "config.json")
    for src in dict.fromkeys(p for p in (config_dir, tokenizer_dir) if p is not None):
        copy_tokenizer_files(src, dst)
    meta = {"format": fmt, "family": family, "iteration": ITERATION, "layout": layout_dict(layout),
            "dtype": dtype_name(dtype), "transformer_impl": naming.impl, "moe_grouped_gemm": naming.grouped,
            "source": str(source), "created_by": f"megatron-patch convert {command}"}
    (out / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")


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
# torch format writer (streaming)
# ---------------------------------------------------------------------------------------------------
class _RankFile:
    """One model_optim_rng.pt written as structure first, tensor bytes later (pwrite at their offsets)."""

    def __init__(self, path: Path, offsets: dict[tuple[int, str], int]):
        self.path = path
        self.offsets = offsets
        self.fd = os.open(path, os.O_RDWR)

    @classmethod
    def create(cls, root: Path, pos: RankPosition, sizes: dict, metas: list[dict], args: dict) -> "_RankFile":
        placeholders = [{k: None if v is None else torch.empty(v.shape, dtype=v.dtype) for k, v in sd.items()}
                        for sd in metas]  # never touched: no resident memory
        with torch.serialization.skip_data():
            path = mcore_layout.write_rank(root, ITERATION, pos.tp, pos.pp, pos.ep, sizes, placeholders, args)
        del placeholders
        return cls(path, cls._offsets(path))

    @staticmethod
    def _offsets(path: Path) -> dict[tuple[int, str], int]:
        """(chunk, name) -> byte offset of the tensor's record. torch.load(mmap=True) maps the whole file
        once, so a storage's address minus the mapping base is its record offset (nothing is read)."""
        reader = torch._C.PyTorchFileReader(str(path))
        with zipfile.ZipFile(path) as zf:
            sizes = {i.filename.split("/", 1)[1]: i.file_size for i in zf.infolist() if "/" in i.filename}
        records = {reader.get_record_offset(n): sizes.get(n, 0) for n in reader.get_all_records()
                   if n.startswith("data/")}
        loaded = torch_load(path, mmap=True)
        ptrs = {(c, k): (v.untyped_storage().data_ptr(), tensor_bytes(v))
                for c, sd in enumerate(mcore_layout.model_chunks(loaded)) for k, v in sd.items()
                if torch.is_tensor(v) and v.numel()}
        del loaded
        if not ptrs:
            return {}
        base = min(p for p, _ in ptrs.values()) - min(o for o, n in records.items() if n)
        out = {}
        for key, (ptr, nbytes) in ptrs.items():
            offset = ptr - base
            if records.get(offset) != nbytes:
                raise RuntimeError(f"{path}: cannot locate the record of {key} (torch serialization changed?)")
            out[key] = offset
        return out

    def write(self, chunk: int, name: str, tensor: torch.Tensor) -> None:
        view = memoryview(raw_bytes(tensor))
        offset, done = self.offsets[(chunk, name)], 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)

    def close(self) -> None:
        os.close(self.fd)


def dry_run(plan: ShardPlan, meta, dtype: torch.dtype | None) -> dict[RankPosition, list[dict]]:
    """Every rank's state dicts on meta tensors (shapes, dtypes, _extra_state): checks that the layout
    divides every tensor and sizes the output, without reading data."""
    return {pos: plan.rank_state_dicts(meta, pos, dtype, extra_state=True)
            for pp in range(plan.layout.pp) for pos in plan.positions(pp)}


def output_bytes(metas: dict) -> int:
    return sum(tensor_bytes(t) for sds in metas.values() for sd in sds for t in sd.values() if t is not None)


def check_torch_layout(plan: ShardPlan) -> None:
    lay = plan.layout
    if plan.num_experts and lay.tp % lay.expert_tp:
        raise UserError(f"the torch format cannot hold ETP={lay.expert_tp} with TP={lay.tp}: Megatron-LM names rank "
                        "files by TP and EP rank only, so ETP must divide TP; use --format torch_dist")


def write_torch(plan: ShardPlan, source, root: Path, dtype: torch.dtype | None, args: dict, progress,
                metas: dict | None = None) -> None:
    """Megatron-LM torch-format rank files for plan.layout from `source.read(hf_name)`."""
    check_torch_layout(plan)
    metas = metas if metas is not None else dry_run(plan, source.meta, dtype)
    lay = plan.layout
    sizes = layout_dict(lay)
    read_since = 0
    for pp in range(lay.pp):
        files = {(pos.tp, pos.ep): _RankFile.create(root, pos, sizes, metas[pos], args) for pos in plan.positions(pp)}
        stored = plan.stored_names(pp)  # local name -> the name in the file (TE or local spec)
        try:
            for p in plan.placed:
                if p.place.pp != pp:
                    continue
                row, place = p.row, p.place
                group, _ = plan.split_group(row)
                name = plan.local_name(row, place)
                for rank in range(plan.shard_ranks(row)):
                    tensor = plan.shard_row(row, source.read, rank, dtype)
                    targets = [f for (tp, ep), f in files.items()  # every file holding this shard
                               if (place.ep is None or ep == place.ep)
                               and (plan.shard_ranks(row) == 1
                                    or (tp if group == "tp" else tp % lay.expert_tp) == rank)]
                    for f in targets:
                        f.write(place.chunk, stored[place.chunk][name], tensor)
                    nbytes = tensor_bytes(tensor)
                    progress.update(nbytes * len(targets), len(targets))
                    read_since += nbytes * plan.shard_ranks(row)  # ~ the mapped input bytes it touched
                    del tensor
                    if read_since >= RELEASE_BYTES:
                        source.release()
                        read_since = 0
        finally:
            for f in files.values():
                f.close()
        source.release()
    mcore_layout.write_latest(root, ITERATION)


# ---------------------------------------------------------------------------------------------------
# torch_dist writer (one process, streaming: dist_writer)
# ---------------------------------------------------------------------------------------------------
def dist_common_state(plan: ShardPlan, dtype: torch.dtype) -> dict:
    """The non-tensor part of a torch_dist checkpoint (common.pt), args for the target layout."""
    args = mcore_layout.build_args(layout_dict(plan.layout), megatron_args(plan, dtype, "torch_dist"))
    return {"checkpoint_version": mcore_layout.CHECKPOINT_VERSION, "iteration": 0, "args": args}


def dist_total_bytes(source, layout, dtype: torch.dtype) -> int:
    """What write_dist will write (every parameter once, whatever the layout)."""
    from . import dist_writer

    return dist_writer.output_bytes(dist_writer.tp1_plan(source, layout.tp), source.meta, dtype)


def write_dist(source, layout, dtype: torch.dtype, root: Path, progress=None, naming: Naming | None = None) -> dict:
    """A torch_dist checkpoint at root (Megatron-LM layout: tracker + release/) for `layout` from a
    source (HFSource or a Megatron PlanSource). Returns {"tensors", "bytes"}."""
    from . import dist_writer

    ckpt_dir = root / mcore_layout.iteration_dir_name(ITERATION)
    ckpt_dir.mkdir(parents=True)
    naming = naming or Naming(LOCAL)
    common = dist_common_state(ShardPlan(source.family, source.hf_config, layout, naming=naming), dtype)
    stats = dist_writer.save(source, layout.tp, dtype, ckpt_dir, common, progress, naming)
    mcore_layout.write_latest(root, ITERATION)
    return stats


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
    check_layout_values(layout)
    refuse_existing(out, force, inputs=[hf_path])
    source = HFSource(hf_path)
    check_not_fp8(source)
    size_note = declared_size_check(model_size, source)
    layout = normalized_layout(layout)
    plan = ShardPlan(source.family, source.hf_config, layout, naming=naming)
    check_hf_input(source, plan)
    embedding = next((r.hf[0] for r in plan.rows if r.mcore == EMBEDDING), plan.rows[0].hf[0])
    out_dtype = target or source.meta(embedding).dtype  # the checkpoint's dtype when none is asked for
    if fmt == "torch":  # torch_dist holds global tensors: any layout ShardPlan accepts
        check_torch_layout(plan)
    metas = dry_run(plan, source.meta, target)  # also checks that the layout divides every tensor
    total = output_bytes(metas) if fmt == "torch" else dist_total_bytes(source, layout, out_dtype)
    args = megatron_args(plan, out_dtype, fmt)
    result: dict = {}
    with atomic_output_dir(out, force, inputs=[hf_path]) as tmp:
        with ConversionProgress(total, f"hf2mcore {fmt}", force=show_progress) as progress:
            if fmt == "torch":
                write_torch(plan, source, tmp, target, args, progress, metas)
            else:
                write_dist(source, layout, out_dtype, tmp, progress, naming)
            write_side_files(tmp, fmt, source.family.name, layout, out_dtype, source.config_dir, source.path,
                             hf_path, "hf2mcore", naming)
            stats, line = progress.summary()
        result.update(stats, line=line, out=str(Path(out).absolute()), format=fmt, layout=describe(layout),
                      dtype=dtype_name(out_dtype), size_note=size_note, naming=naming.describe())
        if verify:
            result["verify"] = verify_against_hf(tmp, source, target)
    return result


def verify_against_hf(ckpt_root: Path, source: HFSource, dtype: torch.dtype | None) -> str:
    """Convert the written checkpoint back in memory and compare every tensor bit for bit with the input
    (cast to dtype when one was asked for). Raises VerificationFailed on any difference."""
    from .mcore2hf import compare_stream, hf_stream, mcore_source, open_mcore

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
