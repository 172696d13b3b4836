"""The Megatron checkpoint writers hf2mcore and reshard share; `source` is anything with the PlanSource
interface (convert.hf2mcore.HFSource, a Megatron checkpoint's mcore_reader/dist_reader source).

torch format (Megatron-LM's `--ckpt-format torch`, iteration `release`): one file per (tp, pp, ep) rank, as
Megatron-LM names them. It streams: each rank file is first written with its pickled structure and reserved
(sparse) space for the tensor bytes (`torch.serialization.skip_data`), then every shard is computed once and
written with pwrite into every file that holds it (an EP-replicated dense weight goes into all EP files of
its TP rank). Peak memory is about one tensor, whatever the model size.

torch_dist: dist_writer (one process, a TP1 model on the meta device, tensors made on demand).

`megatron_args` is the stored `args` Megatron-LM checks and adopts; `write_side_files` adds hf_config/ and
convert_meta.json, so mcore2hf and reshard need nothing else.
"""
from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from pathlib import Path

import torch

from megatron_patch.errors import UserError

from . import dist_writer, mcore_layout
from .engine import RankPosition, ShardPlan
from .hf_config import config_json_text
from .hf_writer import copy_tokenizer_files
from .key_map import Naming
from .mcore_layout import HF_CONFIG_DIR, META_NAME, layout_dict
from .safe_load import torch_load
from .tensors import RELEASE_BYTES, dtype_name, raw_bytes, tensor_bytes

FORMATS = ("torch", "torch_dist")
ITERATION = "release"  # no optimizer state: Megatron-LM loads a release checkpoint as iteration 0


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
    (dst / "config.json").write_text(config_json_text(config_dir))  # MTP the weights lack is dropped
    for src in dict.fromkeys(p for p in (config_dir, tokenizer_dir) if p is not None):
        copy_tokenizer_files(src, dst)
    meta = {"format": fmt, "family": family, "iteration": ITERATION, "layout": layout_dict(layout),
            "dtype": dtype_name(dtype), "transformer_impl": naming.impl, "moe_grouped_gemm": naming.grouped,
            "source": str(source), "created_by": f"megatron-patch convert {command}"}
    (out / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")


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


def dry_run(plan: ShardPlan, meta, dtype: torch.dtype | None, every_rank: bool = True) -> dict[RankPosition, list[dict]]:
    """Every rank's state dicts on meta tensors (shapes, dtypes, _extra_state): checks that the layout
    divides every tensor and sizes the output, without reading data. every_rank=False: one rank per stage,
    the check alone (a shard's shape does not depend on its rank; torch_dist is sized at TP1)."""
    return {pos: plan.rank_state_dicts(meta, pos, dtype, extra_state=True)
            for pp in range(plan.layout.pp) for pos in plan.positions(pp)[:None if every_rank else 1]}


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


def dist_plan(source, plan: ShardPlan) -> ShardPlan:
    """The TP1 plan a torch_dist checkpoint for `plan.layout` is written from (the vocab padded for its TP):
    made once, for dist_total_bytes and write_dist."""
    return dist_writer.tp1_plan(source, plan.layout.tp)


def dist_total_bytes(source, tp1: ShardPlan, dtype: torch.dtype) -> int:
    """What write_dist will write (every parameter once, whatever the layout)."""
    return dist_writer.output_bytes(tp1, source.meta, dtype)


def write_dist(source, plan: ShardPlan, tp1: ShardPlan, dtype: torch.dtype, root: Path, progress=None) -> dict:
    """A torch_dist checkpoint at root (Megatron-LM layout: tracker + release/) for `plan.layout`, with the
    names of `plan.naming`, from a source (HFSource or a Megatron PlanSource) through its TP1 plan `tp1`
    (dist_plan). Returns {"tensors", "bytes"}."""
    ckpt_dir = root / mcore_layout.iteration_dir_name(ITERATION)
    ckpt_dir.mkdir(parents=True)
    stats = dist_writer.save(source, tp1, dtype, ckpt_dir, dist_common_state(plan, dtype), progress, plan.naming)
    mcore_layout.write_latest(root, ITERATION)
    return stats
