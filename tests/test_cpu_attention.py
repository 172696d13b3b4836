"""Head-wise fp32 CPU attention on oneDNN (runtime/kernels/cpu_attention.py): output and q/k/v gradients equal a
float64 reference within a few ulps of each element's sum of |terms| (a wrong head, group, mask or transposed
operand is off by O(1)), core_attention really takes it where it should (oneDNN products, no SDPA), and leaves
small products, explicit masks and large score matrices to SDPA. Single process, small."""
import pytest
import torch

from megatron_patch.errors import UserError
from megatron_patch.runtime.kernels import attention, cpu_attention, cpu_gemm, cpu_native

from test_cpu_gemm import OpNames, gen, onednn  # noqa: F401  (onednn: the fixture forcing oneDNN GEMMs on)

EPS = torch.finfo(torch.float32).eps
ULPS = 8

CASES = {  # b, query heads, kv heads, sq, sk, d (q/k), dv, causal
    "mla_causal": (2, 8, 8, 256, 256, 48, 32, True),  # the benchmark's DeepSeek-V3 shapes (dv < d)
    "gqa_causal": (1, 4, 2, 192, 192, 64, 64, True),
    "rect_causal": (1, 2, 2, 192, 256, 64, 32, True),  # sq != sk: the triangle starts at the top-left
    "full": (1, 2, 1, 128, 320, 64, 64, False),
}


def megatron_layout(b, h, s, d, seed):
    """[b, h, s, d] seen through megatron's [s, b, h, d] (rows with gaps, as PortableCoreAttention passes them)."""
    return torch.randn(s, b, h, d, generator=gen(seed)).permute(1, 2, 0, 3)


def reference_and_bounds(q, k, v, grad, scale, causal):
    """float64 (out, dq, dk, dv) and each element's sum of |terms| through the computation: a score's rounding is
    relative to T = |q| |k|^T * scale and moves its probability by that much; products add their own terms."""
    group = q.shape[1] // k.shape[1]
    q, k, v, grad = (t.double() for t in (q, k, v, grad))
    kk, vv = (t.repeat_interleave(group, dim=1) for t in (k, v))
    leaves = [t.clone().requires_grad_() for t in (q, kk, vv)]
    scores = leaves[0] @ leaves[1].transpose(-1, -2) * scale
    hidden = torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1) if causal else None
    if causal:
        scores = scores.masked_fill(hidden, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    out = p @ leaves[2]
    out.backward(grad)
    dq, dk, dv = (leaves[0].grad, *(t.grad.unflatten(1, (-1, group)).sum(2) for t in leaves[1:]))

    p = p.detach()
    spread = 1 + q.abs() @ kk.abs().transpose(-1, -2) * scale  # 1 + T
    weights = p * spread
    out_scale = weights @ vv.abs()
    dscore_terms = weights * (grad.abs() @ vv.abs().transpose(-1, -2) + (grad.abs() * out_scale).sum(-1, True))
    dq_scale = scale * dscore_terms @ kk.abs()
    dk_scale = (scale * dscore_terms.transpose(-1, -2) @ q.abs()).unflatten(1, (-1, group)).sum(2)
    dv_scale = (weights.transpose(-1, -2) @ grad.abs()).unflatten(1, (-1, group)).sum(2)
    return (out.detach(), dq, dk, dv), (out_scale, dq_scale, dk_scale, dv_scale)


@pytest.fixture(params=["compiled", "compiled GEMMs", "torch"])
def native(request, monkeypatch):
    """cpu_native's compiled kernels (causal softmax, transposes) on, or torch's ops in their place; "compiled
    GEMMs": on one thread with MP_CPU_GEMM=auto, the products on cpu_native's GEMM as well (no oneDNN)."""
    monkeypatch.setenv(cpu_native.ENV, "torch" if request.param == "torch" else "auto")
    cpu_native._library.cache_clear()
    if request.param != "torch" and not cpu_native.active():
        pytest.skip("cpu_native's kernels need an AVX-512 CPU and a C compiler")
    if request.param == "compiled GEMMs":
        monkeypatch.setenv(cpu_gemm.ENV, "auto")
        cpu_gemm.reset()
        request.getfixturevalue("one_thread")
    yield request.param
    cpu_native._library.cache_clear()


@pytest.mark.parametrize("case", CASES)
def test_headwise_attention_equals_float64_within_ulps(onednn, native, case):
    b, h, hk, sq, sk, d, dv, causal = CASES[case]
    q, k, v = megatron_layout(b, h, sq, d, 1), megatron_layout(b, hk, sk, d, 2), megatron_layout(b, hk, sk, dv, 3)
    grad = torch.randn(b, h, sq, dv, generator=gen(4))
    scale = d ** -0.5
    assert cpu_attention.takes(q, k, v)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with OpNames() as seen:
        out = attention.core_attention(*leaves, scale=scale, causal=causal)
        out.backward(grad)
    assert ("_linear_pointwise" in seen.names) == (native != "compiled GEMMs")
    assert not [n for n in seen.names if "scaled_dot_product" in n]
    refs, scales = reference_and_bounds(q, k, v, grad, scale, causal)
    for name, mine, ref, bound in zip(("out", "dq", "dk", "dv"), (out, *(t.grad for t in leaves)), refs, scales):
        err = ((mine.double() - ref).abs() / bound.clamp_min(1e-300)).max().item()  # keys no query sees: 0 and 0
        assert err <= ULPS * EPS, f"{name}: error {err / EPS:.1f} eps of sum|terms|"


def test_sdpa_keeps_small_products_masks_and_large_score_matrices(onednn, monkeypatch):
    small = [torch.randn(1, 2, 64, 32, generator=gen(i)) for i in range(3)]  # 64 x 32 x 64: under MIN_FLOPS
    assert not cpu_attention.takes(*small)
    big = [megatron_layout(1, 2, 256, 64, i) for i in range(3)]
    assert cpu_attention.takes(*big)
    with monkeypatch.context() as patched:
        patched.setattr(cpu_attention, "MAX_SAVED_BYTES", 2 * 256 * 256 * 4 - 1)  # under two heads' probabilities
        assert not cpu_attention.takes(*big)
    mask = torch.zeros(1, 1, 256, 256, dtype=torch.bool)
    for inputs, kwargs in ((small, {}), (big, {"attn_mask": mask})):
        with OpNames() as seen:
            attention.core_attention(*inputs, scale=0.125, causal=True, **kwargs)
        assert [n for n in seen.names if "scaled_dot_product" in n], kwargs


def test_torch_gemms_keep_sdpa(monkeypatch):
    monkeypatch.setenv(cpu_gemm.ENV, "torch")
    cpu_gemm.reset()
    try:
        assert not cpu_attention.takes(*[megatron_layout(1, 2, 256, 64, i) for i in range(3)])
    finally:
        cpu_gemm.reset()


def test_the_sdpa_setting_keeps_sdpa_and_a_typo_is_refused(onednn, monkeypatch):
    big = [megatron_layout(1, 2, 256, 64, i) for i in range(3)]
    monkeypatch.setenv(cpu_attention.ENV, "sdpa")
    assert not cpu_attention.takes(*big)
    monkeypatch.setenv(cpu_attention.ENV, "onednn")
    with pytest.raises(UserError, match="MP_CPU_ATTENTION='onednn': use auto or sdpa"):
        cpu_attention.takes(*big)
