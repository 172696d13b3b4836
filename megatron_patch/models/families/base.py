"""What a model family is: one declarative table that drives building, conversion and comparison.

A family file (deepseek.py, qwen2.py, ...) builds a `Family` from small pieces:
  * `config_map`: how an HF config becomes a megatron-core TransformerConfig,
  * `params`: rows mapping Megatron parameter names to HF names with a split kind,
  * `hooks`: pairs of module paths to compare activations at.

Names use `{layer}` (global decoder layer index in HF, stage-local index in Megatron: the engine
maps between them) and `{expert}` (global expert in HF, EP-local in Megatron). A row whose Megatron
name contains `{expert}` is an expert parameter: it is split over EP by expert and over ETP (the
expert tensor-parallel size) instead of TP.

Split kinds know how to cut the HF tensor(s) for one TP rank (`shard`) and how to put the TP shards
back together into HF tensors (`merge`). `shard` takes lazy tensors (anything with `.shape` and
slicing, e.g. safetensors' get_slice) so a converter reads only the bytes a rank needs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch


class LazyTensor(Protocol):
    shape: Sequence[int]

    def __getitem__(self, index) -> torch.Tensor: ...


@dataclass(frozen=True)
class ShardContext:
    """Model facts the split kinds need (taken from the megatron-core config)."""

    num_attention_heads: int = 0
    num_query_groups: int = 0
    kv_channels: int = 0
    padded_vocab_size: int = 0


def _range(n: int, rank: int, size: int, what: str) -> slice:
    if n % size:
        raise ValueError(f"{what}: dimension {n} is not divisible by the parallel size {size}")
    step = n // size
    return slice(rank * step, (rank + 1) * step)


class SplitKind:
    """How HF tensor(s) map onto one Megatron tensor split over a tensor-parallel group."""

    name = "?"
    num_hf = 1
    replicated = False  # the same tensor on every TP rank (one shard)

    def shard(self, hf: Sequence[LazyTensor], rank: int, size: int, ctx: ShardContext) -> torch.Tensor:
        raise NotImplementedError

    def merge(self, shards: Sequence[torch.Tensor], ctx: ShardContext) -> list[torch.Tensor]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class _Replicated(SplitKind):
    name = "Replicated"
    replicated = True

    def shard(self, hf, rank, size, ctx):
        return hf[0][...]

    def merge(self, shards, ctx):
        return [shards[0]]


class _Column(SplitKind):
    """Split along dim 0 (output features of a ColumnParallelLinear)."""

    name = "Column"

    def shard(self, hf, rank, size, ctx):
        return hf[0][_range(hf[0].shape[0], rank, size, self.name)]

    def merge(self, shards, ctx):
        return [torch.cat(list(shards), dim=0)]


class _Row(SplitKind):
    """Split along dim 1 (input features of a RowParallelLinear)."""

    name = "Row"

    def shard(self, hf, rank, size, ctx):
        return hf[0][:, _range(hf[0].shape[1], rank, size, self.name)]

    def merge(self, shards, ctx):
        return [torch.cat(list(shards), dim=1)]


class _GateUp(SplitKind):
    """HF gate_proj and up_proj -> Megatron fc1; each TP rank holds [gate_i; up_i]."""

    name = "GateUp"
    num_hf = 2

    def shard(self, hf, rank, size, ctx):
        gate, up = hf
        return torch.cat([gate[_range(gate.shape[0], rank, size, self.name)],
                          up[_range(up.shape[0], rank, size, self.name)]], dim=0)

    def merge(self, shards, ctx):
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves], dim=0), torch.cat([h[1] for h in halves], dim=0)]


class _FusedGateUp(SplitKind):
    """One HF tensor holding [gate; up] stacked on dim 0 (e.g. transformers' fused experts)."""

    name = "FusedGateUp"

    def shard(self, hf, rank, size, ctx):
        rows = hf[0].shape[0] // 2
        part = _range(rows, rank, size, self.name)
        return torch.cat([hf[0][part], hf[0][slice(rows + part.start, rows + part.stop)]], dim=0)

    def merge(self, shards, ctx):
        gate, up = _GateUp().merge(shards, ctx)
        return [torch.cat([gate, up], dim=0)]


class _QKV(SplitKind):
    """HF q_proj, k_proj, v_proj -> Megatron linear_qkv, interleaved per query group:
    for each group g: [q heads of g, k_g, v_g]. TP splits whole groups. Works for weights and biases."""

    name = "QKV"
    num_hf = 3

    def _groups(self, ctx, size):
        if ctx.num_query_groups % size:
            raise ValueError(f"QKV: {ctx.num_query_groups} query groups not divisible by TP={size}")
        return ctx.num_query_groups // size, ctx.num_attention_heads // ctx.num_query_groups

    def shard(self, hf, rank, size, ctx):
        q, k, v = hf
        d = ctx.kv_channels
        local_groups, q_per_group = self._groups(ctx, size)
        pieces = []
        for g in range(rank * local_groups, (rank + 1) * local_groups):
            pieces.append(q[g * q_per_group * d:(g + 1) * q_per_group * d])
            pieces.append(k[g * d:(g + 1) * d])
            pieces.append(v[g * d:(g + 1) * d])
        return torch.cat(pieces, dim=0)

    def merge(self, shards, ctx):
        d = ctx.kv_channels
        q_per_group = ctx.num_attention_heads // ctx.num_query_groups
        full = torch.cat(list(shards), dim=0)
        grouped = full.reshape(ctx.num_query_groups, (q_per_group + 2) * d, *full.shape[1:])
        q, k, v = grouped.split([q_per_group * d, d, d], dim=1)
        tail = full.shape[1:]
        return [q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)]


class _Vocab(SplitKind):
    """Embedding / output layer: pad rows to the padded vocab size, then split dim 0. Padding rows are
    zeros. merge only concatenates the shards (padding included): callers strip it with strip_vocab_padding,
    knowing the HF vocab size."""

    name = "Vocab"

    def shard(self, hf, rank, size, ctx):
        rows = hf[0].shape[0]
        part = _range(ctx.padded_vocab_size, rank, size, self.name)
        real = hf[0][slice(min(part.start, rows), min(part.stop, rows))]
        pad = (part.stop - part.start) - real.shape[0]
        if pad:
            real = torch.cat([real, real.new_zeros((pad, *real.shape[1:]))], dim=0)
        return real

    def merge(self, shards, ctx):
        return [torch.cat(list(shards), dim=0)]


class IndexerRope(SplitKind):
    """DeepSeek-V3.2's DSA indexer rows (wq_b per head, wk, k_norm weight and bias): replicated over TP,
    rows reordered within each head. HF puts the rotary dims first, rotated half-split (rotate_half);
    megatron's DSAIndexer takes [no-rope, rope] and de-interleaves the rope part before rotating (as MLA),
    so megatron's rope row 2i is HF's i and row 2i+1 HF's i + rope/2. The indexer only uses q.k, and the
    same order on q and k (k_norm included) leaves every score unchanged."""

    name = "IndexerRope"
    replicated = True

    def __init__(self, head_dim: int, rope_dim: int):
        if rope_dim % 2 or not 0 < rope_dim <= head_dim:
            raise ValueError(f"IndexerRope: rope dim {rope_dim} must be even and <= head dim {head_dim}")
        half = rope_dim // 2
        rope = [j for i in range(half) for j in (i, i + half)]
        self.order = torch.tensor(list(range(rope_dim, head_dim)) + rope)  # megatron row k <- HF row order[k]
        self.head_dim = head_dim

    def _rows(self, n: int) -> torch.Tensor:
        if n % self.head_dim:
            raise ValueError(f"IndexerRope: {n} rows are not whole heads of {self.head_dim}")
        return (torch.arange(0, n, self.head_dim)[:, None] + self.order[None, :]).reshape(-1)

    def shard(self, hf, rank, size, ctx):
        full = hf[0][...]
        return full[self._rows(full.shape[0])]

    def merge(self, shards, ctx):
        out = torch.empty_like(shards[0])
        out[self._rows(out.shape[0])] = shards[0]
        return [out]


Replicated = _Replicated()
Column = _Column()
Row = _Row()
GateUp = _GateUp()
FusedGateUp = _FusedGateUp()
QKV = _QKV()
Vocab = _Vocab()


def strip_vocab_padding(tensor: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return tensor[:vocab_size]


@dataclass(frozen=True)
class ParamRow:
    """One Megatron parameter and the HF tensor(s) it is made from."""

    mcore: str
    hf: tuple[str, ...]
    split: SplitKind
    # Global decoder layers the row exists in (for `{layer}` rows whose module is only in some layers,
    # e.g. MoE vs dense MLP); None means every decoder layer (or the row has no `{layer}`).
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        if len(self.hf) != self.split.num_hf:
            raise ValueError(f"{self.mcore}: {self.split} takes {self.split.num_hf} HF tensors, got {self.hf}")

    @property
    def is_expert(self) -> bool:
        return "{expert}" in self.mcore


def row(mcore: str, hf: str | tuple[str, ...], split: SplitKind = Replicated,
        layers: Sequence[int] | None = None) -> ParamRow:
    return ParamRow(mcore, (hf,) if isinstance(hf, str) else tuple(hf), split,
                    None if layers is None else tuple(layers))


@dataclass(frozen=True)
class HookPoint:
    """Where to compare activations: a Megatron module path and the HF module path computing the same
    thing. `kind` tells the comparator how to read/normalise the output (e.g. 'hidden', 'router',
    'logits'); `{layer}` is expanded over the layers where both modules exist."""

    component: str
    mcore: str
    hf: str
    kind: str = "hidden"


@dataclass
class Family:
    """Everything megatron_patch knows about one model family."""

    name: str
    hf_architectures: tuple[str, ...]
    hf_model_type: str
    # HF config -> (TransformerConfig or MLATransformerConfig). Raises on unknown/unsupported fields.
    to_mcore_config: Callable[..., Any]
    # HF config -> list of ParamRow (may depend on the config: q_lora, dense vs MoE layers, MTP).
    params: Callable[[Any], list[ParamRow]]
    # mcore config -> megatron-core layer spec (ModuleSpec) or a TransformerBlockSubmodules.
    layer_spec: Callable[[Any], Any]
    hooks: Callable[[Any], list[HookPoint]] = field(default=lambda hf_config: [])
    # Presets for make-mini: name -> dict of HF config overrides.
    presets: dict[str, dict] = field(default_factory=dict)
