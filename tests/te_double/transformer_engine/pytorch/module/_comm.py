"""The tensor-parallel communication TE's linears do themselves (megatron leaves it to them): column
parallel gathers the sequence-parallel input, row parallel reduces (or reduce-scatters) the output.
Autograd-aware, so gradients flow as in TE."""
from __future__ import annotations

import torch
import torch.distributed as dist


# torch >= 2.13 names them *_single (the *_tensor spellings warn); older torch has only the latter.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _gather(x, group):
    out = x.new_empty((x.shape[0] * dist.get_world_size(group), *x.shape[1:]))
    _ALL_GATHER(out, x.contiguous(), group=group)
    return out


def _reduce_scatter(x, group):
    out = x.new_empty((x.shape[0] // dist.get_world_size(group), *x.shape[1:]))
    _REDUCE_SCATTER(out, x.contiguous(), group=group)
    return out


def _all_reduce(x, group):
    x = x.clone()
    dist.all_reduce(x, group=group)
    return x


class _Collective(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, forward_op, backward_op):
        ctx.group, ctx.backward_op = group, backward_op
        return forward_op(x, group) if forward_op else x

    @staticmethod
    def backward(ctx, grad):
        grad = ctx.backward_op(grad, ctx.group) if ctx.backward_op else grad
        return grad, None, None, None


def _active(group) -> bool:
    return group is not None and dist.get_world_size(group) > 1


def column_input(x, group, sequence_parallel: bool):
    """Input of a column-parallel GEMM: the whole sequence (gathered under SP); its gradient summed over TP."""
    if not _active(group):
        return x
    if sequence_parallel:
        return _Collective.apply(x, group, _gather, _reduce_scatter)
    return _Collective.apply(x, group, None, _all_reduce)


def row_output(y, group, sequence_parallel: bool):
    """Output of a row-parallel GEMM: partial sums reduced (scattered over the sequence under SP)."""
    if not _active(group):
        return y
    if sequence_parallel:
        return _Collective.apply(y, group, _reduce_scatter, _gather)
    return _Collective.apply(y, group, _all_reduce, None)
