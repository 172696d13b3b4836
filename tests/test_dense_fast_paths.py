"""The CPU speed paths of the dense layer give megatron's own results: RoPE on the whole head and the fused
SwiGLU with the same bits as megatron's unfused code, the single-rank loss within a few ulps of megatron's
vocab-parallel one (and equal to torch's cross_entropy, HF's), GQA attention without repeating K/V within ulps
of the repeated one. Single-process and small; the end-to-end checks are test_compare / test_parallel_layouts."""
import pytest
import torch
import torch.nn.functional as F

from megatron_patch.runtime import adapters
from megatron_patch.runtime.kernels import attention

EPS = torch.finfo(torch.float32).eps


def gen(seed):
    return torch.Generator().manual_seed(seed)


def _patched(target, original):
    patch = next(p for p in adapters.REGISTRY.patches if p.target == target)
    return patch.make(original)


def _value_and_grad(fn, x, grad_out, *args):
    x = x.detach().clone().requires_grad_()
    out = fn(x, *args)
    out.backward(grad_out)
    return out.detach(), x.grad


def test_whole_head_rope_has_megatrons_bits():
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd as original

    rope = _patched("megatron.core.models.common.embeddings.rope_utils._apply_rotary_pos_emb_bshd", original)
    s, b, groups, d = 16, 2, 2, 8
    freqs = torch.randn(s, 1, 1, d, generator=gen(1)) * 3
    # a query as megatron's qkv split hands it over: a strided view of the fused projection
    mixed = torch.randn(s, b, groups, 4 * d, generator=gen(2))
    grad = torch.randn(s, b, 2 * groups, d, generator=gen(3))
    for mscale in (1.0, 0.7):
        mine = _value_and_grad(lambda x: rope(x[..., :2 * d].reshape(s, b, 2 * groups, d), freqs, mscale=mscale),
                               mixed, grad)
        theirs = _value_and_grad(lambda x: original(x[..., :2 * d].reshape(s, b, 2 * groups, d), freqs,
                                                    mscale=mscale), mixed, grad)
        assert all(torch.equal(m, t) for m, t in zip(mine, theirs))
    # partial rotary (a pass-through part) and MLA's interleaved layout stay megatron's own path
    t = torch.randn(s, b, 4, d, generator=gen(4))
    assert torch.equal(rope(t, freqs[..., :4]), original(t, freqs[..., :4]))
    assert torch.equal(rope(t, freqs, multi_latent_attention=True), original(t, freqs, multi_latent_attention=True))


def _glu(x):  # megatron's unfused MLP path (mlp.py glu with glu_linear_offset 0)
    gate, linear = torch.chunk(x, 2, dim=-1)
    return F.silu(gate) * (linear + 0.0)


def test_fused_swiglu_has_the_unfused_paths_bits(torch_ops_only):  # the compiled pass: test_cpu_native
    from megatron.core.fusions import fused_bias_swiglu as fbs

    swiglu = _patched("megatron.core.fusions.fused_bias_swiglu.bias_swiglu_impl", fbs.bias_swiglu_impl)
    weighted = _patched("megatron.core.fusions.fused_bias_swiglu.weighted_bias_swiglu_impl",
                        fbs.weighted_bias_swiglu_impl)
    x = torch.randn(8, 3, 12, generator=gen(5)) * 4
    grad = torch.randn(8, 3, 6, generator=gen(6))
    mine = _value_and_grad(lambda v: swiglu(v, None), x, grad)
    assert all(torch.equal(m, t) for m, t in zip(mine, _value_and_grad(_glu, x, grad)))
    # SequentialMLP's experts: tokens x 2I with a router prob per token, as MLP's unfused per_token_scale
    probs = torch.rand(24, 1, generator=gen(7))
    flat, grad_flat = x.reshape(24, 12), grad.reshape(24, 6)
    mine = _value_and_grad(lambda v: weighted(v, None, probs), flat, grad_flat)
    theirs = _value_and_grad(lambda v: (_glu(v) * probs).to(v.dtype), flat, grad_flat)
    assert all(torch.equal(m, t) for m, t in zip(mine, theirs))


def test_single_rank_loss_is_torchs_cross_entropy_within_ulps_of_megatrons(monkeypatch):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.cross_entropy import _VocabParallelCrossEntropy

    calls = []

    def original(logits, target, label_smoothing=0.0):
        calls.append(label_smoothing)
        return _VocabParallelCrossEntropy.apply(logits, target, label_smoothing)

    from megatron.core.tensor_parallel import cross_entropy

    # one rank without process groups: megatron's all-reduces are the identity
    for module in (parallel_state, cross_entropy):
        monkeypatch.setattr(module, "get_tensor_model_parallel_world_size", lambda: 1)
        monkeypatch.setattr(module, "get_tensor_model_parallel_rank", lambda: 0)
        monkeypatch.setattr(module, "get_tensor_model_parallel_group", lambda: None)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda *a, **k: None)
    loss = _patched("megatron.core.tensor_parallel.cross_entropy.vocab_parallel_cross_entropy", original)
    s, b, vocab = 16, 2, 96
    logits = torch.randn(s, b, vocab, generator=gen(8)) * 8
    target = torch.randint(0, vocab, (s, b), generator=gen(9))
    grad = torch.rand(s, b, generator=gen(10))
    mine = _value_and_grad(lambda x: loss(x, target), logits, grad)
    assert not calls
    theirs = _value_and_grad(lambda x: original(x.clone(), target), logits, grad)
    hf = _value_and_grad(lambda x: F.cross_entropy(x.view(-1, vocab), target.view(-1), reduction="none").view(s, b),
                         logits, grad)
    assert all(torch.equal(m, h) for m, h in zip(mine, hf))
    # a few ulps of the logits' scale (the loss is log-sum-exp minus a logit) and of the softmax
    assert (mine[0] - theirs[0]).abs().max() <= 4 * EPS * logits.abs().max()
    assert (mine[1] - theirs[1]).abs().max() <= 4 * EPS
    loss(logits, target, label_smoothing=0.1)
    assert calls == [0.0, 0.1]  # smoothing: megatron's own


def test_gqa_attention_without_repeated_kv_is_the_repeated_one_within_ulps():
    assert attention.core_attention.takes_gqa
    b, heads, groups, s, d = 2, 8, 2, 32, 16
    q = torch.randn(b, heads, s, d, generator=gen(11))
    k, v = (torch.randn(b, groups, s, d, generator=gen(12 + i)) for i in range(2))
    grad = torch.randn(b, heads, s, d, generator=gen(14))
    runs = []
    for repeat in (heads // groups, 1):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        kk, vv = (t.repeat_interleave(repeat, dim=1) for t in leaves[1:])
        out = attention.core_attention(leaves[0], kk, vv, scale=d ** -0.5, causal=True)
        out.backward(grad)
        runs.append([out.detach()] + [t.grad for t in leaves])
    for repeated, native in zip(*runs):
        assert (repeated - native).abs().max() <= 8 * EPS * repeated.abs().max()


@pytest.mark.parametrize("device, fused", [("cpu", True), ("cuda", False)])
def test_swiglu_fusion_is_on_for_cpu_builds(device, fused):
    from megatron.core.transformer import TransformerConfig

    from megatron_patch.models.builder import fuse_swiglu_on_cpu

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, gated_linear_unit=True,
                               activation_func=F.silu, add_bias_linear=False)
    fuse_swiglu_on_cpu(config, device)
    assert config.bias_activation_fusion is fused
    plain = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, add_bias_linear=False)
    fuse_swiglu_on_cpu(plain, "cpu")  # gelu, not gated: megatron's unfused path
    assert not plain.bias_activation_fusion
