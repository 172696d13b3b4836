"""The compiled transpose (runtime/kernels/cpu_transpose.py): equal to torch's x.t().contiguous() bit for bit on
any shape (whole 16x16 tiles, edges, rows with gaps), compiled once into the cache named by MP_CACHE_DIR with no
files left behind, used by oneDNN GEMMs with a transposed left operand and by the attention backward, and torch's
copy wherever it cannot run (no compiler, MP_CPU_TRANSPOSE=torch). Single process, small."""
import shutil

import pytest
import torch

from megatron_patch.errors import UserError
from megatron_patch.runtime.kernels import cpu_attention, cpu_gemm, cpu_transpose

AVX512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
COMPILER = shutil.which("cc") is not None


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A cache of its own and no kernel loaded yet; the process's kernel comes back afterwards."""
    monkeypatch.setenv(cpu_transpose.CACHE_ENV, str(tmp_path / "cache"))
    kernel = cpu_transpose._kernel  # a test may replace it; monkeypatch puts it back after this teardown
    kernel.cache_clear()
    yield tmp_path / "cache"
    kernel.cache_clear()


@pytest.fixture
def compiled(fresh):
    if not (AVX512 and COMPILER):
        pytest.skip("needs an AVX-512 CPU and a C compiler (cc) for the compiled kernel")
    assert cpu_transpose.active()
    return fresh


# rows x cols: whole tiles, ragged edges on either side or both, one row, one column
SHAPES = [(512, 768), (64, 48), (137, 256), (256, 137), (19, 300), (300, 19), (1, 2048), (2048, 1), (33, 33)]


@pytest.mark.parametrize("rows,cols", SHAPES)
def test_equals_torchs_transposed_copy_bit_for_bit(compiled, rows, cols):
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows * 7 + cols))
    gapped = torch.randn(rows, cols + 9)[:, 4:4 + cols]  # rows with gaps between them (a column slice)
    for t in (x, gapped):
        out = cpu_transpose.transposed(t)
        assert out.is_contiguous() and torch.equal(out, t.t().contiguous())


def test_compiles_once_into_the_cache_and_leaves_no_temporary_files(compiled):
    assert [p.suffix for p in compiled.iterdir()] == [".so"]
    built = next(compiled.iterdir()).stat().st_mtime_ns
    cpu_transpose._kernel.cache_clear()
    assert cpu_transpose.active() and next(compiled.iterdir()).stat().st_mtime_ns == built  # reused, not rebuilt


def test_torchs_copy_without_a_compiler_or_when_asked(fresh, monkeypatch):
    x = torch.randn(100, 300)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert not cpu_transpose.active() and torch.equal(cpu_transpose.transposed(x), x.t().contiguous())
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    cpu_transpose._kernel.cache_clear()
    assert not cpu_transpose.active() and list(fresh.iterdir()) == []  # nothing half-built left
    monkeypatch.delenv("CC")
    monkeypatch.setenv(cpu_transpose.ENV, "torch")
    cpu_transpose._kernel.cache_clear()
    assert not cpu_transpose.active()
    monkeypatch.setenv(cpu_transpose.ENV, "fast")
    cpu_transpose._kernel.cache_clear()
    with pytest.raises(UserError, match="MP_CPU_TRANSPOSE"):
        cpu_transpose.active()


def test_gemm_and_attention_backward_give_the_same_bits_with_either_copy(compiled, monkeypatch):
    """The kernel is only a copy: a weight gradient (grad^T @ x through oneDNN) and the attention backward are
    unchanged by it; and it really runs there (counted)."""
    if not cpu_gemm._onednn_linear_available():
        pytest.skip("this torch has no oneDNN (mkldnn) linear")
    monkeypatch.setenv(cpu_gemm.ENV, "onednn")
    cpu_gemm.enabled.cache_clear()
    g = torch.Generator().manual_seed(5)
    grad, x = torch.randn(512, 384, generator=g), torch.randn(512, 256, generator=g)
    q, k = (torch.randn(2, 4, 128, 32, generator=g, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 4, 128, 16, generator=g, requires_grad=True)
    dout = torch.randn(2, 4, 128, 16, generator=g)

    def run():
        main_grad = cpu_gemm.addmm_(torch.zeros(384, 256), grad.t(), x)
        q.grad = k.grad = v.grad = None
        cpu_attention.headwise_attention(q, k, v, 0.2, True).backward(dout)
        return [main_grad, q.grad, k.grad, v.grad]

    kernel, calls = cpu_transpose._kernel(), []
    monkeypatch.setattr(cpu_transpose, "_kernel", lambda: lambda *args: (calls.append(args), kernel(*args))[1])
    fast = run()
    assert len(calls) == 1 + 2 * 2 * 4  # grad^T once; dS^T and P^T per head
    monkeypatch.setattr(cpu_transpose, "_kernel", lambda: None)
    for a, b in zip(fast, run()):
        assert torch.equal(a, b)
    cpu_gemm.enabled.cache_clear()
