"""Context parallelism (CP) for the portable core attention, with megatron's load-balanced split.

The sequence is cut into 2 x CP chunks; CP rank r holds chunks r and 2CP-1-r (megatron.core.utils.
get_batch_on_this_cp_rank cuts the batch, megatron's rotary embeddings cut their positions the same way).
Attention: K and V are all-gathered over the CP group (megatron's gather_from_sequence_parallel_region:
backward is a reduce-scatter, so each rank gets the key/value gradients of its own tokens from every
rank's queries), put back in sequence order, and each local query chunk attends causally to the prefix
it may see. Per rank this holds the full K/V of the sequence; the ring (`cp_comm_type` "p2p",
runtime/ring_attention.py) holds two K/V blocks at a time.
"""
from __future__ import annotations

import torch

# Megatron-LM's --cp-comm-type values the portable attention implements (p2p: runtime/ring_attention.py)
CP_COMM_TYPES = ("all_gather", "p2p")


def chunk_ids(cp_size: int, cp_rank: int) -> tuple[int, int]:
    """The two chunks (of 2 x cp_size) CP rank cp_rank holds, in the order it holds them."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def sequence_order(cp_size: int) -> torch.Tensor:
    """Chunk order of a CP all-gather (rank 0's two chunks, rank 1's, ...) -> argsort giving sequence order."""
    held = [c for r in range(cp_size) for c in chunk_ids(cp_size, r)]
    return torch.tensor(held).argsort()


def restore_sequence(gathered: torch.Tensor, cp_size: int, dim: int = 0) -> torch.Tensor:
    """A tensor all-gathered over CP along `dim` (ranks' local sequences concatenated) in sequence order."""
    if cp_size == 1:
        return gathered
    shape = gathered.shape
    chunks = gathered.reshape(*shape[:dim], 2 * cp_size, shape[dim] // (2 * cp_size), *shape[dim + 1:])
    order = sequence_order(cp_size).to(gathered.device)
    return chunks.index_select(dim, order).reshape(shape)


def gather_sequence(x: torch.Tensor, cp_group) -> torch.Tensor:
    """[s_local, ...] -> [S, ...] in sequence order; differentiable (backward: reduce-scatter)."""
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    full = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=cp_group)
    return restore_sequence(full, cp_group.size(), dim=0)


def causal_chunks(cp_size: int, cp_rank: int, chunk: int, device) -> list[tuple[slice, int, torch.Tensor]]:
    """For each local query chunk: (its rows in the local sequence, how many keys it may see (the
    sequence prefix up to its end), the mask over that prefix, True = masked, as the kernels take it)."""
    out = []
    for i, c in enumerate(chunk_ids(cp_size, cp_rank)):
        seen = (c + 1) * chunk
        keep = torch.ones(chunk, seen, dtype=torch.bool, device=device).tril(diagonal=c * chunk)
        out.append((slice(i * chunk, (i + 1) * chunk), seen, ~keep))
    return out


def masked_chunk_attention(q, k, v, scale: float, cp_size: int, cp_rank: int, attention) -> torch.Tensor:
    """q [b, h, 2c, d] (this rank's chunks), k/v [b, h, S, d] gathered in sequence order: each local chunk
    attends to the sequence prefix up to its end, causally (offset by its position), through `attention`
    (a core_attention kernel) with a [c, prefix] mask."""
    chunk = q.shape[2] // 2
    return torch.cat([
        attention(q[:, :, rows], k[:, :, :seen], v[:, :, :seen], scale=scale, causal=False, attn_mask=mask)
        for rows, seen, mask in causal_chunks(cp_size, cp_rank, chunk, q.device)
    ], dim=2)
