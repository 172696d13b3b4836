"""megatron-core modules built on the portable kernels, swapped into the local spec by the adapter.

* PortableNorm replaces WrappedTorchNorm: it supports sequence parallelism (WrappedTorchNorm asserts
  it off) and runs the device's RMSNorm kernel (torch on CPU/CUDA, npu_rms_norm on Ascend).
* PortableCoreAttention replaces the local DotProductAttention: it accepts the k_channels/v_channels
  MLA passes (the local class does not, megatron-core 0.16-0.19) and runs one fused attention call
  (SDPA / npu_fusion_attention) instead of the unfused baddbmm + softmax path. With context parallelism
  it all-gathers K and V over the CP group (runtime/context_parallel.py, `cp_comm_type` "all_gather", the
  default) or passes them around a ring (runtime/ring_attention.py, "p2p"); megatron's local class asserts CP 1.
  Packed sequences (megatron's PackedSeqParams, `thd`): causal attention within each cu_seqlens segment.
* DuplicatedLinear: MLA's q/kv down-projections replicated on every TP rank, as TE's 'duplicated' mode
  (models/spec.py says why the local spec needs it); adapters.py lets megatron's MLA accept it.
"""
from __future__ import annotations

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide

from megatron_patch.runtime import kernels
from megatron_patch.runtime.accelerator import get_accelerator
from megatron_patch.runtime.blocked_attention import gathered_causal_attention
from megatron_patch.runtime.context_parallel import CP_COMM_TYPES, gather_sequence, masked_chunk_attention
from megatron_patch.runtime.kernels import cpu_gemm
from megatron_patch.runtime.kernels.attention_blocks import has_fused_lse
from megatron_patch.runtime.ring_attention import ring_attention


class DuplicatedLinear(MegatronModule):
    """y = x W^T with W replicated on every TP rank (TE's parallel_mode='duplicated').

    With sequence parallelism each rank sees its own slice of tokens, so W's gradient is partial per
    rank; `sequence_parallel=True` on W makes megatron's finalize_model_grads sum it over TP."""

    def __init__(self, input_size: int, output_size: int, *, config, init_method, bias: bool = False,
                 skip_bias_add: bool = False, is_expert: bool = False, **_ignored):
        super().__init__(config=config)
        if bias:
            raise ValueError("DuplicatedLinear: bias is not used by MLA down-projections")
        self.weight = torch.nn.Parameter(torch.empty(output_size, input_size, dtype=config.params_dtype))
        if config.perform_initialization:
            init_method(self.weight)
        self.weight.sequence_parallel = bool(config.sequence_parallel)
        self.weight.allreduce = True

    def forward(self, x: torch.Tensor):
        return cpu_gemm.linear(x, self.weight), None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        # No TP axis: the tensor is the same on every TP rank (a replica).
        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix,
                                                   {}, sharded_offsets)


class PortableNorm(torch.nn.Module):
    """RMSNorm / LayerNorm with megatron's norm constructor signature."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                 zero_centered_gamma: bool = False, normalization: str = "LayerNorm"):
        super().__init__()
        if config.layernorm_zero_centered_gamma or zero_centered_gamma:
            raise ValueError("PortableNorm: zero_centered_gamma is not supported; turn it off")
        self.normalization = config.normalization
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = None
        if self.normalization == "LayerNorm":
            self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        elif self.normalization != "RMSNorm":
            raise ValueError(f"PortableNorm: unknown normalization {self.normalization!r}")
        # With SP each TP rank sees a different slice of the sequence, so norm weight grads differ
        # per rank; megatron all-reduces grads of params marked sequence_parallel.
        for p in self.parameters():
            setattr(p, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalization == "RMSNorm":
            return kernels.get("rms_norm", get_accelerator().type)(x, self.weight, self.eps)
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class PortableCoreAttention(MegatronModule):
    """Core attention: softmax(q k^T * scale + mask) v for [s, b, heads, dim] inputs."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 k_channels: int | None = None, v_channels: int | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        self.cp_group = None
        self.cp_comm_type = cp_comm_type or "all_gather"
        if config.context_parallel_size > 1:
            self.cp_group = pg_collection.cp if pg_collection is not None else _cp_group()
            if self.cp_comm_type not in CP_COMM_TYPES:
                raise ValueError(f"PortableCoreAttention: cp_comm_type {self.cp_comm_type!r} is not supported "
                                 f"(a2a needs Transformer Engine's attention); use one of {', '.join(CP_COMM_TYPES)}")
        self.attn_mask_type = attn_mask_type
        k_channels = k_channels or config.kv_channels
        v_channels = v_channels or config.kv_channels
        tp = pg_collection.tp.size() if pg_collection is not None else _tp_size()
        self.num_heads_per_partition = divide(config.num_attention_heads, tp)
        # MLA: the output width is v_head_dim per head, not kv_channels.
        self.hidden_size_per_partition = v_channels * self.num_heads_per_partition
        self.softmax_scale = softmax_scale if softmax_scale is not None else k_channels ** -0.5
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            # DeepSeek and Qwen train with attention_dropout=0; the fused kernels here take none.
            raise ValueError(f"PortableCoreAttention: attention_dropout={dropout} unsupported; set it to 0")

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("PortableCoreAttention: attention bias needs TE attention")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        cp = self.cp_group is not None and self.cp_group.size() > 1
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params, cp or attention_mask is not None or
                                mask_type != AttnMaskType.causal)
        if cp:
            if attention_mask is not None or mask_type != AttnMaskType.causal:
                raise ValueError("PortableCoreAttention: context parallelism supports causal attention "
                                 "without an explicit attention mask only")
            if self.cp_comm_type == "p2p":
                q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
                return _merge_heads(ring_attention(q, k, v, self.softmax_scale, self.cp_group))
            key, value = gather_sequence(key, self.cp_group), gather_sequence(value, self.cp_group)
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if cp and has_fused_lse(q.device.type):  # no [chunk, prefix] mask: O(S) memory (blocked_attention.py)
            group = self.cp_group
            return _merge_heads(gathered_causal_attention(q, k, v, self.softmax_scale, group.size(), group.rank()))
        attention = kernels.get("core_attention", get_accelerator().type)
        if k.shape[1] != q.shape[1] and (cp or not getattr(attention, "takes_gqa", False)):
            # GQA: repeat each KV group over its query heads (SDPA's enable_gqa needs no copy: HF's path)
            repeat = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        if cp:  # devices without a fused attention returning the log-sum-exp (NPU: npu_fusion_attention takes masks)
            out = masked_chunk_attention(q, k, v, self.softmax_scale, self.cp_group.size(), self.cp_group.rank(),
                                         attention)
        else:
            causal = mask_type == AttnMaskType.causal and attention_mask is None
            out = attention(q, k, v, scale=self.softmax_scale, causal=causal, attn_mask=attention_mask)
        return _merge_heads(out)


    def _packed(self, query, key, value, params, unsupported: bool):
        """megatron's `thd` layout ([tokens, heads, dim], segments at params.cu_seqlens_q): causal attention within
        each segment, one kernel call per segment (what TE's varlen attention computes)."""
        if params.qkv_format != "thd" or unsupported:
            raise ValueError("PortableCoreAttention: packed sequences need the thd format, causal attention without "
                             "an explicit mask, and no context parallelism")
        bounds = params.cu_seqlens_q.tolist()
        if bounds != params.cu_seqlens_kv.tolist() or bounds[-1] != query.shape[0]:
            raise ValueError(f"PortableCoreAttention: cu_seqlens {bounds} do not cover the {query.shape[0]} tokens")
        attention = kernels.get("core_attention", get_accelerator().type)
        q, k, v = (t.unsqueeze(0).transpose(1, 2) for t in (query, key, value))  # [1, n, t, d]
        if k.shape[1] != q.shape[1]:
            repeat = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = torch.cat([attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], scale=self.softmax_scale, causal=True)
                         for a, b in zip(bounds, bounds[1:])], dim=2)
        return out[0].transpose(0, 1).reshape(query.shape[0], 1, -1)  # [t, 1, n*dv], as megatron reshapes it


def _merge_heads(out):
    """[b, n, s, dv] -> [s, b, n*dv]"""
    b, n, s, dv = out.shape
    return out.permute(2, 0, 1, 3).reshape(s, b, n * dv)


def _tp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()


def _cp_group():
    from megatron.core import parallel_state

    return parallel_state.get_context_parallel_group()
