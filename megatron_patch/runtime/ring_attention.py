"""Ring (P2P) context parallelism: `--cp-comm-type p2p`, the name Megatron-LM uses.

Each CP rank keeps its own queries and passes its K/V block (its two load-balanced chunks, see
context_parallel.py) around the ring with batch_isend_irecv, so a rank holds two K/V blocks at a time (its
current one and the one arriving), never the whole sequence's. Query chunk qc and key chunk kc: kc < qc is
seen whole, kc == qc causally, kc > qc not at all (skipped). Blocks are merged by their log-sum-exp (online
softmax), accumulated in fp32.

Backward (a custom autograd.Function): the K/V blocks go around the ring again, each carrying the fp32
accumulator of its own dK/dV; every rank adds what its queries contribute (the flash backward of a block,
given the whole row's output and log-sum-exp) and passes it on; after CP hops the accumulator is home.
GQA: K/V travel with their own (fewer) heads and are repeated per block; their gradients are summed back.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_patch.runtime import kernels
from megatron_patch.runtime.blocked_attention import merge_lse, repeat_kv, sum_kv
from megatron_patch.runtime.context_parallel import chunk_ids


def ring_attention(q, k, v, scale: float, cp_group):
    """q [b, h, s_local, d], k [b, hk, s_local, d], v [b, hk, s_local, dv] (this CP rank's two chunks) ->
    causal attention output [b, h, s_local, dv] over the whole sequence."""
    return _RingAttention.apply(q, k, v, scale, cp_group)


def visible_pairs(cp_size: int, q_rank: int, kv_rank: int) -> list[tuple[int, int, bool]]:
    """(local query chunk 0/1, key chunk 0/1 of kv_rank's block, causal) for each pair that is not masked out."""
    pairs = []
    for qi, qc in enumerate(chunk_ids(cp_size, q_rank)):
        for kj, kc in enumerate(chunk_ids(cp_size, kv_rank)):
            if kc <= qc:
                pairs.append((qi, kj, kc == qc))
    return pairs


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, group):
        cp, rank = group.size(), group.rank()
        attention = kernels.get("attention_lse", q.device.type)
        half = q.shape[2] // 2
        out = [None, None]
        lse = [None, None]
        block = (k, v)
        for step in range(cp):
            pending = _Exchange(group, list(block) if step < cp - 1 else [])
            kb, vb = block
            for qi, kj, causal in visible_pairs(cp, rank, (rank - step) % cp):
                o, s = attention(_chunk(q, qi, half), repeat_kv(_chunk(kb, kj, half), q),
                                 repeat_kv(_chunk(vb, kj, half), q), scale=scale, causal=causal)
                out[qi], lse[qi] = merge_lse(out[qi], lse[qi], o.float(), s)
            block = pending.wait() or block
        out = torch.cat(out, dim=2).to(q.dtype)
        lse = torch.cat(lse, dim=2)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.group = scale, group
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, scale = ctx.group, ctx.scale
        cp, rank = group.size(), group.rank()
        backward = kernels.get("attention_lse_backward", q.device.type)
        half = q.shape[2] // 2
        dout = dout.contiguous()
        dq = torch.zeros_like(q, dtype=torch.float32)
        block = (k, v, torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32))
        for step in range(cp):
            kb, vb, dk, dv = block
            for qi, kj, causal in visible_pairs(cp, rank, (rank - step) % cp):
                rows = slice(qi * half, (qi + 1) * half)
                g_q, g_k, g_v = backward(dout[:, :, rows], q[:, :, rows], repeat_kv(_chunk(kb, kj, half), q),
                                         repeat_kv(_chunk(vb, kj, half), q), out[:, :, rows], lse[:, :, rows],
                                         scale=scale, causal=causal)
                dq[:, :, rows] += g_q.float()
                dk[:, :, kj * half:(kj + 1) * half] += sum_kv(g_k.float(), kb.shape[1])
                dv[:, :, kj * half:(kj + 1) * half] += sum_kv(g_v.float(), vb.shape[1])
            # the accumulators always move on (after CP hops they are home); K/V only while someone needs them
            passed = [kb, vb, dk, dv] if step < cp - 1 else [dk, dv]
            received = _Exchange(group, passed).wait()
            block = tuple(received) if step < cp - 1 else (None, None, *received)
        _, _, dk, dv = block
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


class _Exchange:
    """Send `tensors` to the next CP rank and receive same-shaped ones from the previous, as one flat buffer
    (of their promoted dtype: bf16 K/V travel beside fp32 gradient accumulators); nothing when empty."""

    def __init__(self, group, tensors: list):
        self.meta = [(t.shape, t.dtype) for t in tensors]
        self.work = None
        if not tensors:
            return
        cp, rank = group.size(), group.rank()
        self.send = torch.cat([t.reshape(-1) for t in tensors])  # kept alive until sent
        self.recv = torch.empty_like(self.send)
        ops = [dist.P2POp(dist.isend, self.send, dist.get_global_rank(group, (rank + 1) % cp), group),
               dist.P2POp(dist.irecv, self.recv, dist.get_global_rank(group, (rank - 1) % cp), group)]
        self.work = dist.batch_isend_irecv(ops)

    def wait(self) -> list | None:
        if self.work is None:
            return None
        for w in self.work:
            w.wait()
        out, offset = [], 0
        for shape, dtype in self.meta:
            n = shape.numel()
            out.append(self.recv[offset:offset + n].view(shape).to(dtype))
            offset += n
        return out


def _chunk(x, index: int, half: int):
    return x[:, :, index * half:(index + 1) * half]
