"""Padded (capacity-bound) token dispatch when the capacity exceeds the tokens.

With `moe_pad_expert_input_to_capacity`, megatron-core 0.16.1's permute keeps `argsort(routing_map)[:, :capacity]`
per expert, which has only num_tokens columns when capacity > num_tokens (e.g. capacity factor 4 with
top-2 of 4 experts): the dispatcher's [experts, capacity] views then fail. Every token already fits there,
so the missing slots are filler rows: zero hidden states, router prob 0, pointing at token 0 (the experts'
output is scaled by the prob, so they add exactly zero in unpermute). Shapes stay fixed by the config.
"""
from __future__ import annotations

import functools

import torch

from megatron_patch.runtime.adapters import ALL, REGISTRY, TESTED

patch = REGISTRY.add


@patch("megatron.core.transformer.moe.moe_utils.permute",
       "drop-and-pad permute with capacity > tokens: pad each expert to its capacity with zero-prob rows",
       TESTED, ALL)
def _permute(original):
    @functools.wraps(original)
    def permute(tokens, routing_map, probs=None, num_out_tokens=None, fused=False, drop_and_pad=False):
        num_tokens, num_experts = routing_map.shape
        if fused or not drop_and_pad or num_out_tokens is None or num_out_tokens // num_experts <= num_tokens:
            return original(tokens, routing_map, probs, num_out_tokens, fused, drop_and_pad)
        fill = num_out_tokens // num_experts - num_tokens
        rows, row_probs, indices = original(tokens, routing_map, probs, num_tokens * num_experts, fused,
                                            drop_and_pad)

        def pad(t, value_shape=()):  # [E * T, ...] -> [E * capacity, ...]
            t = t.view(num_experts, num_tokens, *value_shape)
            filler = t.new_zeros(num_experts, fill, *value_shape)
            return torch.cat([t, filler], dim=1).view(-1, *value_shape)

        return (pad(rows, rows.shape[1:]), None if row_probs is None else pad(row_probs), pad(indices))

    return permute
