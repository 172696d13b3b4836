"""megatron_patch.runtime.kernels: torch kernels against independent references, NPU kernels (through the
torch_npu test double in tests/npu_double) against the torch kernels."""

import importlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_patch.runtime import kernels
from megatron_patch.runtime.kernels import attention, moe, rms_norm, rope, swiglu

from conftest import NPU_DOUBLE

ATOL = RTOL = 1e-6


def close(a, b, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------------------
def test_import_is_silent_and_does_not_import_torch_npu(monkeypatch, capfd):
    # Re-import the package from scratch with a torch_npu on the path: importing it (and asking for a CPU
    # kernel) must neither load torch_npu nor print anything. In-process, since a fresh interpreter would
    # spend seconds re-importing torch; monkeypatch puts the original modules back afterwards.
    import megatron_patch.runtime as runtime_pkg

    monkeypatch.syspath_prepend(str(NPU_DOUBLE))
    monkeypatch.setattr(runtime_pkg, "kernels", kernels)
    for name in [m for m in sys.modules if m == kernels.__name__ or m.startswith(kernels.__name__ + ".")]:
        monkeypatch.delitem(sys.modules, name)
    capfd.readouterr()
    fresh = importlib.import_module(kernels.__name__)
    assert fresh is not kernels
    fresh.get("rms_norm", "cpu")
    assert "torch_npu" not in sys.modules
    assert capfd.readouterr() == ("", "")


def test_registry_without_torch_npu():
    assert "torch_npu" not in sys.modules and not kernels.npu_available()
    for name in kernels.NAMES:
        for device in ("cpu", "cuda", "npu", torch.device("cpu")):
            fn = kernels.get(name, device)
            assert not fn.__name__.endswith("_npu"), (name, device)
    assert kernels.get("rms_norm", "npu") is rms_norm.rms_norm
    with pytest.raises(KeyError, match="unknown kernel"):
        kernels.get("no_such_kernel", "cpu")


def test_registry_with_torch_npu(npu_double):
    assert kernels.npu_available()
    assert kernels.get("rms_norm", "npu") is rms_norm.rms_norm_npu
    assert kernels.get("core_attention", "npu") is attention.core_attention_npu
    assert kernels.get("apply_rope", "npu") is rope.apply_rope_npu
    assert kernels.get("swiglu", "npu") is swiglu.swiglu_npu
    assert kernels.get("weighted_swiglu", "npu") is swiglu.weighted_swiglu_npu
    assert kernels.get("grouped_matmul", "npu") is moe.grouped_matmul_npu
    assert kernels.get("permute", "npu") is moe.permute_npu
    assert kernels.get("unpermute", "npu") is moe.unpermute_npu
    assert kernels.get("deinterleave", "npu") is rope.deinterleave  # layout-only, shared
    assert kernels.get("rms_norm", "cpu") is rms_norm.rms_norm
    assert kernels.get("rms_norm", "cuda") is rms_norm.rms_norm


def test_double_is_gone_after_fixture():
    assert "torch_npu" not in sys.modules
    assert str(NPU_DOUBLE) not in sys.path


# ----------------------------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------------------------
def reference_attention(q, k, v, scale, causal, attn_mask):
    """Explicit softmax(q k^T * scale + mask) v in float64."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) * scale
    sq, sk = scores.shape[-2:]
    masked = torch.zeros(sq, sk, dtype=torch.bool)
    if causal:
        masked = masked | torch.ones(sq, sk, dtype=torch.bool).triu(1)
    if attn_mask is not None:
        masked = masked | attn_mask
    scores = scores + torch.zeros_like(scores).masked_fill(masked, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).float()


def padding_mask(b, sk, lengths):
    # Megatron convention: True = masked out; [b, 1, 1, sk] key padding.
    return (torch.arange(sk)[None, :] >= torch.tensor(lengths)[:, None]).view(b, 1, 1, sk)


ATTN_CASES = {
    # name: (b, hq, hkv, sq, sk, dqk, dv, causal, mask builder)
    "causal": (2, 3, 3, 7, 7, 16, 16, True, None),
    "full": (2, 3, 3, 5, 9, 16, 16, False, None),
    "causal_rect": (1, 2, 2, 4, 6, 8, 8, True, None),  # sq != sk: the triangle starts at the top-left
    "mla_dims_causal": (2, 2, 2, 6, 6, 24, 16, True, None),  # MLA-style: dv < dqk (192/128 scaled down)
    "dv_larger": (1, 2, 2, 4, 4, 8, 12, True, None),
    "gqa_causal": (2, 4, 2, 6, 6, 16, 16, True, None),
    "padding_mask": (2, 2, 2, 5, 5, 8, 8, False, lambda b, h, sq, sk: padding_mask(b, sk, [5, 3])),
    "padding_mask_causal": (2, 2, 2, 5, 5, 8, 8, True, lambda b, h, sq, sk: padding_mask(b, sk, [5, 3])),
    "full_bnss_mask": (2, 2, 1, 4, 6, 8, 8, False,
                       lambda b, h, sq, sk: torch.rand(b, h, sq, sk, generator=gen(3)) < 0.3),
    "ss_mask": (1, 2, 2, 4, 4, 8, 8, False, lambda b, h, sq, sk: torch.eye(sq, sk, dtype=torch.bool).flip(-1)),
}


def attn_inputs(b, hq, hkv, sq, sk, dqk, dv, causal, mask_fn):
    g = gen(1)
    q = torch.randn(b, hq, sq, dqk, generator=g)
    k = torch.randn(b, hkv, sk, dqk, generator=g)
    v = torch.randn(b, hkv, sk, dv, generator=g)
    mask = None if mask_fn is None else mask_fn(b, hq, sq, sk)
    if mask is not None:  # keep at least one key per query row visible (no fully masked rows)
        mask = mask.clone()
        mask[..., 0] = False
    return q, k, v, dqk ** -0.5, causal, mask


@pytest.mark.parametrize("case", ATTN_CASES)
def test_core_attention_torch(case):
    q, k, v, scale, causal, mask = attn_inputs(*ATTN_CASES[case])
    out = attention.core_attention(q, k, v, scale=scale, causal=causal, attn_mask=mask)
    assert out.shape == (q.shape[0], q.shape[1], q.shape[2], v.shape[-1])
    close(out, reference_attention(q, k, v, scale, causal, mask))


def test_core_attention_torch_mla_gradients():
    # dv < dqk: on CPU v is zero-padded to take SDPA's flash kernel; the slice must hand the gradient back
    q, k, v, scale, causal, mask = attn_inputs(*ATTN_CASES["mla_dims_causal"])
    grad_out = torch.randn(*q.shape[:-1], v.shape[-1], generator=gen(4))
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    attention.core_attention(*ours, scale=scale, causal=True).backward(grad_out)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    reference_attention(*ref, scale, True, None).double().backward(grad_out.double())
    for mine, theirs in zip(ours, ref):
        close(mine.grad, theirs.grad.float())


@pytest.mark.parametrize("case", ATTN_CASES)
def test_core_attention_npu(case, npu_double):
    q, k, v, scale, causal, mask = attn_inputs(*ATTN_CASES[case])
    out = attention.core_attention_npu(q, k, v, scale=scale, causal=causal, attn_mask=mask)
    close(out, attention.core_attention(q, k, v, scale=scale, causal=causal, attn_mask=mask))


def test_core_attention_npu_uses_compressed_causal_mask(npu_double, monkeypatch):
    seen = {}
    real = npu_double.npu_fusion_attention

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(npu_double, "npu_fusion_attention", spy)
    q, k, v, scale, _, _ = attn_inputs(*ATTN_CASES["causal"])
    attention.core_attention_npu(q, k, v, scale=scale, causal=True)
    assert seen["sparse_mode"] == 2 and seen["input_layout"] == "BNSD" and seen["keep_prob"] == 1.0
    assert seen["atten_mask"].shape == (2048, 2048) and seen["atten_mask"].dtype == torch.bool


# ----------------------------------------------------------------------------------------------------------------
# rms_norm
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_deepseek():
    from transformers.models.deepseek_v3 import modeling_deepseek_v3

    return modeling_deepseek_v3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_torch_matches_hf(dtype, hf_deepseek):
    g = gen(2)
    x = (torch.randn(3, 5, 32, generator=g) * 3).to(dtype)
    hf = hf_deepseek.DeepseekV3RMSNorm(32, eps=1e-6).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(32, generator=g))
        expected = hf(x)
    out = rms_norm.rms_norm(x, hf.weight.detach(), 1e-6)
    assert out.dtype == expected.dtype
    close(out, expected, atol=0, rtol=0)  # same ops in the same order: bit-identical


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_torch_gradients_match_hf(dtype, hf_deepseek):
    # forward: bits of HF's; backward (closed form): HF's autograd gradients within rounding
    g = gen(11)
    x = (torch.randn(3, 5, 32, generator=g) * 3).to(dtype)
    grad_out = torch.randn(3, 5, 32, generator=g).to(dtype)
    hf = hf_deepseek.DeepseekV3RMSNorm(32, eps=1e-6).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(32, generator=g))
    weight = hf.weight.detach().clone().requires_grad_()
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = rms_norm.rms_norm(ours, weight, 1e-6)
    expected = hf(theirs)
    close(out, expected, atol=0, rtol=0)
    out.backward(grad_out)
    expected.backward(grad_out)
    eps = torch.finfo(dtype).eps  # a few ulps of each gradient's largest entry
    for mine, ref in ((ours.grad, theirs.grad), (weight.grad, hf.weight.grad)):
        close(mine.float(), ref.float(), rtol=0, atol=8 * eps * ref.float().abs().max().item())


def test_rms_norm_npu(npu_double):
    g = gen(3)
    x = torch.randn(4, 6, 32, generator=g)
    w = torch.randn(32, generator=g)
    close(rms_norm.rms_norm_npu(x, w, 1e-5), rms_norm.rms_norm(x, w, 1e-5))
    # fp32 weight with bf16 activations: the weight is applied after the op, so nothing is rounded early.
    xb = x.bfloat16()
    out = rms_norm.rms_norm_npu(xb, w, 1e-5)
    assert out.dtype == torch.float32
    close(out, rms_norm.rms_norm(xb, w, 1e-5), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# rope
# ----------------------------------------------------------------------------------------------------------------
def rope_cos_sin(b, s, d, g):
    pos = torch.arange(s, dtype=torch.float32)[None, :] + torch.randint(0, 50, (b, 1), generator=g)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = pos[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)  # [b, s, d], HF layout
    return emb.cos(), emb.sin()


def test_apply_rope_matches_hf(hf_deepseek):
    g = gen(4)
    b, h, s, d = 2, 3, 5, 16
    q, k = torch.randn(b, h, s, d, generator=g), torch.randn(b, h, s, d, generator=g)
    cos, sin = rope_cos_sin(b, s, d, g)
    q_ref, k_ref = hf_deepseek.apply_rotary_pos_emb(q, k, cos, sin)
    close(rope.apply_rope(q, cos[:, None], sin[:, None]), q_ref)
    close(rope.apply_rope(k, cos[:, None], sin[:, None]), k_ref)


def test_deinterleave_then_rope_matches_hf_interleave(hf_deepseek):
    g = gen(5)
    b, h, s, d = 2, 3, 5, 16
    q, k = torch.randn(b, h, s, d, generator=g), torch.randn(b, h, s, d, generator=g)
    cos, sin = rope_cos_sin(b, s, d, g)
    q_ref, k_ref = hf_deepseek.apply_rotary_pos_emb_interleave(q, k, cos, sin)
    close(rope.apply_rope(rope.deinterleave(q), cos[:, None], sin[:, None]), q_ref)
    close(rope.apply_rope(rope.deinterleave(k), cos[:, None], sin[:, None]), k_ref)
    x = torch.arange(8.0)
    assert rope.deinterleave(x).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


@pytest.mark.parametrize("layout", ["bnsd", "sbnd_3d", "5d"])
def test_apply_rope_npu(layout, npu_double):
    g = gen(6)
    d = 16
    if layout == "bnsd":
        t = torch.randn(2, 3, 5, d, generator=g)
        cos, sin = (c[:, None] for c in rope_cos_sin(2, 5, d, g))  # [b, 1, s, d]
    elif layout == "sbnd_3d":
        t = torch.randn(5, 3, d, generator=g)  # [s, heads, d]
        cos, sin = (c[0][:, None] for c in rope_cos_sin(1, 5, d, g))  # [s, 1, d]
    else:
        t = torch.randn(5, 2, 3, 2, d, generator=g)  # [s, b, groups, heads, d]
        cos, sin = (c[0][:, None, None, None] for c in rope_cos_sin(1, 5, d, g))
    out = rope.apply_rope_npu(t, cos, sin)
    assert out.shape == t.shape
    close(out, rope.apply_rope(t, cos, sin))


# ----------------------------------------------------------------------------------------------------------------
# swiglu
# ----------------------------------------------------------------------------------------------------------------
def test_swiglu_torch(torch_ops_only):
    x = torch.randn(4, 5, 24, generator=gen(7))
    gate, up = x[..., :12], x[..., 12:]
    close(swiglu.swiglu(x), gate * torch.sigmoid(gate) * up)
    # megatron's unfused reference, loaded from its own source (see load_megatron_function)
    close(swiglu.swiglu(x), load_megatron_function("fusions/fused_bias_swiglu.py", "swiglu")(x))


def test_swiglu_torch_backward_is_autograds(torch_ops_only):
    # the custom backward (one gradient tensor, no cat) runs autograd's own ops: the same bits
    x = torch.randn(4, 5, 24, generator=gen(9))
    grad_out = torch.randn(4, 5, 12, generator=gen(10))
    ours, plain = x.clone().requires_grad_(), x.clone().requires_grad_()
    swiglu.swiglu(ours).backward(grad_out)
    gate, up = plain.chunk(2, dim=-1)
    (F.silu(gate) * up).backward(grad_out)
    assert torch.equal(ours.grad, plain.grad)


def test_swiglu_npu(npu_double):
    x = torch.randn(4, 5, 24, generator=gen(8))
    close(swiglu.swiglu_npu(x), swiglu.swiglu(x))
    flat, probs = x.view(20, 24), torch.rand(20, generator=gen(9))
    close(swiglu.weighted_swiglu_npu(flat, probs), swiglu.swiglu(flat) * probs[:, None])


# ----------------------------------------------------------------------------------------------------------------
# grouped matmul
# ----------------------------------------------------------------------------------------------------------------
def gmm_inputs(counts, k=8, n=6, seed=9):
    g = gen(seed)
    x = torch.randn(sum(counts), k, generator=g)
    w = torch.randn(len(counts), k, n, generator=g)
    return x, w


def reference_gmm(x, w, counts):
    expert_of_row = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return torch.stack([x[r] @ w[e] for r, e in enumerate(expert_of_row.tolist())]) if len(x) else \
        x.new_zeros(0, w.shape[-1])


GMM_COUNTS = {"mixed": [3, 0, 5, 2], "single_expert": [6], "all_empty_but_last": [0, 0, 4]}


@pytest.mark.parametrize("case", GMM_COUNTS)
def test_grouped_matmul_torch(case):
    counts = GMM_COUNTS[case]
    x, w = gmm_inputs(counts)
    expected = reference_gmm(x, w, counts)
    close(moe.grouped_matmul(x, w, counts), expected)
    close(moe.grouped_matmul(x, list(w.unbind(0)), torch.tensor(counts)), expected)


@pytest.mark.parametrize("case", GMM_COUNTS)
def test_grouped_matmul_npu(case, npu_double):
    counts = GMM_COUNTS[case]
    x, w = gmm_inputs(counts)
    expected = moe.grouped_matmul(x, w, counts)
    close(moe.grouped_matmul_npu(x, w, torch.tensor(counts)), expected)
    close(moe.grouped_matmul_npu(x, list(w.unbind(0)), counts), expected)


def test_grouped_matmul_npu_many_experts(npu_double):
    counts = [i % 3 for i in range(130)]  # more than the op's 128-tensor list limit
    x, w = gmm_inputs(counts, k=4, n=3)
    close(moe.grouped_matmul_npu(x, list(w.unbind(0)), counts), moe.grouped_matmul(x, w, counts))


# ----------------------------------------------------------------------------------------------------------------
# permute / unpermute
# ----------------------------------------------------------------------------------------------------------------
def load_megatron_function(relpath, name):
    """A function compiled from the installed megatron-core source file, without importing megatron.core.

    Importing megatron.core costs ~5 s here (it pulls in the whole package); the functions used as
    references only need torch and typing, and running their own source keeps them the real reference.
    """
    import ast
    import importlib.util
    import typing

    spec = importlib.util.find_spec("megatron")
    path = Path(list(spec.submodule_search_locations)[0]) / "core" / relpath
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    node.decorator_list = []  # e.g. jit_fuser (torch.compile), irrelevant for a numerical reference
    namespace = {"torch": torch, "F": F, "HAVE_TE": False, **{k: getattr(typing, k) for k in typing.__all__}}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


@pytest.fixture(scope="module")
def megatron_moe_utils():
    return (load_megatron_function("transformer/moe/moe_utils.py", "permute"),
            load_megatron_function("transformer/moe/moe_utils.py", "unpermute"))


def routing(kind, num_tokens=7, num_experts=5, topk=2, seed=10):
    g = gen(seed)
    logits = torch.randn(num_tokens, num_experts, generator=g)
    if kind == "topk":
        routing_map = torch.zeros(num_tokens, num_experts, dtype=torch.bool)
        routing_map.scatter_(1, logits.topk(topk, dim=1).indices, True)
    else:  # variable: some tokens routed nowhere, some to many experts
        routing_map = torch.rand(num_tokens, num_experts, generator=g) < 0.4
        routing_map[0] = False
        routing_map[1] = True
    probs = torch.softmax(logits, dim=-1) * routing_map
    tokens = torch.randn(num_tokens, 6, generator=g)
    return tokens, routing_map, probs


@pytest.mark.parametrize("kind", ["topk", "variable"])
def test_permute_unpermute_torch_match_megatron(kind, megatron_moe_utils):
    mg_permute, mg_unpermute = megatron_moe_utils
    tokens, routing_map, probs = routing(kind)
    out, out_probs, idx = moe.permute(tokens, routing_map, probs)
    ref, ref_probs, ref_idx = mg_permute(tokens, routing_map, probs=probs)
    assert torch.equal(idx, ref_idx) and torch.equal(out, ref) and torch.equal(out_probs, ref_probs)
    assert moe.permute(tokens, routing_map)[1] is None

    expert_out = out * 1.5 + 0.25  # stand-in for the experts
    for p in (probs, None):
        expected = mg_unpermute(expert_out, ref_idx, restore_shape=tokens.shape, probs=p, routing_map=routing_map)
        close(moe.unpermute(expert_out, idx, p, tokens.shape, routing_map=routing_map), expected)
    # 1-D probs = the per-row probs permute returned
    expected = mg_unpermute(expert_out, ref_idx, restore_shape=tokens.shape, probs=probs, routing_map=routing_map)
    close(moe.unpermute(expert_out, idx, out_probs, tokens.shape), expected)
    with pytest.raises(ValueError, match="routing_map"):
        moe.unpermute(expert_out, idx, probs, tokens.shape)


@pytest.mark.parametrize("kind", ["topk", "variable"])
def test_permute_unpermute_npu(kind, npu_double):
    tokens, routing_map, probs = routing(kind)
    out, out_probs, idx = moe.permute_npu(tokens, routing_map, probs)
    ref, ref_probs, ref_idx = moe.permute(tokens, routing_map, probs)
    assert torch.equal(idx, ref_idx) and torch.equal(out, ref) and torch.equal(out_probs, ref_probs)
    assert moe.permute_npu(tokens, routing_map)[1] is None

    expert_out = ref * 1.5 + 0.25
    for p, rmap in ((probs, routing_map), (None, None), (ref_probs, None)):
        close(moe.unpermute_npu(expert_out, ref_idx, p, tokens.shape, routing_map=rmap),
              moe.unpermute(expert_out, ref_idx, p, tokens.shape, routing_map=rmap))


def test_permute_npu_nothing_routed(npu_double):
    tokens, routing_map, probs = routing("topk")
    out, out_probs, idx = moe.permute_npu(tokens, torch.zeros_like(routing_map), probs)
    assert out.shape == (0, tokens.shape[1]) and out_probs.numel() == 0 and idx.numel() == 0
    back = moe.unpermute_npu(out, idx, None, tokens.shape)
    assert torch.equal(back, torch.zeros_like(tokens))


def test_hadamard_rotate_matches_the_sylvester_matrix_and_keeps_dot_products():
    """DSA indexer rotation (portable stand-in for fast_hadamard_transform): x @ H.T / sqrt(n), H built
    here independently by Kronecker products; orthogonal, so q.k is unchanged."""
    from megatron_patch.runtime.kernels.hadamard import hadamard_rotate

    gen = torch.Generator().manual_seed(0)
    h = torch.ones(1, 1, dtype=torch.float64)
    for n in (1, 2, 4, 8, 16, 32, 64, 128):
        if n > 1:
            h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), h)
        x = torch.randn(3, 5, n, generator=gen, dtype=torch.float64)
        assert torch.allclose(hadamard_rotate(x), x @ h.T / n ** 0.5, rtol=0, atol=1e-12), n
    q, k = torch.randn(2, 7, 128, generator=gen), torch.randn(2, 9, 128, generator=gen)
    scores = q @ k.transpose(-1, -2)
    rotated = hadamard_rotate(q) @ hadamard_rotate(k).transpose(-1, -2)
    bound = 16 * torch.finfo(torch.float32).eps * scores.abs().max()  # a few ulps of the largest score
    assert (rotated - scores).abs().max() <= bound
    with pytest.raises(ValueError, match="power of two"):
        hadamard_rotate(torch.ones(3, 96))


def test_megatron_rotate_activation_is_portable():
    from megatron_patch.runtime import setup

    setup()
    from megatron.core.transformer.experimental_attention_variant import dsa

    x = torch.randn(4, 64, dtype=torch.float32)
    from megatron_patch.runtime.kernels.hadamard import hadamard_rotate

    assert torch.equal(dsa.rotate_activation(x), hadamard_rotate(x))
