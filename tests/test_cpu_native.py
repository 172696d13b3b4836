"""The compiled kernels (runtime/kernels/cpu_native.py): the transpose equal to torch's x.t().contiguous() bit for
bit on any shape (whole 16x16 tiles, edges, rows with gaps), the causal softmax within a few ulps of float64 with
exact zeros where masked, both compiled once into the cache named by MP_CACHE_DIR with no files left behind, used
where they should be (weight gradients, attention), and torch's ops wherever they cannot run (no compiler,
MP_CPU_NATIVE=torch). Single process, small."""
import shutil

import pytest
import torch
import torch.nn.functional as F

from megatron_patch.errors import UserError
from megatron_patch.runtime.kernels import cpu_attention, cpu_gemm, cpu_native, swiglu
from test_cpu_gemm import onednn  # noqa: F401  (the fixture forcing oneDNN GEMMs on)

EPS = torch.finfo(torch.float32).eps
ULPS = 8  # as test_cpu_gemm: a few eps of the sum of |terms|

AVX512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
COMPILER = shutil.which("cc") is not None


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A cache of its own and no kernel loaded yet; the process's kernel comes back afterwards."""
    monkeypatch.setenv(cpu_native.CACHE_ENV, str(tmp_path / "cache"))
    kernel = cpu_native._library  # a test may replace it; monkeypatch puts it back after this teardown
    kernel.cache_clear()
    yield tmp_path / "cache"
    kernel.cache_clear()


@pytest.fixture
def compiled(fresh):
    if not (AVX512 and COMPILER):
        pytest.skip("needs an AVX-512 CPU and a C compiler (cc) for the compiled kernel")
    assert cpu_native.active()
    return fresh


# rows x cols: whole tiles, ragged edges on either side or both, one row, one column
SHAPES = [(512, 768), (64, 48), (137, 256), (256, 137), (19, 300), (300, 19), (1, 2048), (2048, 1), (33, 33)]


@pytest.mark.parametrize("rows,cols", SHAPES)
def test_equals_torchs_transposed_copy_bit_for_bit(compiled, rows, cols):
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows * 7 + cols))
    gapped = torch.randn(rows, cols + 9)[:, 4:4 + cols]  # rows with gaps between them (a column slice)
    for t in (x, gapped):
        out = cpu_native.transposed(t)
        assert out.is_contiguous() and torch.equal(out, t.t().contiguous())


def test_compiles_once_into_the_cache_and_leaves_no_temporary_files(compiled):
    assert [p.suffix for p in compiled.iterdir()] == [".so"]
    built = next(compiled.iterdir()).stat().st_mtime_ns
    cpu_native._library.cache_clear()
    assert cpu_native.active() and next(compiled.iterdir()).stat().st_mtime_ns == built  # reused, not rebuilt


def test_torchs_copy_without_a_compiler_or_when_asked(fresh, monkeypatch):
    x = torch.randn(100, 300)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert not cpu_native.active() and torch.equal(cpu_native.transposed(x), x.t().contiguous())
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    cpu_native._library.cache_clear()
    assert not cpu_native.active() and list(fresh.iterdir()) == []  # nothing half-built left
    monkeypatch.delenv("CC")
    monkeypatch.setenv(cpu_native.ENV, "torch")
    cpu_native._library.cache_clear()
    assert not cpu_native.active()
    monkeypatch.setenv(cpu_native.ENV, "fast")
    cpu_native._library.cache_clear()
    with pytest.raises(UserError, match="MP_CPU_NATIVE"):
        cpu_native.active()


class Counted:
    """The loaded library with each C function's calls counted."""

    def __init__(self, library):
        self.library, self.calls = library, []

    def __getattr__(self, name):
        function = getattr(self.library, name)
        return lambda *args: (self.calls.append(name), function(*args))[1]


def test_weight_gradients_transpose_through_the_kernel_with_torchs_bits(compiled, onednn, monkeypatch):
    """grad^T @ x through oneDNN: the left operand copied by the kernel (counted), the same bits as torch's copy."""
    g = torch.Generator().manual_seed(5)
    grad, x = torch.randn(512, 384, generator=g), torch.randn(512, 256, generator=g)
    counted = Counted(cpu_native._library())
    monkeypatch.setattr(cpu_native, "_library", lambda: counted)
    fast = cpu_gemm.addmm_(torch.zeros(384, 256), grad.t(), x)
    assert counted.calls == ["mp_transpose_f32"]
    monkeypatch.setattr(cpu_native, "_library", lambda: None)
    assert torch.equal(fast, cpu_gemm.addmm_(torch.zeros(384, 256), grad.t(), x))


def test_attention_runs_its_softmax_and_transposes_on_the_kernels(compiled, onednn, monkeypatch):
    """Per head, with oneDNN's GEMMs: the causal softmax in the forward, dS^T and P^T in the backward
    (test_cpu_attention checks the values against float64 on both paths)."""
    g = torch.Generator().manual_seed(6)
    q, k = (torch.randn(2, 4, 128, 32, generator=g, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 4, 128, 16, generator=g, requires_grad=True)
    counted = Counted(cpu_native._library())
    monkeypatch.setattr(cpu_native, "_library", lambda: counted)
    cpu_attention.headwise_attention(q, k, v, 0.2, True).backward(torch.randn(2, 4, 128, 16, generator=g))
    assert sorted(set(counted.calls)) == ["mp_causal_softmax_f32", "mp_transpose_f32"]
    assert counted.calls.count("mp_causal_softmax_f32") == 8 and counted.calls.count("mp_transpose_f32") == 16


def _operand(rows, cols, layout, seed):
    """[rows, cols] with contiguous rows, contiguous columns (a transposed view) or neither (a strided slice)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "rows":
        return torch.randn(rows, cols, generator=g)
    if layout == "columns":
        return torch.randn(cols, rows, generator=g).t()
    return torch.randn(rows * 2, cols * 3, generator=g)[::2, 1::3]


# m x k x n: whole 12 x 32 blocks, ragged edges, one row/column, k over one 256 block, n over one 512 block
GEMM_SHAPES = [(96, 256, 64), (137, 48, 80), (1, 300, 1), (13, 1, 33), (40, 700, 97), (25, 64, 1100), (3, 5, 7)]


@pytest.mark.parametrize("m,k,n", GEMM_SHAPES)
def test_gemm_equals_float64_within_ulps_at_any_strides_and_accumulates(compiled, m, k, n):
    """Against float64: within ULPS eps of the sum of |terms| (a wrong block, edge or stride is off by O(1)); into an
    output whose rows have gaps; accumulating adds to what is there."""
    for a_layout in ("rows", "columns", "strided"):
        for b_layout in ("rows", "columns", "strided"):
            a, b = _operand(m, k, a_layout, m + k), _operand(k, n, b_layout, k + n)
            ref, scale = a.double() @ b.double(), a.double().abs() @ b.double().abs()
            out = cpu_native.gemm(a, b)
            assert out.shape == (m, n)
            assert ((out.double() - ref).abs() <= ULPS * EPS * scale).all(), (a_layout, b_layout)
            base = torch.randn(m, n + 5)
            into, before, around = base[:, 2:2 + n], base[:, 2:2 + n].clone(), base.clone()
            cpu_native.gemm(a, b, into, accumulate=True)
            bound = ULPS * EPS * (scale + before.double().abs())
            assert ((into.double() - (ref + before.double())).abs() <= bound).all(), (a_layout, b_layout)
            assert torch.equal(base[:, :2], around[:, :2]) and torch.equal(base[:, 2 + n:], around[:, 2 + n:])


def test_cpu_gemm_runs_the_compiled_gemm_on_one_thread_only(compiled, one_thread, monkeypatch):
    """One thread: linear products, accumulated weight gradients and grouped experts on the kernel, within ulps of
    float64; more threads: oneDNN's threaded GEMMs (or torch's), not the single-threaded kernel."""
    g = torch.Generator().manual_seed(9)
    x, w, grad = torch.randn(3, 50, 64, generator=g), torch.randn(96, 64, generator=g), torch.randn(150, 96, generator=g)
    counts = [40, 0, 77, 33]
    experts = [torch.randn(48, 64, generator=g) for _ in counts]
    counted = Counted(cpu_native._library())
    monkeypatch.setattr(cpu_native, "_library", lambda: counted)
    y = cpu_gemm.times_transposed(x, w)
    main_grad = torch.randn(96, 64, generator=g)
    before = main_grad.clone()
    cpu_gemm.addmm_(main_grad, grad.t(), x.reshape(150, 64))
    grouped = cpu_gemm.grouped_times_transposed(x.reshape(150, 64), experts, counts)
    assert counted.calls == ["mp_gemm_f32"] * 5  # 1 + 1 + one per expert with rows
    rows = x.reshape(150, 64).double()
    want = torch.cat([r @ e.double().t() for r, e in zip(rows.split(counts), experts)])
    for out, ref, scale in ((y.double(), x.double() @ w.double().t(), x.double().abs() @ w.double().abs().t()),
                            (main_grad.double() - before.double(), grad.double().t() @ rows,
                             grad.double().abs().t() @ rows.abs() + before.double().abs()),
                            (grouped.double(), want, torch.cat([r.abs() @ e.double().abs().t()
                                                               for r, e in zip(rows.split(counts), experts)]))):
        assert ((out - ref).abs() <= ULPS * EPS * scale).all()
    torch.set_num_threads(2)
    counted.calls.clear()
    cpu_gemm.times_transposed(x, w)
    assert "mp_gemm_f32" not in counted.calls


@pytest.mark.parametrize("rows,cols", [(256, 256), (100, 37), (37, 100), (5, 300), (64, 16)])
def test_causal_softmax_equals_float64_within_ulps_with_masked_entries_zero(compiled, rows, cols):
    """Each probability within 4 eps of float64, relative, per unit of its exponent's argument (exp(x - max) carries
    the rounding of x - max: 1 + |x - max|; torch's softmax meets the same bound, measured: 1.3 at most), exact
    zeros above the diagonal; wide score ranges reach exp's underflow (0 where float64 is below fp32's smallest
    normal)."""
    for spread in (1.0, 30.0):
        scores = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows + cols)) * spread
        hidden = torch.ones(rows, cols, dtype=torch.bool).triu(1)
        masked = scores.double().masked_fill(hidden, float("-inf"))
        ref = torch.softmax(masked, -1)
        argument = 1 + (masked.amax(-1, keepdim=True) - scores.double()).abs()
        mine = scores.clone()
        assert cpu_native.causal_softmax_(mine)
        assert torch.equal(mine[hidden], torch.zeros(int(hidden.sum())))
        err = ((mine.double() - ref).abs() - 4 * EPS * argument * ref).max().item()
        assert err <= torch.finfo(torch.float32).tiny, f"error {err:.3g} over the bound"


def _swiglu_float64(x, grad):
    """float64 swiglu and dx, and each element's sum of |terms| (the bound's scale: silu' crosses zero)."""
    x = x.double().requires_grad_()
    gate, up = x.chunk(2, dim=-1)
    out = F.silu(gate) * up
    out.backward(grad.double())
    s = torch.sigmoid(gate.detach())
    g, u = gate.detach(), up.detach()
    d_gate_scale = (grad.double() * u).abs() * s * (1 + g.abs() * (1 - s))
    d_up_scale = (grad.double() * g * s).abs()
    return out.detach(), x.grad, out.detach().abs(), torch.cat([d_gate_scale, d_up_scale], -1)


@pytest.mark.parametrize("layout", ["2-D", "3-D", "rows with gaps"])
def test_swiglu_forward_and_backward_equal_float64_within_ulps(compiled, layout):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(300, 2 * 200, generator=g) * 4  # 200 per half: 12 tiles and a ragged tail of 8
    if layout == "3-D":
        x = x.view(3, 100, 400)
    elif layout == "rows with gaps":
        x = torch.randn(300, 410, generator=g)[:, 5:405] * 4
    grad = torch.randn(*x.shape[:-1], 200, generator=g)
    counted = Counted(cpu_native._library())
    leaf = x.clone().requires_grad_() if layout != "rows with gaps" else x.requires_grad_()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_native, "_library", lambda: counted)
        out = swiglu.swiglu(leaf)
        out.backward(grad)
    assert counted.calls == ["mp_swiglu_f32", "mp_swiglu_backward_f32"]
    ref_out, ref_dx, out_scale, dx_scale = _swiglu_float64(x.detach(), grad)
    for name, mine, ref, scale in (("out", out, ref_out, out_scale), ("dx", leaf.grad, ref_dx, dx_scale)):
        err = ((mine.double() - ref).abs() / scale.clamp_min(1e-30)).max().item()
        assert err <= 8 * EPS, f"{name}: error {err / EPS:.1f} eps of sum|terms|"


def test_weighted_swiglu_equals_float64_within_ulps_and_its_forward_is_swiglus_times_the_prob(compiled):
    """The experts' SwiGLU times each token's router probability: the forward the same bits as the compiled SwiGLU
    times the probability (megatron's order), x's and the probabilities' gradients within 8 eps of float64's sum of
    |terms|; each way one call."""
    g = torch.Generator().manual_seed(9)
    x, probs = torch.randn(300, 400, generator=g) * 4, torch.rand(300, generator=g)
    grad = torch.randn(300, 200, generator=g)
    counted = Counted(cpu_native._library())
    leaves = x.clone().requires_grad_(), probs.clone().requires_grad_()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_native, "_library", lambda: counted)
        out = swiglu.weighted_swiglu(*leaves)
        out.backward(grad)
    assert counted.calls == ["mp_swiglu_f32", "mp_swiglu_backward_f32"]
    with torch.no_grad():
        assert torch.equal(out, swiglu.swiglu(x) * probs[:, None])
    _, _, act_scale, _ = _swiglu_float64(x, grad)
    xd, pd = x.double().requires_grad_(), probs.double().requires_grad_()
    gate, up = xd.chunk(2, dim=-1)
    (F.silu(gate) * up * pd[:, None]).backward(grad.double())
    _, _, _, dx_scale = _swiglu_float64(x, grad * probs[:, None])
    dp_scale = (grad.double().abs() * act_scale).sum(-1)
    for name, mine, ref, scale in (("dx", leaves[0].grad, xd.grad, dx_scale), ("dprobs", leaves[1].grad, pd.grad,
                                                                              dp_scale)):
        err = ((mine.double() - ref).abs() / scale.clamp_min(1e-30)).max().item()
        assert err <= 8 * EPS, f"{name}: error {err / EPS:.1f} eps of sum|terms|"


def test_causal_softmax_leaves_what_it_cannot_take_to_torch(compiled):
    for scores in (torch.randn(8, 8), torch.randn(64, 64, dtype=torch.float64), torch.randn(64, 64).t()):
        before = scores.clone()
        assert not cpu_native.causal_softmax_(scores) and torch.equal(scores, before)
