"""Ascend NPU: swap megatron-core's unfused torch code for torch_npu fused ops (MindSpeed's approach:
each swap is a small dotted-path patch). UNVERIFIED ON HARDWARE: tested only against the torch_npu
test double in tests/npu_double, which follows torch-npu 2.13.0's signatures.

Attention and RMSNorm need no patch here: PortableCoreAttention / PortableNorm pick the NPU kernel
themselves. Cases a fused op cannot express (fused/padded MoE paths, interleaved RoPE) fall back to
megatron's own function.
"""
from __future__ import annotations

import functools

import torch

from megatron_patch.runtime import kernels
from megatron_patch.runtime.adapters import REGISTRY, TESTED

NPU = ("npu",)
patch = REGISTRY.add


@patch("megatron.core.transformer.moe.moe_utils.permute", "token permute via npu_moe_token_permute",
       TESTED, NPU)
def _permute(original):
    @functools.wraps(original)
    def permute(tokens, routing_map, probs=None, num_out_tokens=None, fused=False, drop_and_pad=False):
        if fused or drop_and_pad:
            return original(tokens, routing_map, probs, num_out_tokens, fused, drop_and_pad)
        return kernels.get("permute", "npu")(tokens, routing_map, probs)

    return permute


@patch("megatron.core.transformer.moe.moe_utils.unpermute", "token unpermute via npu_moe_token_unpermute",
       TESTED, NPU)
def _unpermute(original):
    @functools.wraps(original)
    def unpermute(permuted_tokens, sorted_indices, restore_shape, probs=None, routing_map=None,
                  fused=False, drop_and_pad=False):
        if fused or drop_and_pad:
            return original(permuted_tokens, sorted_indices, restore_shape, probs, routing_map, fused,
                            drop_and_pad)
        return kernels.get("unpermute", "npu")(permuted_tokens, sorted_indices, probs, restore_shape,
                                               routing_map=routing_map)

    return unpermute


@patch("megatron.core.models.common.embeddings.rope_utils._apply_rotary_pos_emb_bshd",
       "RoPE via npu_rotary_mul (MLA de-interleave kept)", TESTED, NPU)
def _rope(original):
    @functools.wraps(original)
    def apply(t, freqs, rotary_interleaved=False, multi_latent_attention=False, mscale=1.0):
        if rotary_interleaved:  # npu_rotary_mul's 'half' mode is rotate_half only
            return original(t, freqs, rotary_interleaved, multi_latent_attention, mscale)
        rot_dim = freqs.shape[-1]
        t, t_pass = t[..., :rot_dim], t[..., rot_dim:]
        if multi_latent_attention:
            t = kernels.get("deinterleave", "npu")(t)
        cos = (torch.cos(freqs) * mscale).to(t.dtype)
        sin = (torch.sin(freqs) * mscale).to(t.dtype)
        return torch.cat((kernels.get("apply_rope", "npu")(t, cos, sin), t_pass), dim=-1)

    return apply


@patch("megatron.core.fusions.fused_bias_swiglu.bias_swiglu_impl", "SwiGLU via npu_swiglu", TESTED, NPU)
def _swiglu(original):
    @functools.wraps(original)
    def swiglu(input, bias, fp8_input_store=False, cpu_offload_input=False):
        if bias is not None or fp8_input_store or cpu_offload_input:
            return original(input, bias, fp8_input_store, cpu_offload_input)
        return kernels.get("swiglu", "npu")(input)

    return swiglu
