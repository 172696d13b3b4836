"""Group-limited MoE routing with the group score the checkpoint was trained with.

megatron-core scores an expert group by the sum of its top-(topk // group_topk) expert scores. DeepSeek's
models fix the number instead: DeepSeek-V2's `group_limited_greedy` scores a group by its single best
expert (top-1), DeepSeek-V3's `noaux_tc` by the sum of its best two (top-2). The two rules agree only
when topk // group_topk happens to equal that number (not for the real DeepSeek-V2: 6 // 3 = 2, measured
17-32% of tokens routed differently on random logits).

A family sets `config.moe_router_group_score_topk` (a field our config classes add to megatron's, see
models/configs.py); the router patch below makes it visible to `group_limited_topk` for the duration of
one routing call. Where it is None (or a plain megatron config is used) megatron's own rule runs.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools

import torch

from megatron_patch.runtime.adapters import ALL, REGISTRY, TESTED

CONFIG_ATTR = "moe_router_group_score_topk"
_GROUP_SCORE_TOPK: contextvars.ContextVar[int | None] = contextvars.ContextVar(CONFIG_ATTR, default=None)

patch = REGISTRY.add


@contextlib.contextmanager
def group_score_topk(per_group: int | None):
    """Within this block the patched group_limited_topk scores groups by their top-`per_group` sum
    (None: megatron's own rule)."""
    token = _GROUP_SCORE_TOPK.set(per_group)
    try:
        yield
    finally:
        _GROUP_SCORE_TOPK.reset(token)


def group_limited_topk_by(scores: torch.Tensor, topk: int, num_groups: int, group_topk: int,
                          group_score_topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the `group_topk` groups with the largest sum of their top-`group_score_topk` scores, then take
    the top-`topk` experts among them. Returns (scores, indices) of the chosen experts, as megatron's."""
    num_tokens, num_experts = scores.shape
    grouped = scores.view(num_tokens, num_groups, num_experts // num_groups)
    group_scores = grouped.topk(group_score_topk, dim=-1)[0].sum(dim=-1)
    chosen = torch.topk(group_scores, k=group_topk, dim=-1, sorted=False)[1]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, chosen, True)
    keep = keep.unsqueeze(-1).expand_as(grouped).reshape(num_tokens, num_experts)
    return torch.topk(scores.masked_fill(~keep, float("-inf")), k=topk, dim=-1)


@patch("megatron.core.transformer.moe.moe_utils.group_limited_topk",
       "score expert groups by a fixed top-n (DeepSeek-V2: max, V3: top-2 sum) when the config says so",
       TESTED, ALL)
def _group_limited_topk(original):
    @functools.wraps(original)
    def group_limited_topk(scores, topk, num_tokens, num_experts, num_groups, group_topk):
        per_group = _GROUP_SCORE_TOPK.get()
        if per_group is None:
            return original(scores, topk, num_tokens, num_experts, num_groups, group_topk)
        return group_limited_topk_by(scores, topk, num_groups, group_topk, per_group)

    return group_limited_topk


@patch("megatron.core.transformer.moe.router.TopKRouter.routing",
       "pass config.moe_router_group_score_topk down to group_limited_topk for this routing call",
       TESTED, ALL)
def _routing(original):
    @functools.wraps(original)
    def routing(self, logits, *args, **kwargs):
        per_group = getattr(self.config, CONFIG_ATTR, None)
        if per_group is not None and self.config.moe_router_fusion:
            raise ValueError(f"moe_router_fusion=True cannot honour {CONFIG_ATTR}={per_group} "
                             "(Transformer Engine's fused router scores groups its own way); turn fusion off")
        with group_score_topk(per_group):
            return original(self, logits, *args, **kwargs)

    return routing
