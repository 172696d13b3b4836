"""The name and slice math between HF tensors and Megatron rank-local state dicts.

Everything is driven by a family's parameter table (models/families): a row says which HF tensor(s)
make a Megatron parameter and how it is split. This module decides, for a parallel layout,
  * where a global decoder layer lives: (pipeline rank, virtual chunk, stage-local index),
  * which experts an EP rank holds and under which local index,
  * which TP (or expert-TP) slice a rank takes,
and applies the split kinds in both directions. It reads tensors through a callable, so a converter
can pass lazy safetensors slices (only the bytes a rank needs are read) and a test can pass a dict.

Besides the table rows, a layout may need copies of a row on another stage ("placed" rows that are not
primary): megatron-core gives the last pipeline stage its own embedding when it runs MTP, and its own
output_layer.weight when embeddings are tied. Imports write them; exports read the primary only. HF
tensors that duplicate a table tensor (`hf_copies`, e.g. DeepSeek-V3 MTP's embed_tokens) are skipped
on import and written back as copies on export.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from megatron_patch.errors import UserError
from megatron_patch.models.builder import ParallelLayout
from megatron_patch.models.families.base import Replicated, Vocab
from megatron_patch.models.families.common import ConcreteRow, expand_rows, shard_context

from megatron_patch.checkpoint.key_map import EXTRA as EXTRA_STATE
from megatron_patch.checkpoint.key_map import LOCAL, Naming, name_map, te_name, to_te

GROUPED_EXPERT = re.compile(r".*\.experts\.linear_fc[12]\.weight\d+")

# Rows without {layer}: the embedding on the first stage, the output layer on the last, MTP and the
# final norm where megatron-core builds them for the layout (ShardPlan.stage_of).
FIRST_STAGE_PREFIXES = ("embedding.",)
MTP_PREFIX = "mtp."
FINAL_NORM_PREFIX = "decoder.final_layernorm."
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"
# megatron-core keeps these in fp32 whatever params_dtype is (TopKRouter.expert_bias): never cast them.
KEEP_DTYPE_SUFFIXES = (".expert_bias",)



@dataclass(frozen=True)
class RankPosition:
    """A rank's coordinates in the layout (tp/etp: tensor and expert-tensor parallel ranks)."""

    tp: int = 0
    pp: int = 0
    ep: int = 0
    etp: int = 0


@dataclass(frozen=True)
class Placement:
    pp: int
    chunk: int
    local_layer: int | None
    ep: int | None
    local_expert: int | None


@dataclass(frozen=True)
class Placed:
    """A row at one place of the layout; `primary` is False for a stage-local copy (import only)."""

    row: ConcreteRow
    place: Placement
    primary: bool = True


def cast(name: str, tensor, dtype: torch.dtype | None):
    """Cast a floating tensor to dtype (None: keep), except the ones megatron keeps in fp32."""
    if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype or name.endswith(KEEP_DTYPE_SUFFIXES):
        return tensor
    return tensor.to(dtype)


def has_extra_state(row: ConcreteRow) -> bool:
    """Whether the row's module is a megatron Column/RowParallelLinear (its state dict carries an
    `_extra_state` entry, None for the local modules). Every split-kind except Replicated is one, the
    vocab-parallel embedding aside; replicated linears are the spec's DuplicatedLinear (none)."""
    return not row.row.split.replicated and not row.mcore.startswith(FIRST_STAGE_PREFIXES)


class ShardPlan:
    """The family table expanded for one model config and one layout."""

    def __init__(self, family, hf_config, layout: ParallelLayout, mcore_config=None, model_args=None,
                 naming: Naming | None = None):
        from megatron_patch.models.families import model_args as family_model_args

        self.family = family
        self.naming = naming or Naming(LOCAL)  # the names written (key_map); the table holds local ones
        self.layout = layout
        self.mcore_config = mcore_config if mcore_config is not None else family.to_mcore_config(hf_config)
        self.model_args = model_args if model_args is not None else family_model_args(hf_config)
        self.num_layers = self.mcore_config.num_layers
        self.num_experts = self.mcore_config.num_moe_experts or 0
        self.vpp = layout.vpp or 1
        self._check()
        from megatron_patch.models.pipeline import stage_map

        self.stages = stage_map(self.mcore_config, layout)
        self.rows: list[ConcreteRow] = expand_rows(family.params(hf_config), self.num_layers, self.num_experts)
        self.ctx = shard_context(self.mcore_config, self.model_args, layout.tp)
        self.placed: list[Placed] = self._place_rows()
        from megatron_patch.models.families import hf_copies

        self.copies: dict[str, str] = hf_copies(hf_config)  # HF copy name -> Megatron (global) name
        self._copies_of: dict[str, list[str]] = {}
        for hf_name, mcore in self.copies.items():
            self._copies_of.setdefault(mcore, []).append(hf_name)

    def _check(self) -> None:
        from megatron_patch.models.builder import check_layout

        check_layout(self.layout, self.mcore_config)

    # --- where things live ------------------------------------------------------------------------
    def layer_placement(self, layer: int) -> tuple[int, int, int]:
        """(pp rank, virtual chunk, stage-local index) of a global decoder layer, as megatron-core places
        it for this layout (models/pipeline.stage_map: even, uneven first/last, or a layout string)."""
        return self.stages.locate(layer)

    def placement(self, row: ConcreteRow) -> Placement:
        if row.layer is not None:
            pp, chunk, local = self.layer_placement(row.layer)
        else:
            (pp, chunk), local = self.stage_of(row.mcore), None
        ep = local_expert = None
        if row.expert is not None:
            per_rank = self.num_experts // self.layout.ep
            ep, local_expert = divmod(row.expert, per_rank)
        return Placement(pp, chunk, local, ep, local_expert)

    def stage_of(self, mcore_name: str) -> tuple[int, int]:
        """The stage of a row outside the decoder layers: the embedding on the first, MTP where the layout
        builds it, the final norm with the last decoder layer when there is MTP (megatron-core's
        TransformerBlock.has_final_layernorm_in_this_stage), the output layer on the last."""
        if mcore_name.startswith(FIRST_STAGE_PREFIXES):
            return self.stages.first
        if mcore_name.startswith(MTP_PREFIX):
            return self.stages.mtp
        if mcore_name.startswith(FINAL_NORM_PREFIX):
            return self.stages.final_norm
        return self.stages.last

    def local_name(self, row: ConcreteRow, place: Placement) -> str:
        fmt = {}
        if place.local_layer is not None:
            fmt["layer"] = place.local_layer
        if place.local_expert is not None:
            fmt["expert"] = place.local_expert
        return row.row.mcore.format(**fmt)

    def split_group(self, row: ConcreteRow) -> tuple[str, int]:
        """Expert rows are split over expert-TP, everything else over TP."""
        return ("etp", self.layout.expert_tp) if row.row.is_expert else ("tp", self.layout.tp)

    def _place_rows(self) -> list[Placed]:
        first, last, mtp = self.stages.first, self.stages.last, self.stages.mtp
        out = []
        embedding = None
        for row in self.rows:
            out.append(Placed(row, self.placement(row)))
            if row.mcore == EMBEDDING:
                embedding = row
        if embedding is not None:
            if mtp is not None and mtp != first:  # GPTModel: mtp_process builds an embedding
                out.append(Placed(embedding, Placement(mtp[0], mtp[1], None, None, None), primary=False))
            if last != first and not self.model_args.untie_embeddings_and_output_weights:  # tied: the last
                tied = dataclasses.replace(embedding.row, mcore=OUTPUT_LAYER)  # stage's output layer holds a copy
                out.append(Placed(ConcreteRow(OUTPUT_LAYER, embedding.hf, tied),
                                  Placement(last[0], last[1], None, None, None), primary=False))
        return out

    def rows_for(self, pos: RankPosition) -> Iterator[tuple[ConcreteRow, Placement]]:
        for p in self.placed:
            if p.place.pp == pos.pp and (p.place.ep is None or p.place.ep == pos.ep):
                yield p.row, p.place

    def shard_ranks(self, row: ConcreteRow) -> int:
        """How many distinct shards a row has (1 for replicated rows)."""
        return 1 if row.row.split.replicated else self.split_group(row)[1]

    def positions(self, pp: int) -> list[RankPosition]:
        """Every (tp, ep) position of a stage, as Megatron-LM's torch format names its files. A rank's
        expert-TP rank follows megatron's order (TP fastest; expert grid ETP fastest): etp = tp % ETP,
        which needs ETP to divide TP (checked by the writers that use this)."""
        etp = self.layout.expert_tp
        return [RankPosition(tp=t, pp=pp, ep=e, etp=t % etp) for t in range(self.layout.tp)
                for e in range(self.layout.ep)]

    # --- HF -> Megatron ---------------------------------------------------------------------------
    def shard_row(self, row: ConcreteRow, read: Callable[[str], object], rank: int,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
        """One shard (TP or ETP rank `rank`) of a row, cast to dtype."""
        group, size = self.split_group(row)
        try:
            tensor = row.row.split.shard([read(name) for name in row.hf], rank, size, self.ctx)
        except ValueError as err:  # a dimension the layout does not divide
            raise UserError(f"{row.mcore}: {err}; pick a {group.upper()} size that divides it") from None
        return cast(row.mcore, tensor, dtype).contiguous()

    def rank_state_dicts(self, read: Callable[[str], object], pos: RankPosition,
                         dtype: torch.dtype | None = None, extra_state: bool = False) -> list[dict]:
        """This rank's state dict for each virtual chunk. `read(hf_name)` returns a lazy tensor (a meta
        tensor gives a dry run: shapes and dtypes only). extra_state adds the `_extra_state: None`
        entries megatron's linear layers put in a state dict (Megatron-LM loads strictly)."""
        chunks: list[dict] = [{} for _ in range(self.vpp)]
        for row, place in self.rows_for(pos):
            rank = pos.etp if self.split_group(row)[0] == "etp" else pos.tp
            chunks[place.chunk][self.local_name(row, place)] = self.shard_row(row, read, rank, dtype)
        if extra_state and self.naming.is_te:
            last = (self.layout.pp - 1, self.vpp - 1)
            return [to_te(sd, self.naming.grouped, (pos.pp, chunk) == last) for chunk, sd in enumerate(chunks)]
        if extra_state:
            for chunk, sd in enumerate(chunks):
                for key in self.extra_state_keys(pos, chunk):
                    sd[key] = None
        return chunks

    def stored_names(self, pp: int) -> list[dict[str, str]]:
        """Per virtual chunk of stage pp: local parameter name -> the name written (plan.naming)."""
        names: list[list[str]] = [[] for _ in range(self.vpp)]
        for row, place in self.rows_for(RankPosition(pp=pp)):
            names[place.chunk].append(self.local_name(row, place))
        return [name_map(n, self.naming) for n in names]

    def local_names(self, pos: RankPosition) -> list[set[str]]:
        """Per virtual chunk: the local-spec parameter names this rank holds."""
        names: list[set[str]] = [set() for _ in range(self.vpp)]
        for row, place in self.rows_for(pos):
            names[place.chunk].add(self.local_name(row, place))
        return names

    def extra_state_keys(self, pos: RankPosition, chunk: int) -> list[str]:
        keys = {self.local_name(row, place).rsplit(".", 1)[0] + EXTRA_STATE
                for row, place in self.rows_for(pos) if place.chunk == chunk and has_extra_state(row)}
        if (pos.pp, chunk) == (self.layout.pp - 1, self.vpp - 1):  # post_process: output_layer exists even
            keys.add(OUTPUT_LAYER.rsplit(".", 1)[0] + EXTRA_STATE)  # when tied (then without a weight)
        return sorted(keys)

    # --- Megatron -> HF ---------------------------------------------------------------------------
    def merge_row(self, row: ConcreteRow, place: Placement,
                  local: Callable[[RankPosition, int, str], torch.Tensor]) -> list[torch.Tensor]:
        """The HF tensors of one row from its TP/ETP shards (vocab padding stripped)."""
        group, size = self.split_group(row)
        name = self.local_name(row, place)
        if row.row.split.replicated:
            size = 1
        shards = []
        for rank in range(size):
            pos = RankPosition(tp=rank if group == "tp" else 0, pp=place.pp, ep=place.ep or 0,
                               etp=rank if group == "etp" else 0)
            shards.append(local(pos, place.chunk, name))
        merged = row.row.split.merge(shards, self.ctx)
        if row.row.split is Vocab:
            merged = [m[: self.model_args.vocab_size] for m in merged]
        elif row.row.split is Replicated:  # never alias a rank tensor (a memory-mapped file stays mapped
            merged = [m.clone() for m in merged]  # as long as any view of it lives)
        return merged

    def hf_tensors(self, local: Callable[[RankPosition, int, str], torch.Tensor], pp: int | None = None,
                   dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (hf_name, tensor) for every HF tensor (copies included), merging TP/ETP shards.

        `local(position, chunk, mcore_name)` returns one rank's tensor. `pp` keeps the rows stored on
        that pipeline stage (to read a checkpoint one stage at a time); dtype casts (see `cast`)."""
        for p in self.placed:
            row, place = p.row, p.place
            if not p.primary or (pp is not None and place.pp != pp):
                continue
            copies = self._copies_of.get(row.mcore, [])
            merged = [cast(row.mcore, t, dtype) for t in self.merge_row(row, place, local)]
            yield from zip(row.hf, merged)
            for copy in copies:
                yield copy, merged[0].clone()  # a tensor of its own: safetensors refuses shared storage

    def primary_rows(self) -> dict[str, Placed]:
        """HF name (copies included) -> the primary placed row that makes it."""
        out = {}
        for p in self.placed:
            if p.primary:
                for name in list(p.row.hf) + self._copies_of.get(p.row.mcore, []):
                    out[name] = p
        return out

    def hf_names(self, copies: bool = False) -> list[str]:
        names = [name for row in self.rows for name in row.hf]
        return names + list(self.copies) if copies else names


def check_hf_coverage(plan: ShardPlan, hf_keys: Iterable[str]) -> None:
    """Every tensor the table needs is in the checkpoint, and every checkpoint tensor is used (HF copies
    of a table tensor are allowed, not required: export writes them)."""
    keys = set(hf_keys) - set(plan.copies)
    needed = plan.hf_names()
    missing = [n for n in needed if n not in keys]
    if missing:
        raise UserError(f"checkpoint lacks {len(missing)} tensor(s) the {plan.family.name} table needs, e.g. "
                        f"{missing[0]}; is the config.json from the same model?")
    unused = sorted(keys - set(needed))
    if unused:
        raise UserError(f"checkpoint has {len(unused)} tensor(s) the {plan.family.name} table does not map, "
                        f"e.g. {unused[0]}; the config does not match the weights, or the family table "
                        "misses a row")


def check_hf_copies(plan: ShardPlan, read: Callable[[str], object], rows_per_block: int = 4096) -> None:
    """The HF tensors the table treats as copies (DeepSeek-V3 MTP's embed_tokens / shared_head.head) must
    equal their primary byte for byte: import keeps the primary only (megatron-core shares one embedding
    and output layer), so a copy that differs would be dropped silently. Compared in row blocks."""
    primary = {row.mcore: row.hf[0] for row in plan.rows if len(row.hf) == 1}
    for copy_name, mcore in plan.copies.items():
        a, b = read(primary[mcore]), read(copy_name)
        if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
            raise UserError(f"{copy_name} {list(b.shape)} {b.dtype} should be a copy of {primary[mcore]} "
                            f"{list(a.shape)} {a.dtype}; megatron-core cannot hold both")
        for start in range(0, a.shape[0], rows_per_block):
            stop = min(start + rows_per_block, a.shape[0])
            if not torch.equal(a[start:stop], b[start:stop]):
                raise UserError(f"{copy_name} differs from {primary[mcore]} (rows {start}..{stop - 1}); megatron-core "
                                "shares one tensor for both, so this checkpoint cannot be converted exactly")


def check_hf_checkpoint(plan: ShardPlan, ckpt) -> None:
    """An open HFCheckpoint against the table before loading from it in memory (compare, --load-hf): the
    same name and MTP-copy checks as hf2mcore, so no tensor is dropped without a word."""
    check_hf_coverage(plan, ckpt.keys())
    check_hf_copies(plan, ckpt.get_slice)


def current_position() -> RankPosition:
    """This process's coordinates from megatron's parallel_state."""
    from megatron.core import parallel_state as ps

    return RankPosition(tp=ps.get_tensor_model_parallel_rank(), pp=ps.get_pipeline_model_parallel_rank(),
                        ep=ps.get_expert_model_parallel_rank(), etp=ps.get_expert_tensor_parallel_rank())


def as_model_names(sd: dict, model_names) -> dict:
    """A local-spec state dict (SequentialMLP experts) under the names the model has: TE-spec fused norms
    (`linear_qkv.layer_norm_weight`, ...) and grouped experts (`linear_fc1.weight{e}`) where the model has
    those (key_map.te_name); unchanged for a local-spec model with SequentialMLP."""
    model_names = set(model_names)
    grouped = any(GROUPED_EXPERT.fullmatch(k) for k in model_names)
    names = set(sd)
    out = {}
    for key, value in sd.items():
        new = te_name(key, names, grouped=grouped)
        out[new if new in model_names else key] = value
    return out


def load_into_chunks(chunks: list, plan: ShardPlan, read: Callable[[str], object]) -> None:
    """Load HF tensors into this rank's model chunks in place; every parameter must be covered."""
    state_dicts = plan.rank_state_dicts(read, current_position())
    for chunk, sd in zip(chunks, state_dicts):
        module = getattr(chunk, "module", chunk)  # DDP-wrapped or not
        own = {k for k in module.state_dict() if not k.endswith("_extra_state")}
        sd = as_model_names(sd, own)
        missing = sorted(own - set(sd))
        extra = sorted(set(sd) - own)
        if missing or extra:
            raise UserError(f"family table and model disagree: missing {missing[:3]} unexpected {extra[:3]}")
        with torch.no_grad():
            for name, tensor in module.state_dict(keep_vars=True).items():
                if name in sd:
                    if tuple(tensor.shape) != tuple(sd[name].shape):
                        raise UserError(f"{name}: checkpoint shard has shape {tuple(sd[name].shape)}, model "
                                        f"expects {tuple(tensor.shape)}; config and weights disagree")
                    tensor.copy_(sd[name])
