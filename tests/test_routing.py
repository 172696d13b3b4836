"""Group-limited routing (runtime/routing.py) against transformers' own DeepSeek-V2 and V3 routers.

megatron-core scores a group by its top-(topk // group_topk) sum; DeepSeek-V2 by its best expert and
DeepSeek-V3 by its best two. With the group score fixed, megatron's routing function must pick exactly
the experts HF picks, with the same weights, for any group shape; without it, the cases where the two
rules differ must actually route differently (so the comparison can fail).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DeepseekV2Config, DeepseekV3Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

from megatron_patch import runtime

HIDDEN = 16
TOKENS = 64


@pytest.fixture(scope="module")
def megatron_routing():
    runtime.setup("cpu")
    from megatron.core.transformer.moe import moe_utils
    from megatron_patch.runtime.routing import group_score_topk

    yield moe_utils, group_score_topk
    runtime.teardown()


@st.composite
def group_shapes(draw, min_group_size):
    n_group = draw(st.sampled_from([2, 4, 8]))
    group_size = draw(st.integers(min_group_size, 4))
    topk_group = draw(st.integers(1, n_group - 1))
    topk = draw(st.integers(1, topk_group * group_size))
    return n_group, group_size, topk_group, topk, draw(st.integers(0, 2**16))


def _hidden(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(TOKENS, HIDDEN, generator=g), g


def _routing(moe_utils, logits, topk, n_group, topk_group, **kw):
    probs, routing_map = moe_utils.topk_routing_with_score_function(
        logits, topk, num_groups=n_group, group_topk=topk_group, **kw)
    return probs, routing_map


def _dense(indices, weights, experts):
    return torch.zeros(indices.shape[0], experts).scatter(1, indices, weights)


def _hf_router(router_cls, config_cls, shape, **config):
    """An HF router with random weights over `shape`'s groups, and the hidden states to route."""
    n_group, group_size, topk_group, topk, seed = shape
    cfg = config_cls(hidden_size=HIDDEN, num_attention_heads=4, n_routed_experts=n_group * group_size,
                     num_experts_per_tok=topk, n_group=n_group, topk_group=topk_group, **config)
    hidden, g = _hidden(seed)
    router = router_cls(cfg)
    router.weight.data = torch.randn(n_group * group_size, HIDDEN, generator=g)
    return router, hidden, g


def _assert_megatron_matches(megatron_routing, router, hidden, shape, group_score, **kw):
    """megatron's routing of HF's logits with the group score fixed: HF's experts, HF's weights."""
    moe_utils, group_score_topk = megatron_routing
    n_group, group_size, topk_group, topk, _ = shape
    logits, hf_weights, hf_indices = router(hidden)
    with group_score_topk(group_score):
        probs, routing_map = _routing(moe_utils, logits, topk, n_group, topk_group, **kw)
    experts = n_group * group_size
    assert torch.equal(routing_map, _dense(hf_indices, torch.ones_like(hf_weights), experts).bool())
    torch.testing.assert_close(probs, _dense(hf_indices, hf_weights, experts), rtol=0, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(group_shapes(min_group_size=1))
def test_v2_group_limited_greedy_matches_hf(megatron_routing, shape):
    router, hidden, _ = _hf_router(DeepseekV2TopkRouter, DeepseekV2Config, shape,
                                   topk_method="group_limited_greedy", routed_scaling_factor=16.0)
    _assert_megatron_matches(megatron_routing, router, hidden, shape, 1, use_pre_softmax=True,
                             scaling_factor=16.0, score_function="softmax")


@settings(max_examples=40, deadline=None)
@given(group_shapes(min_group_size=2))
def test_v3_noaux_tc_matches_hf(megatron_routing, shape):
    router, hidden, g = _hf_router(DeepseekV3TopkRouter, DeepseekV3Config, shape, norm_topk_prob=shape[3] > 1,
                                   routed_scaling_factor=2.5)
    router.e_score_correction_bias.copy_(torch.randn(router.weight.shape[0], generator=g) * 0.1)
    _assert_megatron_matches(megatron_routing, router, hidden, shape, 2, scaling_factor=2.5,
                             score_function="sigmoid", expert_bias=router.e_score_correction_bias)


def test_megatron_rule_differs_where_the_ratio_differs(megatron_routing):
    """Real DeepSeek-V2 shape (160 experts, 8 groups, top-3 groups, top-6 experts): megatron's own
    top-2-sum group score routes a good share of tokens differently from HF's max; the patch closes it."""
    moe_utils, group_score_topk = megatron_routing
    logits = torch.randn(512, 160, generator=torch.Generator().manual_seed(0))
    kw = dict(use_pre_softmax=True, score_function="softmax")
    _, native = _routing(moe_utils, logits, 6, 8, 3, **kw)
    with group_score_topk(1):
        _, fixed = _routing(moe_utils, logits, 6, 8, 3, **kw)
    scores = logits.softmax(-1)
    groups = scores.view(512, 8, 20).max(-1).values.topk(3, -1)[1]
    mask = torch.zeros(512, 8, dtype=torch.bool).scatter(1, groups, True).repeat_interleave(20, 1)
    hf = _dense(scores.masked_fill(~mask, 0).topk(6, -1)[1], torch.ones(512, 6), 160).bool()
    assert torch.equal(fixed, hf)
    differing = (native != hf).any(-1).float().mean().item()
    assert differing > 0.05, differing


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_router_module_with_family_config_matches_hf(megatron_routing, family):
    """The runtime patch itself: megatron's TopKRouter built from the family's config (which sets
    moe_router_group_score_topk) routes HF's logits to HF's experts with HF's weights, with no
    group_score_topk block around the call. 4 groups of 8 experts, top-2 groups, top-6 experts: megatron's
    own group score (top-3 sum) differs from V2's max and V3's top-2 sum for a share of tokens."""
    from types import SimpleNamespace

    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_patch.convert.mini import config_dict
    from megatron_patch.models.families import family_for_config

    routing = dict(n_routed_experts=32, n_group=4, topk_group=2, num_experts_per_tok=6, first_k_dense_replace=0)
    if family == "deepseek_v2":
        routing["topk_method"] = "group_limited_greedy"
    config_cls = DeepseekV2Config if family == "deepseek_v2" else DeepseekV3Config
    hf = config_cls(**config_dict(family, overrides=routing))
    config = family_for_config(hf).to_mcore_config(hf, moe_router_load_balancing_type="none")
    assert config.moe_router_group_score_topk == (1 if family == "deepseek_v2" else 2)
    groups = SimpleNamespace(tp=None, cp=None, tp_cp=None, tp_dp_cp=None)
    router = TopKRouter(config, pg_collection=groups)
    router_cls = DeepseekV2TopkRouter if family == "deepseek_v2" else DeepseekV3TopkRouter
    hf_router = router_cls(hf)
    gen = torch.Generator().manual_seed(1)
    hf_router.weight.data = torch.randn(hf_router.weight.shape, generator=gen)
    if family == "deepseek_v3":
        hf_router.e_score_correction_bias.copy_(torch.randn(hf.n_routed_experts, generator=gen) * 0.1)
        router.expert_bias.copy_(hf_router.e_score_correction_bias)
    hidden = torch.randn(256, hf.hidden_size, generator=gen)
    logits, hf_weights, hf_indices = hf_router(hidden)
    probs, routing_map = router.routing(logits)
    experts = hf.n_routed_experts
    assert torch.equal(routing_map, _dense(hf_indices, torch.ones_like(hf_weights), experts).bool())
    torch.testing.assert_close(probs, _dense(hf_indices, hf_weights, experts), rtol=0, atol=1e-6)
