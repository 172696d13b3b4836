"""Core attention: softmax(q k^T * scale + mask) v on [b, h, s, d] tensors.

k's head dim equals q's; v's may differ (MLA: 192 for q/k, 128 for v). k/v may have fewer heads than q (GQA)
as long as q's head count is a whole multiple. attn_mask follows Megatron: True = masked out; it must broadcast
to [b, h, sq, sk]. causal is aligned at the top-left corner (query i sees keys 0..i), like SDPA's is_causal.
"""

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_patch.runtime.kernels import cpu_attention

# npu_fusion_attention's causal modes (sparse_mode 2/3) take this fixed, compressed upper-triangular mask
# instead of an [sq, sk] one, whatever the sequence length.
_NPU_CAUSAL_MASK_SIZE = 2048
_NPU_LEFT_UP_CAUSAL = 2   # sparse_mode: causal triangle starts at the top-left, as in SDPA
_NPU_DEFAULT_MASK = 0     # sparse_mode: use atten_mask as given (pre/next_tockens left at "everything")


def core_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool,
                   attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Torch implementation, via scaled_dot_product_attention (fp32 CPU: head-wise on oneDNN where that takes it)."""
    if attn_mask is None and cpu_attention.takes(q, k, v):
        return cpu_attention.headwise_attention(q, k, v, scale, causal)
    dqk, dv = q.shape[-1], v.shape[-1]
    if dv != dqk:
        # SDPA's fused kernels (CPU and CUDA flash) take one head dim; with MLA's 192/128 it fell back to the
        # math kernel, which holds [sq, sk] scores per head (O(S^2) memory). Zero columns change no q.k or
        # output column (the scale is explicit); the padded output columns are dropped.
        q, k, v = (pad_head_dim(t, max(dqk, dv)) for t in (q, k, v))
    sdpa_mask = None
    if attn_mask is not None:
        sdpa_mask = ~attn_mask.bool()  # SDPA's bool mask means True = keep
        if causal:
            # SDPA refuses is_causal together with attn_mask, so fold the triangle into the mask.
            sdpa_mask = sdpa_mask & _keep_lower_triangle(q.shape[-2], k.shape[-2], q.device)
            causal = False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, dropout_p=0.0, is_causal=causal,
                                         scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out[..., :dv]


core_attention.takes_gqa = True  # k/v with fewer heads than q go to SDPA as they are (enable_gqa)


def core_attention_npu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool,
                       attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Ascend implementation, via torch_npu.npu_fusion_attention (BNSD layout)."""
    import torch_npu

    b, h, sq, dqk = q.shape
    sk, dv = k.shape[-2], v.shape[-1]
    if dv > dqk:
        # The op requires Dq == Dk >= Dv. Zero-padding q and k leaves q k^T (and the explicit scale) unchanged.
        q = F.pad(q, (0, dv - dqk))
        k = F.pad(k, (0, dv - dqk))

    if attn_mask is None and causal:
        mask, sparse_mode = _npu_causal_mask(q.device), _NPU_LEFT_UP_CAUSAL
    elif attn_mask is None:
        mask, sparse_mode = None, _NPU_DEFAULT_MASK
    else:
        mask = attn_mask.bool()
        if causal:
            mask = mask | ~_keep_lower_triangle(sq, sk, q.device)
        mask, sparse_mode = _npu_mask_shape(mask, b, h, sq, sk), _NPU_DEFAULT_MASK

    out = torch_npu.npu_fusion_attention(q, k, v, h, input_layout="BNSD", atten_mask=mask, scale=scale,
                                         keep_prob=1.0, sparse_mode=sparse_mode)
    return out[0]  # the rest are softmax statistics and dropout seeds kept for the backward pass


def pad_head_dim(x: torch.Tensor, width: int) -> torch.Tensor:
    """x [..., d] zero-padded to [..., width]."""
    return x if x.shape[-1] == width else F.pad(x, (0, width - x.shape[-1]))


def _keep_lower_triangle(sq: int, sk: int, device) -> torch.Tensor:
    return torch.ones(sq, sk, dtype=torch.bool, device=device).tril()


@functools.lru_cache(maxsize=8)
def _npu_causal_mask(device: torch.device) -> torch.Tensor:
    # Built once per device: it is 4 MiB and identical for every layer and step.
    n = _NPU_CAUSAL_MASK_SIZE
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)


def _npu_mask_shape(mask: torch.Tensor, b: int, h: int, sq: int, sk: int) -> torch.Tensor:
    # The op accepts SS, 11SS, B1SS or BNSS masks; broadcast ours into the smallest of those that fits.
    if mask.dim() > 4:
        raise ValueError(f"attn_mask must have at most 4 dims, got {tuple(mask.shape)}")
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    mb = b if mask.shape[0] != 1 else 1
    mh = h if mask.shape[1] != 1 else 1
    if mh != 1:
        mb = b  # there is no 1NSS form
    return mask.expand(mb, mh, sq, sk).contiguous()
