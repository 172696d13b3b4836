"""Attention over one block of keys with its log-sum-exp, and the gradients of one block given the whole
row's output and log-sum-exp: the pieces of ring (P2P) context parallelism (runtime/ring_attention.py),
which merges blocks by their log-sum-exp (online softmax) and so never holds every key at once.

q [b, h, sq, d]; k [b, h, sk, d]; v [b, h, sk, dv] (dv may differ from d: MLA). causal is top-left aligned
(only used on diagonal blocks, sq == sk). lse is fp32 [b, h, sq].

On CPU this is torch's blocked flash kernel (`_scaled_dot_product_flash_attention_for_cpu` and its backward:
memory O(sq + sk) per head, never the [sq, sk] scores); it needs one head dim, so v is zero-padded to q's
(the padded output columns are zero and dropped). Elsewhere a plain-torch version materialises the block's
scores (exact, O(sq * sk) memory): the fused CUDA/NPU kernels that return the statistics are not wired here.
"""
from __future__ import annotations

import torch

from megatron_patch.runtime.kernels.attention import pad_head_dim


def has_fused_lse(device_type: str) -> bool:
    """Whether attention_lse runs a fused kernel on this device (else it materialises each block's scores)."""
    return device_type == "cpu"


def attention_lse(q, k, v, *, scale: float, causal: bool):
    """(out [b, h, sq, dv] in q's dtype, lse [b, h, sq] fp32) of softmax(q k^T * scale) v over this block."""
    if q.device.type == "cpu":
        dv = v.shape[-1]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, pad_head_dim(v, q.shape[-1]), 0.0, causal, scale=scale)
        return out[..., :dv], lse.float()
    return attention_lse_math(q, k, v, scale=scale, causal=causal)


def attention_lse_math(q, k, v, *, scale: float, causal: bool):
    """attention_lse in plain torch (any device): the block's scores are materialised."""
    scores = _scores(q, k, scale, causal)
    lse = scores.logsumexp(dim=-1)
    out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)).to(v.dtype), v)
    return out, lse


def attention_lse_backward(dout, q, k, v, out, lse, *, scale: float, causal: bool):
    """(dq, dk, dv) of this block's share of a row whose softmax is normalised by `lse` (the whole row's,
    over every block) and whose output is `out` (the whole row's): the flash-attention backward identity
    dS = P * (dP - rowsum(dout * out)) with P = exp(S - lse)."""
    if q.device.type == "cpu":
        d, dv = q.shape[-1], v.shape[-1]
        dq, dk, dval = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            pad_head_dim(dout, d), q, k, pad_head_dim(v, d), pad_head_dim(out, d), lse, 0.0, causal, scale=scale)
        return dq, dk, dval[..., :dv]
    return attention_lse_backward_math(dout, q, k, v, out, lse, scale=scale, causal=causal)


def attention_lse_backward_math(dout, q, k, v, out, lse, *, scale: float, causal: bool):
    """attention_lse_backward in plain torch (any device)."""
    p = torch.exp(_scores(q, k, scale, causal) - lse.unsqueeze(-1))
    dval = torch.matmul(p.transpose(-1, -2).to(dout.dtype), dout)
    dp = torch.matmul(dout.float(), v.float().transpose(-1, -2))
    ds = p * (dp - (dout.float() * out.float()).sum(-1, keepdim=True)) * scale
    dq = torch.matmul(ds, k.float()).to(q.dtype)
    dk = torch.matmul(ds.transpose(-1, -2), q.float()).to(k.dtype)
    return dq, dk, dval


def _scores(q, k, scale, causal):
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if causal:
        keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores
