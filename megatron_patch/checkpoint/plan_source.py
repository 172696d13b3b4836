"""A Megatron state read as HF tensors, one family-table row at a time (`PlanSource`): the interface the
writers take (`read(name)`, `meta(name)`, `keys()`, `expect(names)`, `release()`, as convert.hf2mcore.HFSource),
and `hf_stream`, every HF tensor one pipeline stage at a time. The rank-local tensors come from a
torch-format checkpoint (mcore_reader.TorchSource) or a torch_dist one (dist_reader.DistSource); everything
read is checked against the HF config (output_check)."""
from __future__ import annotations

from pathlib import Path

import torch

from megatron_patch.errors import UserError

from .engine import KEEP_DTYPE_SUFFIXES, ShardPlan, cast
from .output_check import TensorCheck, merge_error
from .tensors import RELEASE_BYTES, tensor_bytes


class PlanSource:
    """HF tensors made from a Megatron state (one row at a time): `read(name)`, `meta(name)`,
    `release()`, the same interface as hf2mcore.HFSource, so the writers take either."""

    def __init__(self, plan: ShardPlan, local, hf_config, family, config_dir=None, local_meta=None):
        self.plan, self.local = plan, local
        self.local_meta = local_meta or (lambda pos, c, n: self.local(pos, c, n).to("meta"))
        self.hf_config, self.family, self.config_dir = hf_config, family, config_dir
        self.check = TensorCheck(hf_config, Path(config_dir or ".") / "config.json", KEEP_DTYPE_SUFFIXES)
        self.local = lambda pos, chunk, name: self.check.local(name, local(pos, chunk, name))
        self._rows = plan.primary_rows()
        self._cached = None
        self._cache: dict[str, torch.Tensor] = {}

    def _row(self, name: str):
        try:
            return self._rows[name]
        except KeyError:
            raise UserError(f"tensor {name} is not made by the {self.family.name} table") from None

    def read(self, name: str) -> torch.Tensor:
        p = self._row(name)
        if p is not self._cached:  # GateUp / QKV rows make several HF tensors: merge once
            try:
                merged = self.plan.merge_row(p.row, p.place, self.local)
            except RuntimeError as err:
                raise merge_error(name, err, self.check.config_path) from None
            self._cache = {n: self.check.hf(n, t) for n, t in zip(p.row.hf, merged)}
            for copy in self.plan._copies_of.get(p.row.mcore, []):
                self._cache[copy] = merged[0]
            self._cached = p
        return self._cache[name]

    def meta(self, name: str) -> torch.Tensor:
        p = self._row(name)
        merged = self.plan.merge_row(p.row, p.place, self.local_meta)
        return merged[p.row.hf.index(name) if name in p.row.hf else 0]

    def keys(self) -> list[str]:
        return list(self._rows)

    def expect(self, hf_names) -> None:
        """A hint of the order the HF tensors will be read in (a source reading in groups plans them)."""

    def release(self) -> None:
        self._cached, self._cache = None, {}


def hf_stream(source: PlanSource, dtype=None):
    """(hf_name, tensor) for every HF tensor, one pipeline stage of the source at a time; what was read
    is dropped every RELEASE_BYTES (merged tensors own their memory; files are mapped again lazily)."""
    touched = 0
    for pp in range(source.plan.layout.pp):
        stream = source.plan.hf_tensors(source.local, pp=pp, dtype=dtype)
        while True:
            try:
                name, tensor = next(stream)
            except StopIteration:
                break
            except RuntimeError as err:
                raise merge_error("a tensor", err, source.check.config_path) from None
            source.check.hf(name, tensor)
            touched += tensor_bytes(tensor)
            if touched >= RELEASE_BYTES:
                source.release()
                touched = 0
            yield name, tensor
        source.release()


def hf_bytes(source: PlanSource, dtype=None) -> int:
    """What hf_stream yields, in bytes (from meta tensors)."""
    return sum(tensor_bytes(cast(p.row.mcore, source.meta(n), dtype)) for n, p in source.plan.primary_rows().items())
