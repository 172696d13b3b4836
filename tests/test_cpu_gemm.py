"""fp32 GEMMs through oneDNN on CPU (runtime/kernels/cpu_gemm.py): the products equal float64 within a few ulps
of the sum of |terms| (any summation order stays there; a wrong operand or layout is off by O(1)), oneDNN
really runs where it is on, everything else falls back to torch, and megatron's linear Function, patched, gives
torch's results. Single process, small."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_patch.errors import UserError
from megatron_patch.runtime import adapters
from megatron_patch.runtime.kernels import cpu_gemm

EPS = torch.finfo(torch.float32).eps
ULPS = 8  # measured: at most 3 eps of sum|terms| (k up to 1024)


class OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def onednn(monkeypatch):
    if not cpu_gemm._onednn_linear_available():
        pytest.skip("this torch has no oneDNN (mkldnn) linear")
    monkeypatch.setenv(cpu_gemm.ENV, "onednn")
    cpu_gemm.reset()
    yield
    cpu_gemm.reset()


def gen(seed):
    return torch.Generator().manual_seed(seed)


def assert_product(out, a, b, added=None):
    """out == a @ b (+ added) within ULPS eps of sum|terms|, against float64."""
    ref = a.double() @ b.double() + (0 if added is None else added.double())
    scale = a.double().abs() @ b.double().abs() + (0 if added is None else added.double().abs())
    err = ((out.double() - ref).abs() / scale.clamp_min(1e-30)).max().item()
    assert err <= ULPS * EPS, f"error {err / EPS:.1f} eps of sum|terms|"


@pytest.mark.parametrize("layout", ["contiguous", "a transposed", "b transposed"])
def test_mm_and_addmm_equal_float64_within_ulps_and_run_onednn(onednn, layout):
    a = torch.randn(192, 320, generator=gen(1))  # 11.8 MFLOP: over oneDNN's MIN_FLOPS (twice it for addmm_)
    b = torch.randn(320, 96, generator=gen(2))
    if layout == "a transposed":
        a = a.t().contiguous().t()
    elif layout == "b transposed":
        b = b.t().contiguous().t()
    acc = torch.randn(192, 96, generator=gen(3))
    with OpNames() as seen:
        out = cpu_gemm.mm(a, b)
        summed = cpu_gemm.addmm_(acc.clone(), a, b)
    assert seen.names.count("_linear_pointwise") == 2 and "mm" not in seen.names and "addmm_" not in seen.names
    assert_product(out, a, b)
    assert_product(summed, a, b, added=acc)
    x3 = torch.randn(4, 48, 320, generator=gen(4))  # leading dims folded, as torch.matmul does
    assert_product(cpu_gemm.mm(x3, b).reshape(-1, 96), x3.reshape(-1, 320), b)


def test_linear_and_grouped_gemms_equal_float64_within_ulps(onednn):
    x = torch.randn(3, 40, 256, generator=gen(5), requires_grad=True)
    w = torch.randn(96, 256, generator=gen(6), requires_grad=True)
    g = torch.randn(3, 40, 96, generator=gen(7))
    with OpNames() as seen:
        y = cpu_gemm.linear(x, w)
        y.backward(g)
    assert seen.names.count("_linear_pointwise") == 3
    rows, grows = x.detach().reshape(-1, 256), g.reshape(-1, 96)
    assert_product(y.detach().reshape(-1, 96), rows, w.detach().t())
    assert_product(x.grad.reshape(-1, 256), grows, w.detach())
    assert_product(w.grad, grows.t(), rows)

    counts = [5, 0, 70, 130]  # an expert without tokens; 70 rows rounded up to 72; 130 = 128 + 2 at the end
    xs = torch.randn(sum(counts), 256, generator=gen(8))
    ws = torch.randn(4, 128, 256, generator=gen(9))  # [out, in] per expert, as linears hold them
    with OpNames() as seen:
        out = cpu_gemm.grouped_times_transposed(xs, list(ws), counts)
    # 5 rows (under MIN_FLOPS) through torch's GEMM; no GEMM for no rows; 70 rows as one oneDNN GEMM over 72 (two of
    # the next expert's rows ride along, dropped); the last expert's 144 would run past x's end: 128 rows through
    # oneDNN and 2 through torch's GEMM
    assert seen.names.count("_linear_pointwise") == 2 and seen.names.count("mm") == 2
    assert out.shape == (sum(counts), 128)
    for rows_e, w_e, out_e in zip(xs.split(counts), ws, out.split(counts)):
        if len(rows_e):
            assert_product(out_e, rows_e, w_e.t())


def test_pieces_sum_to_n_with_few_distinct_sizes():
    sizes = set()
    for n in range(4097):
        parts = cpu_gemm.pieces(n)
        assert sum(parts) == n and parts == sorted(parts, reverse=True)
        for part in parts:  # at most SIGNIFICANT_BITS significant bits
            assert part >> max(part.bit_length() - cpu_gemm.SIGNIFICANT_BITS, 0) < 2 ** cpu_gemm.SIGNIFICANT_BITS
        sizes.update(parts)
    assert cpu_gemm.pieces(512) == [512] and cpu_gemm.pieces(130) == [128, 2]
    assert len(sizes) <= 15 + 8 * 9  # 1..15, then 8 sizes per power of two up to 4096


def test_rows_and_contraction_of_unaligned_sizes_are_cut_into_pieces(onednn):
    """Expert GEMMs have data-dependent sizes: each new shape would compile a kernel, so they are cut (130 rows:
    128 + 2, contraction 273: 256 + 16 + 1), small pieces go to torch's GEMM, and the products stay exact
    within ulps."""
    a = torch.randn(130, 273, generator=gen(15))
    b = torch.randn(273, 256, generator=gen(16))
    acc = torch.randn(130, 256, generator=gen(17))
    with OpNames() as seen:
        out = cpu_gemm.mm(a, b)
    assert seen.names.count("_linear_pointwise") == 1 and seen.names.count("mm") == 1  # 128 rows; 2 rows
    assert_product(out, a, b)
    with OpNames() as seen:
        summed = cpu_gemm.addmm_(acc.clone(), a, b)
    # contraction 256: oneDNN (128 rows) + torch (2 rows); 16 and 1: torch's addmm_, under twice MIN_FLOPS
    assert seen.names.count("_linear_pointwise") == 1 and seen.names.count("mm") == 1
    assert seen.names.count("addmm_") == 2
    assert_product(summed, a, b, added=acc)


def test_other_dtypes_and_the_torch_setting_keep_torchs_gemm(onednn, monkeypatch):
    a = torch.randn(16, 32, generator=gen(10)).bfloat16()
    b = torch.randn(32, 8, generator=gen(11)).bfloat16()
    assert torch.equal(cpu_gemm.mm(a, b), a @ b)
    monkeypatch.setenv(cpu_gemm.ENV, "torch")
    cpu_gemm.reset()
    assert not cpu_gemm.enabled()
    a, b = a.float(), b.float()
    with OpNames() as seen:
        assert torch.equal(cpu_gemm.mm(a, b), a @ b)
    assert "_linear_pointwise" not in seen.names
    monkeypatch.setenv(cpu_gemm.ENV, "mkl")
    cpu_gemm.reset()
    with pytest.raises(UserError, match="MP_CPU_GEMM='mkl': use auto, onednn or torch"):
        cpu_gemm.enabled()


def test_megatrons_linear_function_through_the_patch_equals_torch(onednn, monkeypatch):
    from megatron.core.tensor_parallel import layers

    cls = layers.LinearWithGradAccumulationAndAsyncCommunication
    x = torch.randn(64, 2, 256, generator=gen(12))  # each of the three GEMMs 8.4 MFLOP: over MIN_FLOPS
    w = torch.randn(128, 256, generator=gen(13))
    g = torch.randn(64, 2, 128, generator=gen(14))

    def run():
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = layers.linear_with_grad_accumulation_and_async_allreduce(xi, wi, None, False, False, False,
                                                                     tp_group=object())
        y.backward(g)
        return y.detach(), xi.grad, wi.grad

    reference = run()
    for step in ("forward", "backward"):
        patch = next(p for p in adapters.REGISTRY.patches if p.target.endswith(f"{cls.__name__}.{step}"))
        monkeypatch.setattr(cls, step, staticmethod(patch.make(cls.__dict__[step].__func__)))
    with OpNames() as seen:
        patched = run()
    assert seen.names.count("_linear_pointwise") == 3 and "mm" not in seen.names  # y, dx, dW
    rows, grows = x.reshape(-1, 256), g.reshape(-1, 128)
    for y, dx, dw in (patched, reference):  # both are the exact products within a few ulps
        assert_product(y.reshape(-1, 128), rows, w.t())
        assert_product(dx.reshape(-1, 256), grows, w)
        assert_product(dw, grows.t(), rows)


def test_a_functions_output_from_folded_rows_may_be_changed_in_place(onednn):
    """megatron's linear Functions return mm's [s, b, n] output and callers change it in place: it must not be a
    view to autograd, as torch.matmul's output isn't."""

    class Linear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, b):
            ctx.b = b
            return cpu_gemm.mm(x, b)

        @staticmethod
        def backward(ctx, grad):
            return grad @ ctx.b.t(), None

    x = torch.randn(8, 4, 320, generator=gen(18), requires_grad=True)  # 32 rows x 320 x 384: over MIN_FLOPS
    b = torch.randn(320, 384, generator=gen(19))
    with OpNames() as seen:  # (outside the mode below: under a dispatch mode outputs lose their view-ness)
        Linear.apply(x, b)
    assert seen.names.count("_linear_pointwise") == 1
    out = Linear.apply(x, b)
    out.sub_(out.max(-1, keepdim=True)[0].detach())  # as vocab-parallel cross entropy does to the logits
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones(8, 4, 384) @ b.t())
