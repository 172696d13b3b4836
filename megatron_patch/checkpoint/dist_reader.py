"""A streaming torch_dist reader: one process, the checkpoint's parameters loaded a group at a time.

The model is built at TP1/PP1/EP1 on the meta device with the saved vocab padding (dist_writer's
helpers); its `sharded_state_dict()` says where every parameter lives in the checkpoint. Parameters
are loaded in groups of about GROUP_BYTES (a larger parameter alone), in the order the consumer will
read them (`expect`; table order by default). For a group, real CPU tensors are made for just its
entries and megatron's load pieces run on them (factories built and merged, e.g. the SwiGLU fc1
halves; resharding from whatever layout the checkpoint was saved at), against one torch DCP reader
that keeps the checkpoint's metadata: dist_checkpointing.load would re-read .metadata on every call
(about a second for a DeepSeek-V3-sized checkpoint). A group is dropped before the next is made, so
the resident set is about one group, whatever the model size.

The parameters come out as a PlanSource at TP1, so every writer takes them (HF export, torch-format
rank files at any layout, the torch_dist writer).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterable

import torch

from megatron_patch.errors import UserError

from . import safe_load
from .dist_writer import meta_model, saved_tensors, single_rank, table_entries, tp1_plan
from .key_map import match_sharded
from .plan_source import PlanSource
from .tensors import tensor_bytes

GROUP_BYTES = 256 * 1024**2


def _without_prepended_axes(st):
    """The same chunk with megatron's prepended axes (e.g. the expert index) as size-1 dimensions of the
    tensor, over the same memory. megatron turns a tensor with prepended axes into a torch ShardedTensor
    whose chunks not given here it places on rank (rank + 1) % world, i.e. on this rank in a 1-rank
    group, so a partial load fails; without them it takes DCP's own chunk path, which loads any subset."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if not isinstance(st, ShardedTensor) or not st.prepend_axis_num or st.flattened_range is not None:
        return st
    shape = (1,) * st.prepend_axis_num + tuple(st.local_shape)
    return dataclasses.replace(st, data=st.data.view(shape), local_shape=shape, prepend_axis_num=0)


def load_entries(entries: dict, reader) -> dict[str, torch.Tensor]:
    """Real CPU tensors for some of the model's sharded-state-dict entries (meta data), read from the
    checkpoint by megatron's load steps (dist_checkpointing.load with the torch_dist strategy, minus
    the common state and the access validation, which need the whole model) through `reader`."""
    import torch.distributed.checkpoint as dcp

    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factory_merges
    from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreLoadPlanner, _replace_sharded_keys_with_state_dict_keys, _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict)

    real = {name: dataclasses.replace(e, data=torch.empty_like(e.data, device="cpu")) for name, e in entries.items()}
    sharded, _, factories = load_preprocess(real)  # factories built (views of `real`)
    flat, flat_mapping, rename_mapping = _replace_state_dict_keys_with_sharded_keys(sharded)
    tensors = [st for sts in flat.values() for st in sts if isinstance(st, ShardedTensor)]
    planner = MCoreLoadPlanner(
        shapes_validation_sharded_tensors=[st for st in tensors if not st.allow_shape_mismatch],
        allow_shape_mismatch_sharded_tensors={st.key: st for st in tensors if st.allow_shape_mismatch})
    pyt = mcore_to_pyt_state_dict({k: [_without_prepended_axes(st) for st in sts] for k, sts in flat.items()},
                                  is_loading=True)
    dcp.load(pyt, storage_reader=reader, planner=planner)
    loaded = {key: [st.data for st in sts] for key, sts in flat.items()}  # read in place
    return apply_factory_merges(_replace_sharded_keys_with_state_dict_keys(loaded, flat_mapping, rename_mapping),
                                factories)


class DistSource(PlanSource):
    """A torch_dist checkpoint as a PlanSource at TP1/PP1/EP1, read a group of parameters at a time.
    Use inside dist_writer.single_rank() (open_dist does both)."""

    def __init__(self, ck, budget: int | None = None):
        from megatron.core.dist_checkpointing.core import maybe_load_config
        from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import (
            CachedMetadataFileSystemReader)

        from megatron_patch.models.families import model_args

        safe_load.install()  # DCP's .metadata and stored objects through the restricted loaders
        saved = maybe_load_config(str(ck.ckpt_dir))
        if saved is None or saved.sharded_backend != "torch_dist":
            what = "no dist_checkpointing metadata" if saved is None else f"backend {saved.sharded_backend!r}"
            raise UserError(f"{ck.ckpt_dir}: {what}; only torch_dist checkpoints are read (torch DCP files)")
        padded = ck.padded_vocab() or model_args(ck.hf_config).padded_vocab_size(1)
        plan = tp1_plan(ck, padded_vocab=padded)
        self.reader = CachedMetadataFileSystemReader(str(ck.ckpt_dir))  # .metadata read once
        model_sd = meta_model(ck.hf_config, ck.dtype(), padded).sharded_state_dict()
        # the checkpoint's names (local or TE spec) decide the keys read; a mismatch is refused here
        model_sd, self.naming = match_sharded(model_sd, set(self.reader.read_metadata().state_dict_metadata),
                                              str(ck.ckpt_dir), extra_state=False)
        self.entries = table_entries(plan, model_sd)
        self.budget = budget or GROUP_BYTES
        super().__init__(plan, self._local, ck.hf_config, ck.family, ck.config_dir, local_meta=self._meta)
        self._check(self.reader.read_metadata().state_dict_metadata)
        self.loaded: dict[str, torch.Tensor] = {}
        self.loads = 0
        self.expect(plan.hf_names())  # table order (hf_tensors)

    def _check(self, stored: dict) -> None:
        """Every parameter's checkpoint key is stored, with the model's global shape: a mismatch fails
        here, before anything is written (the vocab rows may differ: megatron pads or cuts them)."""
        for entry in self.entries.values():
            for st in saved_tensors(entry):
                md = stored.get(st.key)
                size = None if md is None else tuple(getattr(md, "size", ()))
                if size is None or (size != tuple(st.global_shape) and not st.allow_shape_mismatch):
                    found = "is not stored" if size is None else f"is stored with shape {list(size)}"
                    raise UserError(f"{self.reader.path}: {st.key} {found}, the model of {self.config_dir}/"
                                    f"config.json has {list(st.global_shape)}; the checkpoint does not match "
                                    "that config (wrong --hf-config?)")

    def expect(self, hf_names: Iterable[str]) -> None:
        """Group the parameters for reading the HF tensors in this order (each group up to the budget)."""
        self.groups: list[list[str]] = []
        self.group_of: dict[str, int] = {}
        size = 0
        for hf in hf_names:
            name = self._name(hf)
            if name in self.group_of:
                continue
            nbytes = tensor_bytes(self.entries[name].data)
            if not self.groups or (self.groups[-1] and size + nbytes > self.budget):
                self.groups.append([])
                size = 0
            self.groups[-1].append(name)
            self.group_of[name] = len(self.groups) - 1
            size += nbytes

    def _name(self, hf: str) -> str:
        p = self._row(hf)
        return self.plan.local_name(p.row, p.place)

    def _meta(self, pos, chunk: int, name: str) -> torch.Tensor:
        return self.entries[name].data

    def _local(self, pos, chunk: int, name: str) -> torch.Tensor:
        if name not in self.loaded:  # read out of the expected order: the group is loaded again
            group = self.groups[self.group_of[name]] if name in self.group_of else [name]
            self.loaded = {}  # drop the previous group first
            self.loaded = self._load(group)
        return self.loaded[name]

    def _load(self, names: list[str]) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.api import CheckpointException

        self.loads += 1
        try:
            return load_entries({n: self.entries[n] for n in names}, self.reader)
        except CheckpointException as err:  # DCP wraps what a step raised (keys and shapes were checked)
            refused = safe_load.refusal_in(err)
            if refused is not None:
                raise refused from None
            cause = next(iter(err.failures.values()))[0]
            first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:300]
            raise UserError(f"{self.reader.path}: cannot read {names[0]} ({first}); the checkpoint is "
                            "incomplete or damaged") from None

    def release(self) -> None:
        super().release()  # the loaded group stays: it is bounded, and reading it again would cost


@contextlib.contextmanager
def open_dist(ck, budget: int | None = None):
    """A DistSource for the block (with the 1-rank process group it reads in)."""
    with single_rank():
        source = DistSource(ck, budget)
        try:
            yield source
        finally:
            source.loaded = {}
