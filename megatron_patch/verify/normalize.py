"""Bring captured activations to one layout: full batch and sequence, HF order [b, s, ...], fp32.

Megatron side, per rank (then gathered over TP and collected from the pipeline stages on rank 0):
  * micro-batches: a module runs once per micro-batch (sometimes k times per micro-batch: MTP runs the
    embedding and the output layer again); the calls of micro-batch i are calls[i*k:(i+1)*k]. We keep
    the first one (the decoder's own call: MTP comes after it), except for logits, where the main
    output layer call is the last (megatron computes the MTP logits first). Micro-batches are
    concatenated over the batch dimension.
  * Megatron activations are [s, b, h]. With sequence parallelism the layer outputs are split over the
    sequence across the TP ranks ([s/tp, b, h]): all-gathered over dim 0. The router sees the same local
    tokens (flattened s-major: token = s_i * b + b_i). Logits are [s, b, V/tp] (the column-parallel
    output layer all-gathers the sequence first): all-gathered over the vocab, then the padded vocab is
    cut to the HF vocab size. With context parallelism each CP rank holds two chunks of the sequence
    (megatron's load-balanced split): after the TP gather, all-gathered over CP and put in sequence order.
HF side: [b, s, h] already; the router's (top-k weights, top-k indices) over b-major tokens become a
dense [b, s, E] weight matrix (zeros where not routed), which is what Megatron's router returns.
DSA indexer (DeepSeek-V3.2): HF's top-k key indices [b, s, k] become the [b, s, S] set of selected causal keys
(a query with fewer than k earlier keys also "selects" masked ones, which attend to nothing); megatron's
index_selection is that set already, [b, s_local, S] per micro-batch (rows are queries: the sequence dim).
"""
from __future__ import annotations

import torch


def hf_dense_router(weights: torch.Tensor, indices: torch.Tensor, b: int, s: int, num_experts: int) -> torch.Tensor:
    dense = torch.zeros(b * s, num_experts, dtype=torch.float32)
    dense.scatter_(1, indices.reshape(b * s, -1).long(), weights.reshape(b * s, -1).float())
    return dense.view(b, s, num_experts)


def normalize_hf(kind: str, calls: list, b: int, s: int, num_experts: int) -> torch.Tensor:
    """The HF capture as [b, s, X] fp32 (the HF model runs the whole batch once)."""
    if not calls:
        raise ValueError("module was never called")
    out = calls[0]
    if kind == "router":
        return hf_dense_router(out[0], out[1], b, s, num_experts)
    if kind == "indexer":
        chosen = torch.zeros(b, s, s, dtype=torch.bool).scatter_(-1, out.long(), True)
        return (chosen & torch.ones(s, s, dtype=torch.bool).tril()).float()
    return out.float().reshape(b, s, -1)


def select_calls(calls: list, kind: str, num_micro: int) -> list:
    """One call per micro-batch (see the module docstring)."""
    if len(calls) % num_micro:
        raise ValueError(f"{len(calls)} calls for {num_micro} micro-batches")
    per = len(calls) // num_micro
    pick = per - 1 if kind == "logits" else 0
    return [calls[i * per + pick] for i in range(num_micro)]


def local_sbx(calls: list, kind: str, num_micro: int, micro_batch: int) -> torch.Tensor:
    """This rank's capture as [s_local, B, X] fp32 (micro-batches concatenated)."""
    parts = []
    for out in select_calls(calls, kind, num_micro):
        out = out.float()
        if kind == "router":
            out = out.reshape(-1, micro_batch, out.shape[-1])  # tokens are s-major: [s_local, mb, E]
        elif kind == "indexer":
            out = out.transpose(0, 1)  # [mb, s_local, S] -> [s_local, mb, S]
        parts.append(out)
    return torch.cat(parts, dim=1)


def gather(tensor: torch.Tensor, dim: int, group, size: int) -> torch.Tensor:
    if size == 1:
        return tensor
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(size)]
    torch.distributed.all_gather(parts, tensor, group=group)
    return torch.cat(parts, dim=dim)


def normalize_mcore(kind: str, local: torch.Tensor, seq_length: int, vocab_size: int, tp_group,
                    tp_size: int, cp_group=None) -> torch.Tensor:
    """Gather a rank's [s_local, B, X] capture over TP (and CP) and return [B, S, X]. Collective over the TP
    and CP groups: every rank of a stage calls it for the same keys in the same order (same modules)."""
    if cp_group is not None and cp_group.size() > 1:
        from megatron_patch.runtime.context_parallel import restore_sequence

        cp = cp_group.size()
        part = normalize_mcore(kind, local, seq_length // cp, vocab_size, tp_group, tp_size).transpose(0, 1)
        full = restore_sequence(gather(part, 0, cp_group, cp), cp, dim=0)
        return full.transpose(0, 1).contiguous()
    if kind == "logits":
        full = gather(local, 2, tp_group, tp_size)[..., :vocab_size]
    elif local.shape[0] == seq_length:
        full = local
    elif local.shape[0] * tp_size == seq_length:
        full = gather(local, 0, tp_group, tp_size)  # sequence parallel
    else:
        raise ValueError(f"capture has {local.shape[0]} positions; expected {seq_length} or "
                         f"{seq_length}/{tp_size} (sequence parallel)")
    return full.transpose(0, 1).contiguous()


def collect(local: dict, contribute: bool) -> list[dict] | None:
    """Every rank sends its normalised captures (empty unless `contribute`) to rank 0; rank 0 gets the
    list, the others None. Pipeline stages hold disjoint layers; one rank per stage contributes."""
    import torch.distributed as dist

    payload = local if contribute else {}
    if dist.get_world_size() == 1:
        return [payload]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(payload, out, dst=0)
    return out
