"""One forward/backward over a global batch with megatron-core's pipeline schedules.

Shared by training, the layout-equivalence tests and the comparison tool, so "the loss at layout X"
means the same computation everywhere.
"""
from __future__ import annotations

from functools import partial

import torch

from megatron_patch.data.batch import Batch


def data_parallel_share(batch: Batch) -> Batch:
    """The rows of the global batch this data-parallel rank trains on."""
    from megatron.core import parallel_state

    dp = parallel_state.get_data_parallel_world_size()
    rank = parallel_state.get_data_parallel_rank()
    rows = batch.tokens.shape[0]
    if rows % dp:
        raise ValueError(f"global batch {rows} is not divisible by data-parallel size {dp}")
    per = rows // dp
    return batch.slice(rank * per, (rank + 1) * per)


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """(loss sum, token count, report): the schedule divides by the count (and by the number of
    micro-batches); the report keeps sum and count so the logged loss is an exact token mean.

    With context parallelism each CP rank holds part of every sequence: the count is the whole
    sequence's (summed over CP) and the sum is scaled by CP, because the gradient all-reduce averages
    over data x context parallel ranks; the CP ranks' gradients then add up to the token mean's."""
    from megatron.core import parallel_state

    mask = loss_mask.float()
    loss_sum = (output_tensor.float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    report = {"lm loss": torch.stack([loss_sum.detach().clone(), mask.sum()])}
    cp = parallel_state.get_context_parallel_world_size()
    if cp > 1:
        torch.distributed.all_reduce(num_tokens, group=parallel_state.get_context_parallel_group())
        loss_sum = loss_sum * cp
    return loss_sum, num_tokens, report


def context_parallel_share(batch: Batch) -> dict:
    """This CP rank's two sequence chunks of a micro-batch (megatron's get_batch_on_this_cp_rank: 2 x CP
    chunks, rank r holds r and 2CP-1-r), as model inputs."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    return get_batch_on_this_cp_rank({"tokens": batch.tokens, "labels": batch.labels,
                                      "loss_mask": batch.loss_mask, "position_ids": batch.position_ids})


def packed_params(positions: torch.Tensor):
    """megatron-core's PackedSeqParams (the `thd` format TE's attention and megatron's RoPE take) for a packed
    micro-batch flattened to one sequence: a segment starts wherever the position id is 0 (every row starts one)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    flat = positions.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                           max_seqlen_kv=longest)


def _forward_step(data_iterator, model):
    micro = next(data_iterator)
    if micro.packed:
        # [b, s] rows -> one [1, b*s] sequence whose segments are the samples (megatron's thd layout)
        part = {k: v.reshape(1, -1) for k, v in (("tokens", micro.tokens), ("labels", micro.labels),
                                                ("loss_mask", micro.loss_mask), ("position_ids", micro.positions))}
        packed = packed_params(micro.positions)
    else:
        part, packed = context_parallel_share(micro), None
    # loss_mask also masks the multi-token-prediction loss (DeepSeek-V3 MTP) inside GPTModel.
    output = model(part["tokens"], part["position_ids"], None, labels=part["labels"], loss_mask=part["loss_mask"],
                   packed_seq_params=packed)
    return output, partial(_loss_func, part["loss_mask"])


def forward_backward(chunks: list, batch: Batch, micro_batch_size: int, forward_only: bool = False):
    """Run this rank's data-parallel share of `batch` in micro-batches through the schedule.

    Returns the token-mean loss over the whole global batch on the last pipeline stage (None elsewhere)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    share = data_parallel_share(batch)
    rows, seq = share.tokens.shape
    if rows % micro_batch_size:
        raise ValueError(f"per-rank batch {rows} is not divisible by micro batch size {micro_batch_size}")
    micro = [share.slice(i, i + micro_batch_size) for i in range(0, rows, micro_batch_size)]
    iterators = [iter(micro) for _ in chunks] if len(chunks) > 1 else iter(micro)
    if batch.packed:  # each micro-batch travels (between pipeline stages too) as one sequence of all its rows
        seq, micro_batch_size = seq * micro_batch_size, 1
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step, data_iterator=iterators,
        model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=len(micro),
        seq_length=seq, micro_batch_size=micro_batch_size, forward_only=forward_only,
    )
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    # Token-weighted mean over micro-batches and data- (and context-) parallel ranks.
    totals = torch.stack([l["lm loss"] for l in losses]).sum(dim=0)
    if parallel_state.get_data_parallel_world_size(with_context_parallel=True) > 1:
        torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return totals[0] / totals[1]
