"""MoE kernels: grouped expert matmul and token permute/unpermute.

permute/unpermute have the semantics of megatron-core 0.16.1's moe_utils.permute / unpermute on their default
path (fused=False, drop_and_pad=False):
  * permute groups token copies by expert (expert-major; within an expert, ascending token id) and returns
    (permuted_tokens, permuted_probs or None, sorted_indices) with sorted_indices[r] = token id of row r;
  * unpermute scatter-adds rows back to their tokens, weighting each row by its prob first.
"""

from typing import Optional, Sequence, Tuple, Union

import torch

Weights = Union[torch.Tensor, Sequence[torch.Tensor]]
Counts = Union[torch.Tensor, Sequence[int]]

# ----------------------------------------------------------------------------------------------------------------
# grouped_matmul
# ----------------------------------------------------------------------------------------------------------------
def grouped_matmul(x: torch.Tensor, weights: Weights, tokens_per_expert: Counts) -> torch.Tensor:
    """Torch implementation. x: [tokens, in] sorted by expert; weights: [E, in, out] or E x [in, out].

    One torch.nn.functional.grouped_mm call (offsets from a tensor of counts: no host sync) where it runs:
    a 3-D weight, fp32/bf16/fp16 on CPU (bf16 on CUDA), in and out widths whose rows are a multiple of 16
    bytes. Otherwise one matmul per expert (Python ints for the split: a host sync)."""
    if isinstance(tokens_per_expert, torch.Tensor) and _grouped_mm_fits(x, weights):
        offs = torch.cumsum(tokens_per_expert.to(x.device), dim=0, dtype=torch.int32)
        return torch.nn.functional.grouped_mm(x, weights, offs=offs)
    counts = _counts_list(tokens_per_expert)
    if len(counts) != len(weights) or sum(counts) != x.shape[0]:
        raise ValueError(f"tokens_per_expert {counts} does not match {len(weights)} experts / {x.shape[0]} rows")
    # One matmul per expert on its contiguous slice of rows.
    outs = [chunk @ w for chunk, w in zip(torch.split(x, counts, dim=0), weights)]
    return torch.cat(outs, dim=0)


def _grouped_mm_fits(x: torch.Tensor, weights: Weights) -> bool:
    """grouped_mm's layout rules (torch 2.13): row strides of x, W, the output and the gradients are
    multiples of 16 bytes; same dtype; x 2-D and W 3-D."""
    if not isinstance(weights, torch.Tensor) or weights.dim() != 3 or x.dim() != 2:
        return False
    if x.dtype != weights.dtype or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if not hasattr(torch.nn.functional, "grouped_mm"):
        return False
    if x.device.type != "cpu" and x.dtype != torch.bfloat16:  # CUDA: bf16 only (torch 2.13 docs)
        return False
    align = 16 // x.element_size()
    return x.shape[1] % align == 0 and weights.shape[2] % align == 0


class _NpuGroupedMatmul(torch.autograd.Function):
    """npu_grouped_matmul has no backward (torch_npu 2.13: inference only), so its gradients are two more
    grouped GEMMs, as MindSpeed does: dx = dy W_g^T grouped on M (rows), dW_g = x_g^T dy_g grouped on K."""

    @staticmethod
    def forward(ctx, x, weight, group_list):
        import torch_npu

        ctx.save_for_backward(x, weight, group_list)
        return torch_npu.npu_grouped_matmul([x], [weight], group_list=group_list, split_item=3, group_type=0,
                                            group_list_type=0)[0]

    @staticmethod
    def backward(ctx, grad):
        import torch_npu

        x, weight, group_list = ctx.saved_tensors
        grad = grad.contiguous()
        dx = torch_npu.npu_grouped_matmul([grad], [weight.transpose(1, 2)], group_list=group_list, split_item=3,
                                          group_type=0, group_list_type=0)[0]
        dw = torch_npu.npu_grouped_matmul([x.t()], [grad], group_list=group_list, split_item=3, group_type=2,
                                          group_list_type=0)[0]
        return dx, dw.view_as(weight), None


def grouped_matmul_npu(x: torch.Tensor, weights: Weights, tokens_per_expert: Counts) -> torch.Tensor:
    """Ascend implementation, via torch_npu.npu_grouped_matmul with groups on the M (token) axis, in an
    autograd.Function that supplies the backward the op lacks."""
    counts = torch.as_tensor(tokens_per_expert, dtype=torch.int64, device=x.device)
    # group_list_type=0 wants the cumulative sum; type 1 (plain counts) rejects a single-expert list.
    group_list = torch.cumsum(counts, dim=0)
    weight = weights if isinstance(weights, torch.Tensor) else torch.stack(list(weights))  # one [E, in, out]
    return _NpuGroupedMatmul.apply(x, weight, group_list)


def _counts_list(tokens_per_expert: Counts) -> list:
    if isinstance(tokens_per_expert, torch.Tensor):
        return [int(c) for c in tokens_per_expert.tolist()]  # host sync: torch.split needs Python ints
    return [int(c) for c in tokens_per_expert]


# ----------------------------------------------------------------------------------------------------------------
# permute / unpermute
# ----------------------------------------------------------------------------------------------------------------
def permute(tokens: torch.Tensor, routing_map: torch.Tensor, probs: Optional[torch.Tensor] = None
            ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Torch implementation. tokens: [T, H]; routing_map: bool [T, E]; probs: [T, E] or None."""
    expert_major = routing_map.bool().T.contiguous()  # [E, T]: row-major walk = expert-major order
    sorted_indices = torch.nonzero(expert_major, as_tuple=True)[1]
    permuted_probs = None
    if probs is not None:
        permuted_probs = probs.T.contiguous().masked_select(expert_major)
    return tokens.index_select(0, sorted_indices), permuted_probs, sorted_indices


def unpermute(permuted_tokens: torch.Tensor, sorted_indices: torch.Tensor, probs: Optional[torch.Tensor],
              restore_shape: Sequence[int], routing_map: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Torch implementation. Returns [T, H] = restore_shape in permuted_tokens' dtype.

    probs: None; or [T, E] with routing_map (Megatron's form); or the 1-D per-row probs that permute returned.
    """
    input_dtype = permuted_tokens.dtype
    row_probs = _row_probs(probs, routing_map)
    if row_probs is not None:
        # May promote (e.g. fp32 router probs with bf16 tokens), as Megatron does; cast back at the end.
        permuted_tokens = permuted_tokens * row_probs.unsqueeze(-1)
    out = torch.zeros(tuple(restore_shape), dtype=permuted_tokens.dtype, device=permuted_tokens.device)
    out.index_add_(0, sorted_indices, permuted_tokens)
    return out.to(input_dtype)


def _row_probs(probs: Optional[torch.Tensor], routing_map: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if probs is None or probs.dim() == 1:
        return probs
    if routing_map is None:
        raise ValueError("unpermute: [tokens, experts] probs need the routing_map that permute used")
    return probs.T.contiguous().masked_select(routing_map.bool().T.contiguous())


def permute_npu(tokens: torch.Tensor, routing_map: torch.Tensor, probs: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Ascend implementation, via torch_npu.npu_moe_token_permute.

    That op takes per-token expert ids [T, topK], not a routing map, and returns its own slot -> row map. So:
    the routing map is converted to ids (each row's experts ascending, padded with the sentinel id E for
    tokens with fewer than topK experts; the sentinel sorts last and num_out_tokens cuts those copies off),
    and Megatron's row -> token sorted_indices and row-aligned probs are rebuilt from the op's map.
    """
    import torch_npu

    num_tokens, num_experts = routing_map.shape
    mask = routing_map.bool()
    per_token = mask.sum(dim=1)
    num_out = int(per_token.sum())  # host sync: the output size depends on the routing
    if num_out == 0:
        empty_probs = None if probs is None else probs.new_empty(0)
        return tokens.new_empty(0, tokens.shape[1]), empty_probs, torch.empty(0, dtype=torch.long,
                                                                               device=tokens.device)
    topk = int(per_token.max())
    expert_ids = torch.arange(num_experts, device=tokens.device).expand(num_tokens, num_experts)
    ids = torch.where(mask, expert_ids, num_experts).sort(dim=1).values[:, :topk].contiguous()
    permuted, slot_to_row = torch_npu.npu_moe_token_permute(tokens, ids, num_out_tokens=num_out)

    flat_ids = ids.reshape(-1)
    real = flat_ids < num_experts
    rows = slot_to_row.long()[real]
    slot_token = torch.arange(num_tokens, device=tokens.device).repeat_interleave(topk)[real]
    sorted_indices = torch.empty(num_out, dtype=torch.long, device=tokens.device)
    sorted_indices[rows] = slot_token
    permuted_probs = None
    if probs is not None:
        permuted_probs = probs.new_empty(num_out)
        permuted_probs[rows] = probs[slot_token, flat_ids[real]]
    return permuted, permuted_probs, sorted_indices


def unpermute_npu(permuted_tokens: torch.Tensor, sorted_indices: torch.Tensor, probs: Optional[torch.Tensor],
                  restore_shape: Sequence[int], routing_map: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Ascend implementation, via torch_npu.npu_moe_token_unpermute.

    That op gathers exactly topK rows per token (out[t] = sum_k probs[t, k] * rows[idx[t * topK + k]]) rather
    than scatter-adding by token id. So each token's rows are laid out in topK slots; tokens with fewer rows
    get their spare slots pointed at appended zero rows (the op forbids repeated indices).
    """
    import torch_npu

    num_tokens, hidden = restore_shape
    num_rows = sorted_indices.numel()
    row_probs = _row_probs(probs, routing_map)
    if row_probs is None:
        row_probs = permuted_tokens.new_ones(num_rows)
    # Megatron multiplies in the promoted dtype; the op takes probs in the tokens' dtype, which for bf16
    # tokens with fp32 probs rounds the probs first.
    row_probs = row_probs.to(permuted_tokens.dtype)

    rows_per_token = torch.bincount(sorted_indices, minlength=num_tokens)
    topk = max(int(rows_per_token.max()), 1) if num_rows else 1  # host sync
    by_token = torch.argsort(sorted_indices, stable=True)  # row ids grouped by token
    token_of = sorted_indices[by_token]
    first_row = torch.cumsum(rows_per_token, dim=0) - rows_per_token
    slot = token_of * topk + (torch.arange(num_rows, device=by_token.device) - first_row[token_of])

    num_slots = num_tokens * topk
    num_pad = num_slots - num_rows
    slot_rows = torch.empty(num_slots, dtype=torch.long, device=by_token.device)
    slot_probs = row_probs.new_zeros(num_slots)
    filled = torch.zeros(num_slots, dtype=torch.bool, device=by_token.device)
    slot_rows[slot] = by_token
    slot_probs[slot] = row_probs[by_token]
    filled[slot] = True
    if num_pad:
        slot_rows[~filled] = torch.arange(num_rows, num_slots, device=by_token.device)
        permuted_tokens = torch.cat([permuted_tokens, permuted_tokens.new_zeros(num_pad, hidden)], dim=0)

    out = torch_npu.npu_moe_token_unpermute(permuted_tokens, slot_rows.to(torch.int32),
                                            probs=slot_probs.view(num_tokens, topk))
    return out
