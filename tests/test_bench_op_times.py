"""benchmarks/op_times.py sorts a step's ops into the kinds train_bench.py's bound is built from."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from op_times import OpTimes, counted_as  # noqa: E402


def test_linears_are_gemm_attention_is_attention_and_no_op_is_counted_twice():
    torch.manual_seed(0)
    x = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(48, 32, requires_grad=True)
    q = torch.randn(1, 2, 16, 8, requires_grad=True)
    with OpTimes() as gemm_only:
        torch.nn.functional.linear(x, w).sum().backward()
    with OpTimes() as attention_only:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
        torch.softmax(q @ q.transpose(-1, -2), dim=-1).sum().backward()  # HF's eager path: bmm + softmax
        counted_as("attention", torch.nn.functional.linear)(x, w).sum()  # GEMMs of a head-wise attention
    with OpTimes() as neither:
        (x * 2).relu().sum().backward()

    g, a, n = (t.summary(steps=1) for t in (gemm_only, attention_only, neither))
    assert g["gemm"] > 0 and g["attention"] == 0
    assert a["attention"] > 0 and a["gemm"] == 0
    assert n["gemm"] == 0 and n["attention"] == 0 and n["other_ops"] > 0
    for s in (g, a, n):  # the rest of the wall time: negative if an op were counted twice
        assert s["between_ops"] >= 0


def test_a_compiled_kernel_is_timed_as_its_kind_and_its_ops_are_not_counted_again():
    from op_times import timed_as

    def kernel(a, b):  # stands for a ctypes call that allocates its output with an aten op
        out = a.new_empty(a.shape[0], b.shape[1])
        return torch.mm(a, b, out=out)

    a, b = torch.randn(128, 64), torch.randn(64, 96)
    with OpTimes() as times:
        timed_as("gemm", kernel)(a, b)
        timed_as("other_ops", timed_as("gemm", kernel))(a, b)  # nested: the outer one counts it
        counted_as("attention", timed_as("gemm", kernel))(a, b)  # within an attention: attention's
    s = times.summary(steps=1)
    assert s["gemm"] > 0 and s["other_ops"] > 0 and s["attention"] > 0 and s["between_ops"] >= 0
    timed_as("gemm", kernel)(a, b)  # no timer in use: just the call
    assert times.summary(steps=1) == s
