"""Causal attention of this CP rank's two query chunks over the all-gathered K/V, without a mask.

The mask path (context_parallel.causal_chunks + one masked attention call per chunk) makes SDPA on CPU fall
back to its math kernel, which holds [chunk, prefix] scores per head: O(S^2 / CP) memory per rank, more than
CP 1's O(S) flash kernel (measured in benchmarks/long_context_bench.py). Here query chunk c attends to the
keys before it whole and to its own chunk causally, two flash calls merged by their log-sum-exp
(kernels/attention_blocks.py), with a custom backward; memory stays O(S) per rank on top of the gathered
K/V. Used where the device has a fused attention that returns the log-sum-exp (CPU); elsewhere the mask path.
"""
from __future__ import annotations

import torch

from megatron_patch.runtime import kernels
from megatron_patch.runtime.context_parallel import chunk_ids


def gathered_causal_attention(q, k, v, scale: float, cp_size: int, cp_rank: int):
    """q [b, h, 2c, d] (this rank's chunks), k/v [b, hk, S, d/dv] in sequence order -> [b, h, 2c, dv]."""
    return _GatheredCausalAttention.apply(q, k, v, scale, cp_size, cp_rank)


def blocks_for(cp_size: int, cp_rank: int, chunk: int) -> list[tuple[int, slice, bool]]:
    """(local query chunk 0/1, key columns in sequence order, causal): the prefix whole, the diagonal causally."""
    blocks = []
    for qi, c in enumerate(chunk_ids(cp_size, cp_rank)):
        if c > 0:
            blocks.append((qi, slice(0, c * chunk), False))
        blocks.append((qi, slice(c * chunk, (c + 1) * chunk), True))
    return blocks


class _GatheredCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, cp_size, cp_rank):
        attention = kernels.get("attention_lse", q.device.type)
        chunk = q.shape[2] // 2
        out, lse = [None, None], [None, None]
        for qi, cols, causal in blocks_for(cp_size, cp_rank, chunk):
            o, s = attention(q[:, :, qi * chunk:(qi + 1) * chunk], repeat_kv(k[:, :, cols], q),
                             repeat_kv(v[:, :, cols], q), scale=scale, causal=causal)
            out[qi], lse[qi] = merge_lse(out[qi], lse[qi], o.float(), s)
        out, lse = torch.cat(out, dim=2).to(q.dtype), torch.cat(lse, dim=2)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.cp = scale, (cp_size, cp_rank)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        backward = kernels.get("attention_lse_backward", q.device.type)
        chunk = q.shape[2] // 2
        dout = dout.contiguous()
        dq = torch.zeros_like(q, dtype=torch.float32)
        dk = torch.zeros_like(k, dtype=torch.float32)
        dv = torch.zeros_like(v, dtype=torch.float32)
        for qi, cols, causal in blocks_for(*ctx.cp, chunk):
            rows = slice(qi * chunk, (qi + 1) * chunk)
            g_q, g_k, g_v = backward(dout[:, :, rows], q[:, :, rows], repeat_kv(k[:, :, cols], q),
                                     repeat_kv(v[:, :, cols], q), out[:, :, rows], lse[:, :, rows],
                                     scale=ctx.scale, causal=causal)
            dq[:, :, rows] += g_q.float()
            dk[:, :, cols] += sum_kv(g_k.float(), k.shape[1])
            dv[:, :, cols] += sum_kv(g_v.float(), v.shape[1])
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def repeat_kv(kv, q):
    """GQA: repeat each K/V head over its query heads."""
    repeat = q.shape[1] // kv.shape[1]
    return kv if repeat == 1 else kv.repeat_interleave(repeat, dim=1)


def sum_kv(grad, kv_heads: int):
    """The gradient of repeat_kv: sum over each K/V head's query heads."""
    b, h, s, d = grad.shape
    return grad if h == kv_heads else grad.view(b, kv_heads, h // kv_heads, s, d).sum(dim=2)


def merge_lse(out, lse, block_out, block_lse):
    """Online softmax: combine two partial attentions over disjoint key sets by their log-sum-exp."""
    if out is None:
        return block_out, block_lse
    new_lse = torch.logaddexp(lse, block_lse)
    return (out * torch.exp(lse - new_lse).unsqueeze(-1)
            + block_out * torch.exp(block_lse - new_lse).unsqueeze(-1)), new_lse
