"""LoRA adapters on megatron-core's tensor-parallel linears, named by HF module (q_proj, ..., down_proj).

The family table's rows say which megatron linear an HF module lives in and how it is split over TP
(Column, Row, QKV, GateUp); an adapter follows the same split as its base weight:

- column-parallel base (linear_qkv, linear_fc1): A [T*r, in] replicated (one r-block per adapted HF module),
  B local [out_local, T*r] = the HF modules' B matrices sharded by the row's split kind (QKV grouping, [gate_i;
  up_i]); a fixed block mask keeps module m's output rows reading only its own r columns (peft's per-module
  adapters exactly). x (gathered over SP) @ A^T, its gradient all-reduced over TP, then @ B_local^T.
- row-parallel base (linear_proj, linear_fc2): A local [r, in_local] sharded like the weight, x_local @ A^T
  reduced over TP (reduce-scattered under SP), then @ B^T with B [out, r] replicated (its gradient summed
  over TP under SP).
- replicated base (MLA's q/kv down-projections, runtime/modules.py DuplicatedLinear): A and B replicated, applied to
  the rank's own tokens; under SP their gradients are partial per rank and summed over TP like the weight's.

MLA names (q_a_proj, q_b_proj, q_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj) come from the DeepSeek tables: q_proj
exists only without q_lora (V2-Lite), q_a_proj/q_b_proj only with it, so an MLA model skips whichever it lacks (as
peft does). A name in several rows (gate_proj: dense MLP and shared experts) adapts each, in the layers the row
exists in.

Routed experts (`experts`) get one adapter per expert on fc1 ([gate; up] rows: one A, one B, like peft's single
adapter on transformers 5's fused gate_up_proj) and on fc2: A [r, in], B [out, r]; the token dispatcher moves the
tokens (and does the expert-TP gather / reduce-scatter). Under expert tensor parallelism an adapter is split like
its base weight: fc1 (column parallel) keeps A whole and B's rows of this rank ([gate_i; up_i], as megatron splits
fc1), fc2 (row parallel) A's input columns of this rank and B whole; the whole factor's gradient is summed over the
expert-TP group (runtime/grouped_experts.expert_adapter_factors). SequentialMLP's expert linears are wrapped
(ExpertLoRALinear); the portable grouped experts (runtime/grouped_experts.py) hold `lora_A{i}` / `lora_B{i}` beside
`weight{i}` and fold W + alpha/r * B A into their grouped GEMM (as peft's ParamWrapper does; with the local parts
that is this rank's slice of the merged weight). Both save `mlp.experts.linear_fcN.lora_A/B` on the global expert
axis, B of fc1 as [gate; up], so the checkpoint depends on neither EP, expert TP nor the experts' implementation.
peft's ParamWrapper has no dropout: `experts` refuses --lora-dropout > 0.

A is initialised like peft (uniform +-1/sqrt(in)) from a generator seeded by (seed, layer, module), so the
adapters are the same at any layout; B starts at zero. Base weights are frozen. The sharded state dict keeps
the base keys unchanged and adds `<linear>.lora_A` / `<linear>.lora_B`; checkpoints hold only those, in a
layout that does not depend on TP (a fused B is stored like its base weight: QKV grouped per query group,
fc1 as [gate; up]), so a TP2 checkpoint loads at TP1 and exports without knowing its TP size.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

from megatron_patch.errors import UserError
from megatron_patch.models.families.base import GateUp

ADAPTER_MARK = ".lora_"
MLA_ALTERNATES = {"q_proj", "q_a_proj", "q_b_proj"}  # an MLA model has q_proj or q_a_proj + q_b_proj
EXPERTS = "experts"  # --lora-target name of the routed experts (Target.split of their two linears)
EXPERT_LINEARS = (("linear_fc1", "gate_up_proj"), ("linear_fc2", "down_proj"))  # megatron linear, HF 3-D parameter


@dataclass(frozen=True)
class Target:
    rel: str                  # the linear inside a decoder layer, e.g. "self_attention.linear_qkv"
    hf: tuple[str, ...]       # HF module per part, with {layer}: "model.layers.{layer}.self_attn.q_proj"
    split: object             # the family row's split kind
    parts: tuple[int, ...]    # adapted parts (indices into hf)
    layers: tuple[int, ...] | None = None  # the global decoder layers holding this linear (None: all)

    @property
    def short(self) -> tuple[str, ...]:
        return tuple(self.hf[p].rsplit(".", 1)[-1] for p in self.parts)


def peft_remapped(hf_config) -> set[str]:
    """HF module names peft 0.21 re-targets on this model type under transformers 5: for the MoE families
    (deepseek_v2/v3, qwen3_moe) it reads gate_proj/up_proj/down_proj as the routed experts' fused gate_up_proj /
    down_proj parameters (peft.utils.transformers_weight_conversion), so it would not put adapters exported under
    those names on the dense MLP or the shared experts."""
    try:
        from peft.utils.transformers_weight_conversion import _MODEL_TO_CONVERSION_PATTERN, _MOE_TARGET_MODULE_MAPPING
    except ImportError:  # no peft here: nothing to stay loadable by
        return set()
    base = _MODEL_TO_CONVERSION_PATTERN.get(getattr(hf_config, "model_type", None))
    return set(_MOE_TARGET_MODULE_MAPPING.get(base) or {})


def _adaptable_rows(family, hf_config) -> list:
    """The family table's rows of decoder linears an adapter can wrap (megatron names them linear_*: not the
    router or the norms; not routed experts)."""
    from megatron_patch.models.families.base import Column, GateUp, QKV, Replicated, Row

    return [r for r in family.params(hf_config) if r.mcore.startswith("decoder.layers.{layer}.")
            and r.mcore.endswith(".weight") and r.split in (Column, Row, QKV, GateUp, Replicated)
            and r.mcore.rsplit(".", 2)[-2].startswith("linear_") and "{expert}" not in r.mcore]


def target_names(family, hf_config) -> list[str]:
    """Every HF module name --lora-target accepts for this model."""
    names = {h.rsplit(".", 2)[-2] for r in _adaptable_rows(family, hf_config) for h in r.hf}
    return sorted(names - peft_remapped(hf_config) | ({EXPERTS} if _expert_rows(family, hf_config) else set()))


def _expert_rows(family, hf_config) -> list:
    """The family table's routed-expert fc1 row (its `layers` are the MoE layers)."""
    return [r for r in family.params(hf_config) if "{expert}" in r.mcore and r.mcore.endswith("linear_fc1.weight")]


def _expert_targets(family, hf_config) -> list[Target]:
    """The routed experts' fc1 and fc2 as targets, named by transformers 5's fused 3-D parameters."""
    rows = _expert_rows(family, hf_config)
    if not rows:
        raise UserError(f"--lora-target experts: {hf_config.model_type} has no routed experts")
    return expert_targets(rows[0].layers, rows[0].hf[0].split(".experts.")[0])


def expert_targets(layers: tuple[int, ...] | None, hf_mlp: str = "model.layers.{layer}.mlp") -> list[Target]:
    """fc1 and fc2 of the routed experts of `layers` (the MoE layers); `hf_mlp` the HF MLP module path."""
    # rel: megatron's checkpoint name (TEGroupedMLP and SequentialMLP both save `mlp.experts.experts.linear_fcN`)
    return [Target(f"mlp.experts.experts.{linear}", (f"{hf_mlp}.experts.{param}",), EXPERTS, (0,), layers)
            for linear, param in EXPERT_LINEARS]


def lora_targets(family, hf_config, names: list[str]) -> list[Target]:
    """Map HF module names to the decoder linears holding them (through the family table)."""
    experts = _expert_targets(family, hf_config) if EXPERTS in names else []
    names = [n for n in names if n != EXPERTS]
    if not names:
        return experts
    remapped = [n for n in names if n in peft_remapped(hf_config)]
    if remapped:
        raise UserError(f"--lora-target {','.join(remapped)}: on {hf_config.model_type} peft 0.21 (transformers 5) "
                        "reads these names as the routed experts' fused parameters, so adapters on the dense MLP / "
                        "shared experts would not load in peft; adapt the routed experts with `experts` and the "
                        "attention projections (q_proj,k_proj,v_proj,o_proj; MLA: q_a_proj,q_b_proj,q_proj,"
                        "kv_a_proj_with_mqa,kv_b_proj,o_proj)")
    rows = _adaptable_rows(family, hf_config)
    available = {h.rsplit(".", 2)[-2]: r for r in rows for h in r.hf}
    mla = bool(getattr(hf_config, "kv_lora_rank", None))
    unknown = [n for n in names if n not in available and not (mla and n in MLA_ALTERNATES)]
    if unknown:
        raise UserError(f"--lora-target {','.join(unknown)}: not a linear of this model's decoder layers "
                        f"(available: {','.join(sorted(available))})")
    targets = []
    for r in rows:
        parts = tuple(i for i, h in enumerate(r.hf) if h.rsplit(".", 2)[-2] in names)
        if parts:
            rel = r.mcore[len("decoder.layers.{layer}."):-len(".weight")]
            targets.append(Target(rel, tuple(h[:-len(".weight")] for h in r.hf), r.split, parts, r.layers))
    if not targets:
        raise UserError(f"--lora-target {','.join(names)}: none of these is a linear of this model "
                        f"(available: {','.join(sorted(available))})")
    return targets + experts


def _part_sizes(target: Target, out_total: int, ctx) -> list[int]:
    from megatron_patch.models.families.base import GateUp, QKV

    if target.split is QKV:
        d = ctx.kv_channels
        return [ctx.num_attention_heads * d, ctx.num_query_groups * d, ctx.num_query_groups * d]
    if target.split is GateUp:
        return [out_total // 2, out_total // 2]
    return [out_total]


def init_a(seed: int, layer: int, rel: str, part: int, rank: int, fan_in: int) -> torch.Tensor:
    """peft's kaiming_uniform_(a=sqrt(5)) bound, from a generator of (seed, layer, module, part)."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{layer}/{rel}/{part}".encode()))
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(rank, fan_in, generator=gen, dtype=torch.float64) * 2 - 1).mul(bound).float()


class LoRALinear(torch.nn.Module):
    """base(x) + alpha/r * B(A(dropout(x))), TP-aware; returns (output, bias) like the base."""

    def __init__(self, base, target: Target, layer: int, rank: int, alpha: float, dropout: float, seed: int,
                 ctx, sequence_parallel: bool):
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        from megatron_patch.models.families.base import Replicated, Row

        super().__init__()
        self.base = base
        self.target, self.layer, self.r, self.scaling = target, layer, rank, alpha / rank
        self.dropout = dropout
        self.sp = sequence_parallel
        self.row = target.split is Row
        self.replicated = target.split is Replicated
        tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        self.tp_rank = tp_rank
        dtype = base.weight.dtype
        if self.replicated:  # DuplicatedLinear (or TE's duplicated linear): the whole weight on every rank
            out_total, fan_in = base.weight.shape
        else:
            fan_in, out_total = base.input_size, base.output_size
        a_full = torch.cat([init_a(seed, layer, target.rel, p, rank, fan_in) for p in target.parts])
        n = len(target.parts) * rank
        if self.replicated:
            self.lora_A = torch.nn.Parameter(a_full.to(dtype))
            self.lora_B = torch.nn.Parameter(torch.zeros(out_total, n, dtype=dtype))
            for p in (self.lora_A, self.lora_B):  # each rank sees its sequence shard: sum over TP
                p.sequence_parallel = sequence_parallel
            self.register_buffer("mask", None, persistent=False)
        elif self.row:
            per = fan_in // tp
            self.lora_A = torch.nn.Parameter(a_full[:, tp_rank * per:(tp_rank + 1) * per].to(dtype).contiguous())
            set_tensor_model_parallel_attributes(self.lora_A, True, 1, 1)
            self.lora_B = torch.nn.Parameter(torch.zeros(out_total, n, dtype=dtype))
            if sequence_parallel:
                self.lora_B.sequence_parallel = True  # each rank sees its sequence shard: sum over TP
            self.register_buffer("mask", None, persistent=False)
        else:
            self.lora_A = torch.nn.Parameter(a_full.to(dtype))
            sizes = _part_sizes(target, out_total, ctx)
            blocks = []
            for i, size in enumerate(sizes):
                block = torch.zeros(size, n, dtype=dtype)
                if i in target.parts:
                    j = target.parts.index(i)
                    block[:, j * rank:(j + 1) * rank] = 1
                blocks.append(block)
            mask = target.split.shard(blocks, tp_rank, tp, ctx)
            self.lora_B = torch.nn.Parameter(torch.zeros_like(mask))
            set_tensor_model_parallel_attributes(self.lora_B, True, 0, 1)
            self.register_buffer("mask", mask, persistent=False)

    def forward(self, x):
        from megatron.core.tensor_parallel import mappings as m

        out, bias = self.base(x)
        h = self._dropout(x)
        if self.replicated:
            delta = torch.nn.functional.linear(torch.nn.functional.linear(h, self.lora_A), self.lora_B)
        elif self.row:
            z = torch.nn.functional.linear(h, self.lora_A)
            z = m.reduce_scatter_to_sequence_parallel_region(z) if self.sp else m.reduce_from_tensor_model_parallel_region(z)
            delta = torch.nn.functional.linear(z, self.lora_B)
        else:
            if self.sp:
                h = m.gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=False)
            z = m.copy_to_tensor_model_parallel_region(torch.nn.functional.linear(h, self.lora_A))
            delta = torch.nn.functional.linear(z, self.lora_B * self.mask)
        return out + delta * self.scaling, bias

    def _dropout(self, x):
        """peft's dropout on the adapter input. A TP-sharded input (row-parallel features, or the sequence shard
        under SP) draws from megatron's tensor-parallel RNG (different per TP rank); a replicated input from the
        default generator, seeded alike on every TP rank. (Dropout > 0 is not covered by the layout tests.)"""
        if not self.dropout or not self.training:
            return x
        if self.row or self.sp:
            from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

            with get_cuda_rng_tracker().fork():
                return torch.nn.functional.dropout(x, self.dropout, True)
        return torch.nn.functional.dropout(x, self.dropout, True)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        out = self.base.sharded_state_dict(prefix, sharded_offsets, metadata)
        axis = {} if self.replicated else {"lora_A": 1} if self.row else {"lora_B": 0}
        out.update(make_sharded_tensors_for_checkpoint(
            {"lora_A": self.lora_A, "lora_B": self.lora_B}, prefix, axis, sharded_offsets,
            tp_group=getattr(self.base, "tp_group", None) or ps.get_tensor_model_parallel_group(),
            dp_cp_group=(metadata or {}).get("dp_cp_group")))
        if self.target.split is GateUp:  # stored as [gate; up] like fc1's weight, so it loads at any TP
            from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

            out[prefix + "lora_B"] = apply_swiglu_sharded_factory(out[prefix + "lora_B"], sharded_offsets)
        return out


def init_expert_adapter(seed: int, layer: int, rel: str, expert: int, rank: int, weight, tp_axis: int,
                        tp_group) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    """(A [r, in], B [out, r] = 0) of one routed expert's linear, this expert-TP rank's part of them: B's rows when
    the local `weight` [out, in] is a column-parallel slice (tp_axis 0), A's columns when row parallel (1). A comes
    from the global expert's own generator, so the adapters are the same at any EP / expert TP. `allreduce` as the
    base weight's (False: reduced over expert data parallel)."""
    tp, tp_rank = tp_group.size(), tp_group.rank()
    out, fan_in = weight.shape
    a = init_a(seed, layer, rel, expert, rank, fan_in * tp if tp_axis == 1 else fan_in)
    if tp_axis == 1:
        a = a.chunk(tp, dim=1)[tp_rank].contiguous()
    a = torch.nn.Parameter(a.to(weight.dtype))
    b = torch.nn.Parameter(torch.zeros(out, rank, dtype=weight.dtype))
    sharded, whole = (b, a) if tp_axis == 0 else (a, b)
    for p in (a, b):
        p.allreduce = getattr(weight, "allreduce", True)
    sharded.tensor_model_parallel, sharded.partition_dim, sharded.partition_stride = True, tp_axis, 1
    # the grad norm counts the whole factor once per expert-TP group (each rank's experts are its own under EP):
    # megatron skips `shared` params (its mark for tied copies) and would count an unmarked one by the dense TP rank
    whole.tensor_model_parallel, whole.partition_dim, whole.partition_stride = tp_rank == 0, -1, 1
    whole.shared = tp_rank != 0
    return a, b


class ExpertLoRALinear(torch.nn.Module):
    """One SequentialMLP expert's linear: base(x) + alpha/r * B(A(x)), split over expert TP like the base (see
    init_expert_adapter); the base's explicit expert communication (none inside the linear) is kept."""

    def __init__(self, base, rel: str, layer: int, expert: int, rank: int, alpha: float, seed: int, tp_axis: int,
                 gated: bool):
        super().__init__()
        self.base, self.scaling, self.tp_axis, self.gated = base, alpha / rank, tp_axis, gated
        self.lora_A, self.lora_B = init_expert_adapter(seed, layer, rel, expert, rank, base.weight, tp_axis,
                                                       base.tp_group)

    def forward(self, x, *args, **kwargs):
        from megatron_patch.runtime.grouped_experts import expert_adapter_factors

        out, bias = self.base(x, *args, **kwargs)
        a, b = expert_adapter_factors(self.lora_A, self.lora_B, self.tp_axis, self.base.tp_group)
        delta = torch.nn.functional.linear(torch.nn.functional.linear(x, a), b)
        return out + delta * self.scaling, bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The base's entries and the adapters on the same expert axis (SequentialMLP sets the keys and replicas);
        fc1's B stored as [gate; up] like its weight (MLP does that for the weight only)."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        from megatron_patch.runtime.grouped_experts import sharded_expert_adapter, store_gate_up_adapter

        out = self.base.sharded_state_dict(prefix, sharded_offsets, metadata)
        out.update(make_sharded_tensors_for_checkpoint(
            {"lora_A": self.lora_A, "lora_B": self.lora_B}, prefix, {sharded_expert_adapter(self.tp_axis): self.tp_axis},
            sharded_offsets, tp_group=self.base.tp_group, dp_cp_group=(metadata or {}).get("dp_cp_group")))
        store_gate_up_adapter(out, prefix + "lora_B", sharded_offsets, self.tp_axis, self.gated)
        return out


def _wrap_experts(layer, target: Target, rank: int, alpha: float, seed: int) -> int:
    """Adapters on every local expert's linear `target.rel` of a decoder layer. Returns how many."""
    from megatron.core.transformer.moe.experts import SequentialMLP

    from megatron_patch.runtime.grouped_experts import PortableGroupedMLP

    experts = layer.get_submodule("mlp.experts")
    linear = target.rel.rsplit(".", 1)[-1]
    tp_axis = 0 if linear == "linear_fc1" else 1  # fc1 column parallel, fc2 row parallel over expert TP
    first = experts.ep_group.rank() * experts.num_local_experts
    number = layer.layer_number - 1
    if isinstance(experts, SequentialMLP):
        for i, expert in enumerate(experts.local_experts):
            setattr(expert, linear, ExpertLoRALinear(getattr(expert, linear), target.rel, number, first + i, rank,
                                                     alpha, seed, tp_axis, bool(experts.config.gated_linear_unit)))
    elif isinstance(experts, PortableGroupedMLP):
        grouped = getattr(experts, linear)
        for i in range(experts.num_local_experts):
            a, b = init_expert_adapter(seed, number, target.rel, first + i, rank, getattr(grouped, f"weight{i}"),
                                       grouped.tp_axis, grouped.tp_group)
            grouped.register_parameter(f"lora_A{i}", a)
            grouped.register_parameter(f"lora_B{i}", b)
        grouped.lora_scaling = alpha / rank
    else:
        raise UserError(f"--lora-target experts: {type(experts).__name__} experts are not supported (use the default "
                        "grouped experts or --no-moe-grouped-gemm)")
    return experts.num_local_experts


def apply_lora(chunks: list, hf_config, config, margs, layout, rank: int, alpha: float, dropout: float,
               targets_csv: str, seed: int) -> int:
    """Wrap the targeted linears of every decoder layer and freeze everything else. Returns adapter count."""
    from megatron_patch.models.families import family_for_config
    from megatron_patch.models.families.common import shard_context

    if rank < 1:
        raise UserError(f"--lora-rank {rank}: must be >= 1")
    if not 0 <= dropout < 1:
        raise UserError(f"--lora-dropout {dropout}: must be in [0, 1)")
    names = [n.strip() for n in targets_csv.split(",") if n.strip()]
    if not names:
        raise UserError("--lora-target NAMES is required with --lora-rank (e.g. q_proj,k_proj,v_proj,o_proj)")
    targets = lora_targets(family_for_config(hf_config), hf_config, names)
    return wrap_targets(chunks, targets, config, shard_context(config, margs, layout.tp), rank, alpha, dropout, seed)


def wrap_targets(chunks: list, targets: list[Target], config, ctx, rank: int, alpha: float, dropout: float,
                 seed: int) -> int:
    """apply_lora on targets already resolved (`ctx`: the family's shard context, for fused column linears).
    Returns adapter count."""
    for chunk in chunks:
        for p in chunk.parameters():
            p.requires_grad_(False)
    if getattr(config, "recompute_granularity", None) == "full":
        _make_embedding_output_require_grad(chunks)
    wrapped = 0
    for chunk in chunks:
        decoder = getattr(chunk, "decoder", None)
        for layer in getattr(decoder, "layers", []):
            for t in targets:
                if t.layers is not None and layer.layer_number - 1 not in t.layers:
                    continue
                if t.split == EXPERTS:
                    wrapped += _wrap_experts(layer, t, rank, alpha, seed)
                    continue
                parent_path, _, attr = t.rel.rpartition(".")
                parent = layer.get_submodule(parent_path)
                base = getattr(parent, attr)
                setattr(parent, attr, LoRALinear(base, t, layer.layer_number - 1, rank, alpha, dropout, seed, ctx,
                                                 bool(config.sequence_parallel)))
                wrapped += 1
    return wrapped


def _make_embedding_output_require_grad(chunks: list) -> None:
    """Full recompute runs each layer block in a checkpoint function whose output needs a gradient only if its
    input does; with the embedding frozen nothing upstream does, so the adapters would get no gradient at all
    (peft's enable_input_require_grads answers the same problem in HF)."""
    for chunk in chunks:
        embedding = getattr(chunk, "embedding", None)
        if embedding is not None:
            embedding.register_forward_hook(lambda _module, _inputs, output: output.requires_grad_())


def has_adapters(chunks) -> bool:
    return any(ADAPTER_MARK in f".{name}" for c in chunks for name, _ in c.named_parameters())


def adapters_only(sharded: dict) -> dict:
    """The adapter entries of a model's sharded state dict (what a LoRA checkpoint holds)."""
    return {k: v for k, v in sharded.items() if ADAPTER_MARK in k}
