"""fp32 CPU attention whose products run on oneDNN (kernels/cpu_gemm.py), one head at a time.

torch's CPU flash kernel (SDPA) multiplies blocks of 64 query rows with torch's BLAS: on AMD CPUs MKL's AVX2 kernel,
at 40-45 GFLOP/s for MLA's head dims (measured, one thread, [2, 8, 256, 48]: 3.1 ms forward, 7.2 ms backward). Here
each head's scores are one [sq, sk] oneDNN GEMM, its softmax one op, and the backward four GEMMs (dV = P^T dO,
dP = dO V^T, dQ = dS K, dK = dS^T Q) around torch's softmax backward: 2.5-3.1 ms and 5.0-6.3 ms on the same
shapes. It keeps each head's probabilities [sq, sk] for the backward (the flash kernel keeps O(sq)), so it is
used only where they are small (`takes`); q/k and v head dims may differ (MLA: no zero-padding of v here).
MP_CPU_ATTENTION=sdpa keeps SDPA everywhere (default auto).
"""
from __future__ import annotations

import functools

import torch

from megatron_patch.runtime.kernels import cpu_gemm, cpu_native

ENV = "MP_CPU_ATTENTION"

# Kept probabilities per call: at most this many bytes (sequence 512 x 512 with 16 heads of a micro-batch is 16 MiB).
MAX_SAVED_BYTES = 16 << 20


def takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the head-wise oneDNN attention runs these [b, h, s, d] inputs: fp32 CPU with oneDNN GEMMs, each
    head's score product at least cpu_gemm's bar (smaller ones are faster in SDPA) and the kept probabilities
    within MAX_SAVED_BYTES."""
    b, h, sq, d = q.shape
    sk = k.shape[-2]
    return (cpu_gemm.env_choice(ENV, ("auto", "sdpa")) == "auto" and cpu_gemm.takes(q)
            and k.dtype == v.dtype == torch.float32 and not cpu_gemm.small_product(sq, d, sk)
            and b * h * sq * sk * 4 <= MAX_SAVED_BYTES)


def headwise_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """softmax(q k^T * scale) v for q [b, h, sq, d], k [b, hk, sk, d], v [b, hk, sk, dv] (hk divides h: GQA);
    causal: query i sees keys 0..i (top-left aligned, as SDPA's is_causal)."""
    return _HeadwiseAttention.apply(q, k, v, scale, causal)


@functools.lru_cache(maxsize=16)
def _causal_bias(sq: int, sk: int) -> torch.Tensor:
    """[sq, sk]: 0 where query i sees key j (j <= i), -inf elsewhere."""
    return torch.zeros(sq, sk).masked_fill_(torch.ones(sq, sk, dtype=torch.bool).triu(1), float("-inf"))


def _softmax(scores: torch.Tensor, causal: bool) -> torch.Tensor:
    """softmax(scores) over the last dim; causal: query i sees keys 0..i (cpu_native's kernel where it runs)."""
    if not causal:
        return torch.softmax(scores, dim=-1)
    if cpu_native.causal_softmax_(scores):
        return scores
    return torch.softmax(scores.add_(_causal_bias(*scores.shape)), dim=-1)


def _lp(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a @ w^T for one head, at any size (`takes` leaves small heads to SDPA), a and w any strides."""
    return cpu_gemm.matrix_times_transposed(a, w, small_bar=0)


def _each_head(t: torch.Tensor, transposed: bool = False) -> tuple:
    """[b, h, s, d] -> b*h [s, d] views (or their [d, s] transposes), batch-major: one op for all heads."""
    return (t.transpose(-1, -2) if transposed else t).flatten(0, 1).unbind(0)


def _kv_head(n: int, heads: int, kv_heads: int) -> int:
    """The key/value head of flattened query head n (GQA: `heads // kv_heads` query heads per group)."""
    return n // heads * kv_heads + n % heads // (heads // kv_heads)


def _sum_per_kv_head(parts: list, kv_of: list, like: torch.Tensor) -> torch.Tensor:
    """[b, hk, s, d] from one part per query head: a GQA group's query heads add up."""
    totals = [None] * (like.shape[0] * like.shape[1])
    for part, kv in zip(parts, kv_of):
        totals[kv] = part if totals[kv] is None else totals[kv].add_(part)
    return torch.stack(totals).view(like.shape)


class _HeadwiseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal):
        # Each head a dense [s, d] matrix: oneDNN runs rows with gaps between them (megatron's [s, b, h, d] seen
        # as [b, h, s, d]) hundreds of times slower than these copies cost.
        k, v = k.contiguous(), v.contiguous()
        # q scaled into a contiguous tensor in one pass (the scale on q's d columns, not on the [sq, sk] scores)
        qs = torch.mul(q, scale, out=torch.empty(q.shape, dtype=q.dtype))
        kv_of = [_kv_head(n, q.shape[1], k.shape[1]) for n in range(q.shape[0] * q.shape[1])]
        keys, values_t = _each_head(k), _each_head(v, transposed=True)
        probs, outs = [], []
        for q_head, kv in zip(_each_head(qs), kv_of):
            probs.append(_softmax(_lp(q_head, keys[kv]), causal))
            outs.append(_lp(probs[-1], values_t[kv]))
        ctx.save_for_backward(qs, k, v, *probs)
        ctx.scale, ctx.kv_of = scale, kv_of
        return torch.stack(outs).view(*q.shape[:-1], v.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        qs, k, v, *probs = ctx.saved_tensors
        grad = grad.contiguous()
        values, keys_t, queries_t = _each_head(v), _each_head(k, transposed=True), _each_head(qs, transposed=True)
        dq, dk, dv = [], [], []
        for p, dout, dout_t, q_t, kv in zip(probs, _each_head(grad), _each_head(grad, transposed=True), queries_t,
                                            ctx.kv_of):
            dscores = torch._softmax_backward_data(_lp(dout, values[kv]), p, -1, torch.float32)
            dq.append(_lp(dscores, keys_t[kv]))
            dk.append(_lp(dscores.t(), q_t))
            dv.append(_lp(p.t(), dout_t))
        return (torch.stack(dq).view(qs.shape).mul_(ctx.scale), _sum_per_kv_head(dk, ctx.kv_of, k),
                _sum_per_kv_head(dv, ctx.kv_of, v), None, None)
