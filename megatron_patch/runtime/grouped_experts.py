"""Grouped experts without Transformer Engine: megatron-core's TEGroupedMLP on portable grouped linears.

megatron-core's local-spec grouped experts (GroupedMLP) need the CUDA `grouped_gemm` package. Here the
experts keep TE's parameter layout and names (`linear_fc1.weight{e}`, `linear_fc2.weight{e}`: [out, in] per
local expert) and TEGroupedMLP's sharded_state_dict (the same torch_dist keys as SequentialMLP), while the
forward multiplies all local experts with one grouped GEMM (runtime kernel `grouped_matmul`:
torch.nn.functional.grouped_mm on CPU/CUDA, npu_grouped_matmul on Ascend).

tokens_per_expert stays a tensor all the way down (no `.tolist()` host sync): the grouped GEMM takes its
cumulative sum as offsets, so with a padded, capacity-bound dispatch every shape is known before the data.
"""
from __future__ import annotations

import contextlib
import logging

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.experts import TEGroupedMLP
from megatron.core.utils import divide

from megatron_patch.runtime import kernels
from megatron_patch.runtime.kernels import cpu_gemm


RNG_FALSE_ALARM = "CPU RNG state changed within GPU RNG context"


class _DropRngFalseAlarm(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != RNG_FALSE_ALARM


@contextlib.contextmanager
def _quiet_cpu_rng_false_alarm():
    """On CPU the RNG tracker's "GPU" generator is the CPU one (runtime/adapters.py), so megatron's check that an
    init inside `fork()` left the CPU generator alone always fires: one warning per expert and linear on every
    rank (thousands for DeepSeek-V3). The fork still restores the CPU state; only that false alarm is dropped."""
    from megatron_patch.runtime.accelerator import get_accelerator

    if get_accelerator().type != "cpu":
        yield
        return
    logger, quiet = logging.getLogger("megatron.core.tensor_parallel.random"), _DropRngFalseAlarm()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


class PortableGroupedLinear(MegatronModule):
    """TE GroupedLinear's parameters (weight{i}: [out, in]) for experts. No communication: as with TE's
    `explicit_expert_comm`, the token dispatcher does the experts' TP/EP communication."""

    tp_axis = 0  # 0: column parallel (out split over expert-TP), 1: row parallel (in split)

    def __init__(self, num_gemms: int, input_size: int, output_size: int, *, config, init_method, bias: bool,
                 skip_bias_add: bool, is_expert: bool, tp_comm_buffer_name=None, pg_collection=None):
        from megatron.core.tensor_parallel.layers import (_initialize_affine_weight_gpu,
                                                          set_tensor_model_parallel_attributes)

        super().__init__(config=config)
        if bias:
            raise ValueError("grouped experts: expert biases (add_bias_linear) are not supported; turn them off")
        if not is_expert:
            raise ValueError("PortableGroupedLinear is for experts only")
        self.num_gemms = num_gemms
        self.ep_group, self.tp_group, self.expt_dp_group = pg_collection.ep, pg_collection.expt_tp, pg_collection.expt_dp
        tp = self.tp_group.size()
        if self.tp_axis == 0:
            output_size = divide(output_size, tp)
        else:
            input_size = divide(input_size, tp)
        # Expert-parallel params are reduced over the expert-data-parallel group (megatron's DDP reads this).
        allreduce = not (config.expert_model_parallel_size > 1)
        # One [E, out, in] block whose slices are the weight{i} parameters: the forward reads the block as
        # it is (no per-forward stack), the names and the state dict stay TE's.
        block = torch.empty(num_gemms, output_size, input_size, dtype=config.params_dtype)
        with _quiet_cpu_rng_false_alarm():
            for i in range(num_gemms):
                weight = torch.nn.Parameter(block[i])
                if config.perform_initialization:
                    _initialize_affine_weight_gpu(weight, init_method, self.tp_axis, is_expert=True)
                else:
                    set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=self.tp_axis, stride=1)
                weight.allreduce = allreduce
                setattr(self, f"weight{i}", weight)
        self._register_load_state_dict_pre_hook(_drop_extra_states)

    def weights(self) -> list:
        return [getattr(self, f"weight{i}") for i in range(self.num_gemms)]

    lora_scaling = None  # set with per-expert adapters lora_A{i} [r, in], lora_B{i} [out, r] (models/lora.py),
    # this expert-TP rank's part: B's rows with a column-parallel weight, A's columns with a row-parallel one

    def stacked_weight(self) -> torch.Tensor:
        """[E, in, out] (a transposed view of the [E, out, in] stack: the layout grouped_mm wants). A view of
        the weights' shared block when they still lie in one (see __init__, _apply), else a stacked copy. LoRA
        adapters are folded in as W + alpha/r * B A (peft's ParamWrapper on HF's fused experts does the same)."""
        weights = self.weights()
        w = _BlockView.apply(*weights) if _one_block(weights) else torch.stack(weights)
        if self.lora_scaling is not None:
            a, b = (torch.stack([getattr(self, f"lora_{x}{i}") for i in range(self.num_gemms)]) for x in "AB")
            a, b = expert_adapter_factors(a, b, self.tp_axis, self.tp_group)
            w = w + self.lora_scaling * torch.bmm(b, a)
        return w.transpose(1, 2)

    def grouped_forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """[tokens, in] sorted by expert -> [tokens, out], one grouped GEMM."""
        weights = self.weights()
        if x.device.type == "cpu" and torch.is_grad_enabled() and isinstance(tokens_per_expert, torch.Tensor) \
                and all(w.requires_grad and hasattr(w, "main_grad") and hasattr(w, "grad_added_to_main_grad")
                        for w in weights):
            return _GroupedLinearIntoMainGrad.apply(x, tokens_per_expert, *weights)
        return kernels.get("grouped_matmul", x.device.type)(x, self.stacked_weight(), tokens_per_expert)

    def _apply(self, fn, recurse=True):
        """Module.to()/.bfloat16()/.cuda() give each parameter its own new tensor: put them back into one
        block (same Parameter objects, so optimizers and DDP keep them)."""
        super()._apply(fn, recurse)
        weights = self.weights()
        if weights and not _one_block(weights) and len({(w.shape, w.dtype, w.device) for w in weights}) == 1:
            block = torch.stack([w.data for w in weights])
            for i, w in enumerate(weights):
                w.data = block[i]
        return self

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Like TE's grouped linear: per expert a ShardedTensor on the global expert axis and an (empty)
        `_extra_state` ShardedObject, keyed by `prefix` (TEGroupedMLP renames it to SequentialMLP's
        `experts.linear_fcN.*`): a checkpoint saved here loads into SequentialMLP and TE models alike."""
        from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        if (metadata or {}).get("singleton_local_shards"):
            raise ValueError("grouped experts: singleton_local_shards checkpoints are not supported")
        num_global = self.ep_group.size() * self.num_gemms
        offset = self.ep_group.rank() * self.num_gemms
        ep_axis = len(sharded_offsets)
        out = {}
        lora = ("lora_A", "lora_B") if self.lora_scaling is not None else ()
        sharded_adapter = sharded_expert_adapter(self.tp_axis)
        for i in range(self.num_gemms):
            expert_offsets = (*sharded_offsets, (ep_axis, offset + i, num_global))
            sub = make_sharded_tensors_for_checkpoint(
                {f"{i}.weight": getattr(self, f"weight{i}"), f"{i}._extra_state": None,
                 **{f"{i}.{x}": getattr(self, f"{x}{i}") for x in lora}}, "",
                {f"{i}.weight": self.tp_axis, f"{i}.{sharded_adapter}": self.tp_axis}, expert_offsets,
                tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])
            replace_prefix_for_sharding(sub, f"{i}.", prefix)
            for item in sub.values():  # replicas: expert data parallel only
                item.replica_id = (*item.replica_id[:2], self.expt_dp_group.rank())
            out[f"{prefix}weight{i}"] = sub[f"{i}.weight"]
            out[f"{prefix}_extra_state{i or ''}"] = sub[f"{i}._extra_state"]
            out.update({f"{prefix}{x}{i}": sub[f"{i}.{x}"] for x in lora})
            if lora:
                store_gate_up_adapter(out, f"{prefix}lora_B{i}", expert_offsets, self.tp_axis,
                                      self.config.gated_linear_unit)
        return out

    def backward_dw(self):
        pass


def sharded_expert_adapter(tp_axis: int) -> str:
    """The expert adapter factor split over expert TP like its base weight: fc1's B by rows (tp_axis 0), fc2's
    A by columns (tp_axis 1); the other factor is whole on every rank."""
    return "lora_B" if tp_axis == 0 else "lora_A"


def store_gate_up_adapter(sharded: dict, key: str, offsets: tuple, tp_axis: int, gated: bool) -> None:
    """fc1's B under SwiGLU: its local rows are [gate_i; up_i] like fc1's weight; stored as [gate; up] on the
    global axis (megatron's swiglu factory, which MLP applies to the weight only), so the adapter loads at any
    expert-TP size."""
    if tp_axis == 0 and gated:
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

        sharded[key] = apply_swiglu_sharded_factory(sharded[key], offsets)


def expert_adapter_factors(a: torch.Tensor, b: torch.Tensor, tp_axis: int, tp_group) -> tuple:
    """An expert adapter's (A, B) for the forward under expert tensor parallelism (tp_axis as the base weight's).
    Column-parallel base: B holds this rank's output rows and A is whole on every rank, so each rank's gradient
    of A is a partial sum over its rows; row-parallel base: A holds this rank's input columns and B's gradient is
    the partial one. That replicated factor's gradient is summed over the expert-TP group in the backward
    (megatron's copy-to-TP-region: identity forward, all-reduce backward); the input gradient stays partial like
    the base weight's, for the token dispatcher to reduce. Expert TP 1: no communication."""
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

    if tp_axis == 0:
        return copy_to_tensor_model_parallel_region(a, group=tp_group), b
    return a, copy_to_tensor_model_parallel_region(b, group=tp_group)


def _one_block(weights: list) -> bool:
    """True when the weights are the consecutive [out, in] slices of one contiguous block."""
    first = weights[0]
    if not first.is_contiguous():
        return False
    storage, start, size = first.untyped_storage().data_ptr(), first.storage_offset(), first.numel()
    return all(w.is_contiguous() and w.shape == first.shape and w.dtype == first.dtype and w.device == first.device
               and w.untyped_storage().data_ptr() == storage and w.storage_offset() == start + i * size
               for i, w in enumerate(weights))


class _BlockView(torch.autograd.Function):
    """The [E, out, in] block behind weights that _one_block accepts, without a copy; its gradient goes
    back to each weight as a slice."""

    @staticmethod
    def forward(ctx, *weights):
        first = weights[0]
        return first.detach().as_strided((len(weights), *first.shape), (first.numel(), *first.stride()))

    @staticmethod
    def backward(ctx, grad):
        return grad.unbind(0)


def _block(weights) -> torch.Tensor:
    """[E, out, in]: the weights' shared block, or a stacked copy when they do not lie in one."""
    if _one_block(weights):
        first = weights[0]
        return first.detach().as_strided((len(weights), *first.shape), (first.numel(), *first.stride()))
    return torch.stack([w.detach() for w in weights])


class _GroupedLinearIntoMainGrad(torch.autograd.Function):
    """The grouped GEMM x @ W_e^T whose backward adds each expert's weight gradient straight into DDP's
    main_grad (one addmm_ per expert, as megatron's gradient_accumulation_fusion does for its linears)
    instead of into a fresh [E, in, out] tensor that DDP's hooks then add. CPU only: splitting the rows per
    expert needs the counts on the host. With oneDNN GEMMs (kernels/cpu_gemm.py) every GEMM is per expert."""

    @staticmethod
    def forward(ctx, x, tokens_per_expert, *weights):
        ctx.save_for_backward(x, tokens_per_expert)
        # the parameters themselves, not saved tensors: under saved_tensors_hooks (memory meters, offloading)
        # saved tensors come back as other objects, without DDP's main_grad
        ctx.weights = weights
        ctx.counts = tokens_per_expert.tolist()  # one host read for forward and backward
        if cpu_gemm.takes(x):
            return cpu_gemm.grouped_times_transposed(x, weights, ctx.counts)
        return kernels.get("grouped_matmul", "cpu")(x, _block(weights).transpose(1, 2), tokens_per_expert)

    @staticmethod
    def backward(ctx, grad):
        x, tokens_per_expert = ctx.saved_tensors
        weights = ctx.weights
        grad = grad.contiguous()
        dx = None
        counts = ctx.counts
        if ctx.needs_input_grad[0]:
            dx = cpu_gemm.grouped_times_transposed(grad, [w.t() for w in weights], counts) \
                if cpu_gemm.takes(grad) else \
                kernels.get("grouped_matmul", "cpu")(grad, _block(weights), tokens_per_expert)
        dummies = []
        for weight, rows, grad_rows in zip(weights, x.split(counts), grad.split(counts)):
            if rows.dtype == weight.main_grad.dtype:
                cpu_gemm.addmm_(weight.main_grad, grad_rows.t(), rows)
            else:  # bf16/fp16 experts, fp32 main_grad: the GEMM in their dtype, then the add
                weight.main_grad.add_(grad_rows.t().matmul(rows))
            weight.grad_added_to_main_grad = True
            # megatron's pattern: an uninitialised gradient that DDP's hook skips (grad_added_to_main_grad)
            dummies.append(torch.empty_like(weight))
        return (dx, None, *dummies)


def _drop_extra_states(state_dict, prefix, *args):
    """TE/SequentialMLP checkpoints carry `_extra_state{i}` entries (fp8 metadata or None) that these
    linears do not hold: loading ignores them (TE's set_extra_state ignores empty ones the same way)."""
    for key in [k for k in state_dict if k.startswith(prefix + "_extra_state")]:
        del state_dict[key]


class PortableColumnGroupedLinear(PortableGroupedLinear):
    tp_axis = 0


class PortableRowGroupedLinear(PortableGroupedLinear):
    tp_axis = 1


class PortableGroupedMLP(TEGroupedMLP):
    """TEGroupedMLP (construction, sharded_state_dict) with a forward that runs one grouped GEMM per linear."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None):
        unsupported = [name for name, on in (
            ("add_bias_linear", config.add_bias_linear), ("moe_apply_probs_on_input", config.moe_apply_probs_on_input),
            ("fp8/fp4", config.fp8 or config.fp4), ("moe_latent_size", config.moe_latent_size is not None),
            ("activation_func_clamp_value", config.activation_func_clamp_value is not None),
            ("glu_linear_offset", bool(config.glu_linear_offset)),
            ("selective recompute of moe_act", config.recompute_granularity == "selective"
             and "moe_act" in (config.recompute_modules or [])),
            ("activation offloading", config.fine_grained_activation_offloading)) if on]
        if unsupported:
            raise ValueError(f"grouped experts (--moe-grouped-gemm) without TE do not support {', '.join(unsupported)}")
        super().__init__(num_local_experts, config, submodules, pg_collection)

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        x = permuted_local_hidden_states
        device = x.device.type
        fc1 = self.linear_fc1.grouped_forward(x, tokens_per_expert)
        # As SequentialMLP's MLP: scale by the router prob in the promoted dtype, then back.
        if self.config.gated_linear_unit:
            if self.config.activation_func is not torch.nn.functional.silu:
                raise ValueError("grouped experts: a gated unit other than SwiGLU is not supported")
            act = kernels.get("weighted_swiglu", device)(fc1, permuted_probs)
        else:
            act = (self.config.activation_func(fc1) * permuted_probs.unsqueeze(-1)).to(fc1.dtype)
        return self.linear_fc2.grouped_forward(act, tokens_per_expert), None
