"""The NPU patches (runtime/npu_adapter.py), run through the torch_npu test double, give the same results
as the megatron-core functions they replace. UNVERIFIED ON HARDWARE: only the double stands behind them."""
import pytest
import torch

from megatron_patch.runtime import npu_adapter  # noqa: F401 - registers the NPU patches
from megatron_patch.runtime.adapters import REGISTRY


def _replacement(target):
    (patch,) = [p for p in REGISTRY.patches if p.target == target and p.devices == ("npu",)]
    assert patch.devices == ("npu",)
    from megatron_patch.runtime.patching import _resolve

    owner, name = _resolve(target)
    original = getattr(owner, name)
    return original, patch.make(original)


def test_permute_and_unpermute_match_megatron(npu_double):
    torch.manual_seed(0)
    tokens = torch.randn(10, 8)
    scores = torch.rand(10, 4)
    top = scores.topk(2, dim=1).indices
    routing_map = torch.zeros(10, 4, dtype=torch.bool).scatter_(1, top, True)
    probs = torch.where(routing_map, scores, torch.zeros_like(scores))
    orig_p, new_p = _replacement("megatron.core.transformer.moe.moe_utils.permute")
    orig_u, new_u = _replacement("megatron.core.transformer.moe.moe_utils.unpermute")
    ref = orig_p(tokens, routing_map, probs)
    got = new_p(tokens, routing_map, probs)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, atol=0, rtol=0)
    back_ref = orig_u(ref[0], ref[2], tokens.shape, probs=probs, routing_map=routing_map)
    back = new_u(got[0], got[2], tokens.shape, probs=probs, routing_map=routing_map)
    torch.testing.assert_close(back, back_ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mla", [False, True])
def test_rope_matches_megatron(npu_double, mla):
    torch.manual_seed(0)
    t = torch.randn(6, 2, 3, 24)  # [s, b, heads, dim]; last 8 dims pass through
    freqs = torch.randn(6, 1, 1, 16)
    original, new = _replacement("megatron.core.models.common.embeddings.rope_utils._apply_rotary_pos_emb_bshd")
    ref = original(t, freqs, multi_latent_attention=mla, mscale=0.7)
    torch.testing.assert_close(new(t, freqs, multi_latent_attention=mla, mscale=0.7), ref, atol=1e-6, rtol=1e-6)


def test_swiglu_matches_megatron(npu_double):
    x = torch.randn(2, 5, 16)
    original, new = _replacement("megatron.core.fusions.fused_bias_swiglu.bias_swiglu_impl")
    torch.testing.assert_close(new(x, None), original(x, None), atol=1e-6, rtol=1e-6)
