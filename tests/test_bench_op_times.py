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
