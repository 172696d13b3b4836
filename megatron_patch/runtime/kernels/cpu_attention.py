"""fp32 CPU attention whose products run on oneDNN (kernels/cpu_gemm.py), one head at a time.

torch's CPU flash kernel (SDPA) multiplies blocks of 64 query rows with torch's BLAS: on AMD CPUs MKL's AVX2 kernel,
at 40-45 GFLOP/s for MLA's head dims (measured, one thread, [2, 8, 256, 48]: 3.1 ms forward, 7.2 ms backward). Here
each head's scores are one [sq, sk] oneDNN GEMM, its softmax one op, and the backward four GEMMs (dV = P^T dO,
dP = dO V^T, dQ = dS K, dK = dS^T Q) around torch's softmax backward: 2.5-3.1 ms and 5.0-6.3 ms on the same
shapes. It keeps each head's probabilities [sq, sk] for the backward (the flash kernel keeps O(sq)), so it is
used only where they are small (`takes`); q/k and v head dims may differ (MLA: no zero-padding of v here).
"""
from __future__ import annotations

import functools

import torch

from megatron_patch.runtime.kernels import cpu_gemm

# Kept probabilities per call: at most this many bytes (sequence 512 x 512 with 16 heads of a micro-batch is 16 MiB).
MAX_SAVED_BYTES = 16 << 20


def takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the head-wise oneDNN attention runs these [b, h, s, d] inputs: fp32 CPU with oneDNN GEMMs, each
    head's score product at least cpu_gemm's bar (smaller ones are faster in SDPA) and the kept probabilities
    within MAX_SAVED_BYTES."""
    b, h, sq, d = q.shape
    sk = k.shape[-2]
    return (cpu_gemm.takes(q) and k.dtype == v.dtype == torch.float32 and not cpu_gemm.small_product(sq, d, sk)
            and b * h * sq * sk * 4 <= MAX_SAVED_BYTES)


def headwise_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """softmax(q k^T * scale) v for q [b, h, sq, d], k [b, hk, sk, d], v [b, hk, sk, dv] (hk divides h: GQA);
    causal: query i sees keys 0..i (top-left aligned, as SDPA's is_causal)."""
    return _HeadwiseAttention.apply(q, k, v, scale, causal)


@functools.lru_cache(maxsize=16)
def _causal_bias(sq: int, sk: int) -> torch.Tensor:
    """[sq, sk]: 0 where query i sees key j (j <= i), -inf elsewhere."""
    return torch.zeros(sq, sk).masked_fill_(torch.ones(sq, sk, dtype=torch.bool).triu(1), float("-inf"))


def _lp(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a @ w^T on oneDNN (2-D operands, any strides)."""
    return torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")


def _heads(q: torch.Tensor, k: torch.Tensor):
    """(batch, query head, its key/value head, first query head of that group?) for every query head."""
    b, h = q.shape[:2]
    group = h // k.shape[1]
    return [(i, j, j // group, j % group == 0) for i in range(b) for j in range(h)]


class _HeadwiseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal):
        # Each head a dense [s, d] matrix: oneDNN runs rows with gaps between them (megatron's [s, b, h, d] seen
        # as [b, h, s, d]) hundreds of times slower than these copies cost.
        k, v = k.contiguous(), v.contiguous()
        # q scaled into a contiguous tensor in one pass (the scale on q's d columns, not on the [sq, sk] scores)
        qs = torch.mul(q, scale, out=torch.empty(q.shape, dtype=q.dtype))
        bias = _causal_bias(q.shape[-2], k.shape[-2]) if causal else None
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        probs = []
        for i, j, g, _ in _heads(q, k):
            scores = _lp(qs[i, j], k[i, g])
            if bias is not None:
                scores.add_(bias)
            p = torch.softmax(scores, dim=-1)
            probs.append(p)
            out[i, j] = _lp(p, v[i, g].t())
        ctx.save_for_backward(qs, k, v, *probs)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        qs, k, v, *probs = ctx.saved_tensors
        grad = grad.contiguous()
        dq, dk, dv = torch.empty_like(qs), torch.empty_like(k), torch.empty_like(v)
        for (i, j, g, first), p in zip(_heads(qs, k), probs):
            dout = grad[i, j]
            dscores = torch._softmax_backward_data(_lp(dout, v[i, g]), p, -1, torch.float32)
            dq[i, j] = _lp(dscores, k[i, g].t())
            for total, part in ((dv[i, g], _lp(p.t(), dout.t())), (dk[i, g], _lp(dscores.t(), qs[i, j].t()))):
                total.copy_(part) if first else total.add_(part)  # GQA: a group's query heads add up
        return dq.mul_(ctx.scale), dk, dv, None, None
