"""The name and slice math between HF tensors and Megatron rank-local state dicts.

Everything is driven by a family's parameter table (models/families): a row says which HF tensor(s)
make a Megatron parameter and how it is split. This module decides, for a parallel layout,
  * where a global decoder layer lives: (pipeline rank, virtual chunk, stage-local index),
  * which experts an EP rank holds and under which local index,
  * which TP (or expert-TP) slice a rank takes,
and applies the split kinds in both directions. It reads tensors through a callable, so a converter
can pass lazy safetensors slices (only the bytes a rank needs are read) and a test can pass a dict.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from megatron_patch.errors import UserError
from megatron_patch.models.builder import ParallelLayout
from megatron_patch.models.families.base import ShardContext, Vocab
from megatron_patch.models.families.common import ConcreteRow, expand_rows

# Rows without {layer} live on the first stage (embedding) or on the last one (everything else:
# final norm, output layer, MTP).
FIRST_STAGE_PREFIXES = ("embedding.",)


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


class ShardPlan:
    """The family table expanded for one model config and one layout."""

    def __init__(self, family, hf_config, layout: ParallelLayout, mcore_config=None, model_args=None):
        from megatron_patch.models.families import model_args as family_model_args

        self.family = family
        self.layout = layout
        self.mcore_config = mcore_config if mcore_config is not None else family.to_mcore_config(hf_config)
        self.model_args = model_args if model_args is not None else family_model_args(hf_config)
        self.num_layers = self.mcore_config.num_layers
        self.num_experts = self.mcore_config.num_moe_experts or 0
        self.vpp = layout.vpp or 1
        self._check()
        self.rows: list[ConcreteRow] = expand_rows(family.params(hf_config), self.num_layers, self.num_experts)
        self.ctx = _shard_context(self.mcore_config, self.model_args.padded_vocab_size(layout.tp))

    def _check(self) -> None:
        from megatron_patch.models.builder import check_layout

        check_layout(self.layout, self.mcore_config)

    # --- where things live ------------------------------------------------------------------------
    def layer_placement(self, layer: int) -> tuple[int, int, int]:
        """(pp rank, virtual chunk, stage-local index) of a global decoder layer (megatron's offsets:
        chunk c of stage p holds the block c*PP + p of L/(PP*VPP) consecutive layers)."""
        per_chunk = self.num_layers // (self.layout.pp * self.vpp)
        block = layer // per_chunk
        return block % self.layout.pp, block // self.layout.pp, layer % per_chunk

    def placement(self, row: ConcreteRow) -> Placement:
        if row.layer is not None:
            pp, chunk, local = self.layer_placement(row.layer)
        elif row.mcore.startswith(FIRST_STAGE_PREFIXES):
            pp, chunk, local = 0, 0, None
        else:
            pp, chunk, local = self.layout.pp - 1, self.vpp - 1, None
        ep = local_expert = None
        if row.expert is not None:
            per_rank = self.num_experts // self.layout.ep
            ep, local_expert = divmod(row.expert, per_rank)
        return Placement(pp, chunk, local, ep, local_expert)

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

    def rows_for(self, pos: RankPosition) -> Iterator[tuple[ConcreteRow, Placement]]:
        for row in self.rows:
            place = self.placement(row)
            if place.pp == pos.pp and (place.ep is None or place.ep == pos.ep):
                yield row, place

    # --- HF -> Megatron ---------------------------------------------------------------------------
    def rank_state_dicts(self, read: Callable[[str], object], pos: RankPosition,
                         dtype: torch.dtype | None = None) -> list[dict[str, torch.Tensor]]:
        """This rank's state dict for each virtual chunk. `read(hf_name)` returns a lazy tensor."""
        chunks: list[dict[str, torch.Tensor]] = [{} for _ in range(self.vpp)]
        for row, place in self.rows_for(pos):
            group, size = self.split_group(row)
            rank = pos.etp if group == "etp" else pos.tp
            tensor = row.row.split.shard([read(name) for name in row.hf], rank, size, self.ctx)
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            chunks[place.chunk][self.local_name(row, place)] = tensor.contiguous()
        return chunks

    # --- Megatron -> HF ---------------------------------------------------------------------------
    def hf_tensors(self, local: Callable[[RankPosition, int, str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (hf_name, tensor) for every HF tensor, merging TP/ETP shards.

        `local(position, chunk, mcore_name)` returns one rank's tensor."""
        for row in self.rows:
            place = self.placement(row)
            group, size = self.split_group(row)
            name = self.local_name(row, place)
            shards = []
            for rank in range(size):
                pos = RankPosition(tp=rank if group == "tp" else 0, pp=place.pp, ep=place.ep or 0,
                                   etp=rank if group == "etp" else 0)
                shards.append(local(pos, place.chunk, name))
            merged = row.row.split.merge(shards, self.ctx)
            if row.row.split is Vocab:
                merged = [m[: self.model_args.vocab_size] for m in merged]
            yield from zip(row.hf, merged)

    def hf_names(self) -> list[str]:
        return [name for row in self.rows for name in row.hf]


def _shard_context(mcore_config, padded_vocab: int) -> ShardContext:
    return ShardContext(
        num_attention_heads=mcore_config.num_attention_heads,
        num_query_groups=mcore_config.num_query_groups or mcore_config.num_attention_heads,
        kv_channels=mcore_config.kv_channels,
        padded_vocab_size=padded_vocab,
    )


def check_hf_coverage(plan: ShardPlan, hf_keys: Iterable[str]) -> None:
    """Every tensor the table needs is in the checkpoint, and every checkpoint tensor is used."""
    keys = set(hf_keys)
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


def current_position() -> RankPosition:
    """This process's coordinates from megatron's parallel_state."""
    from megatron.core import parallel_state as ps

    return RankPosition(tp=ps.get_tensor_model_parallel_rank(), pp=ps.get_pipeline_model_parallel_rank(),
                        ep=ps.get_expert_model_parallel_rank(), etp=ps.get_expert_tensor_parallel_rank())


def load_into_chunks(chunks: list, plan: ShardPlan, read: Callable[[str], object]) -> None:
    """Load HF tensors into this rank's model chunks in place; every parameter must be covered."""
    state_dicts = plan.rank_state_dicts(read, current_position())
    for chunk, sd in zip(chunks, state_dicts):
        module = getattr(chunk, "module", chunk)  # DDP-wrapped or not
        own = {k for k in module.state_dict() if not k.endswith("_extra_state")}
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
