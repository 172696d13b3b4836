"""te.pytorch.DotProductAttention: softmax(q k^T * scale [+ causal mask]) v on sbhd/bshd tensors, via
torch SDPA. No parameters (vanilla softmax), one `_extra_state`. As TE 2.x, loading a state dict without
`core_attention._extra_state` is not an error (older checkpoints lack it)."""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from transformer_engine.pytorch.module.base import TransformerEngineBaseModule

MASK_TYPES = ("no_mask", "causal", "padding", "padding_causal", "arbitrary")


class DotProductAttention(TransformerEngineBaseModule):
    def __init__(self, num_attention_heads: int, kv_channels: Union[int, Tuple[int, int]],
                 num_gqa_groups: Optional[int] = None, attention_dropout: float = 0.0, qkv_format: str = "sbhd",
                 attn_mask_type: str = "causal", window_size=None, sequence_parallel: bool = False,
                 tp_size: int = 1, get_rng_state_tracker: Optional[Callable] = None, tp_group=None,
                 layer_number: Optional[int] = None, attention_type: str = "self", cp_group=None,
                 cp_global_ranks=None, cp_stream=None, cp_comm_type: str = "p2p",
                 softmax_scale: Optional[float] = None, softmax_type: str = "vanilla",
                 return_max_logit: bool = False) -> None:
        super().__init__()
        if attention_dropout:
            raise NotImplementedError("te_double: attention dropout is not emulated (set it to 0)")
        if cp_group is not None or window_size is not None or softmax_type != "vanilla" or return_max_logit:
            raise NotImplementedError("te_double: context parallelism, sliding windows, softmax variants and "
                                      "max-logit output are not emulated")
        self._set_tp(tp_group, tp_size)
        self.qkv_format = qkv_format
        self.attn_mask_type = attn_mask_type.replace(",", "_")
        self.num_attention_heads = num_attention_heads
        self.num_gqa_groups = num_attention_heads if num_gqa_groups is None else num_gqa_groups
        k_dim = kv_channels if isinstance(kv_channels, int) else kv_channels[0]
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(k_dim)
        self.layer_number = 1 if layer_number is None else layer_number
        self.attention_type = attention_type
        self.register_load_state_dict_post_hook(_older_checkpoints_lack_extra_state)

    def forward(self, query_layer: torch.Tensor, key_layer: torch.Tensor, value_layer: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None, qkv_format: Optional[str] = None,
                attn_mask_type: Optional[str] = None, core_attention_bias_type: str = "no_bias",
                core_attention_bias: Optional[torch.Tensor] = None, num_splits: Optional[int] = 1,
                **packed) -> torch.Tensor:
        if core_attention_bias_type != "no_bias" or any(v is not None for v in packed.values()):
            raise NotImplementedError("te_double: attention bias and packed sequences are not emulated")
        qkv_format = qkv_format or self.qkv_format
        mask_type = (attn_mask_type or self.attn_mask_type).replace(",", "_")
        if mask_type not in MASK_TYPES:
            raise NotImplementedError(f"te_double: attn_mask_type {mask_type!r} is not emulated")
        if qkv_format not in ("sbhd", "bshd"):
            raise NotImplementedError(f"te_double: qkv_format {qkv_format!r} is not emulated")
        # -> [b, h, s, d]
        order = (1, 2, 0, 3) if qkv_format == "sbhd" else (0, 2, 1, 3)
        q, k, v = (t.permute(*order) for t in (query_layer, key_layer, value_layer))
        mask = None
        if mask_type in ("padding", "padding_causal", "arbitrary") and attention_mask is not None:
            if isinstance(attention_mask, (tuple, list)):
                raise NotImplementedError("te_double: separate q/kv padding masks are not emulated")
            mask = ~attention_mask.bool()  # TE: True = masked out; SDPA: True = keep
        causal = "causal" in mask_type
        if causal and mask is not None:
            keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
            mask, causal = mask & keep, False
        dv = v.shape[-1]
        if dv != q.shape[-1]:  # MLA: a fused kernel with one head dim, as TE's flash/cuDNN backends run it
            width = max(dv, q.shape[-1])
            q, k, v = (F.pad(t, (0, width - t.shape[-1])) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.softmax_scale,
                                             enable_gqa=q.shape[1] != k.shape[1])[..., :dv]
        b, h, s, dv = out.shape
        if qkv_format == "sbhd":
            return out.permute(2, 0, 1, 3).reshape(s, b, h * dv)
        return out.permute(0, 2, 1, 3).reshape(b, s, h * dv)


def _older_checkpoints_lack_extra_state(module, incompatible_keys) -> None:
    missing = incompatible_keys.missing_keys
    missing[:] = [key for key in missing if "core_attention._extra_state" not in key]
