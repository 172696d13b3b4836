"""Where a CPU training step's time goes, by kind of kernel: GEMMs, attention, other ops, and what runs between
ops (Python, autograd). torch only (no megatron_patch): both sides of train_bench.py use it.

    with OpTimes() as times:
        step()
    times.summary(steps=1)  # {"gemm": s, "attention": s, "other_ops": s, "between_ops": s, "wall": s}

Every aten op is timed where it runs (a TorchDispatchMode, below autograd); CPU ops are synchronous, so their
wall time is their cost. The timer adds a few microseconds per op, which lands in "between_ops": compare the
kernel columns across sides, not that one. Accelerator ops are asynchronous: CPU only.
"""
from __future__ import annotations

import functools
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Matrix products of the linears (forward, input and weight gradients; grouped for experts).
GEMM = frozenset({"mm", "addmm", "addmm_", "_grouped_mm", "_linear_pointwise"})
# Attention's products and softmax (HF's eager/math path: bmm + softmax; SDPA's fused CPU kernels).
ATTENTION = frozenset({
    "bmm", "baddbmm", "_softmax", "_safe_softmax", "_softmax_backward_data",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward",
})
KINDS = ("gemm", "attention", "other_ops", "between_ops")
_counted_as = []  # innermost `counted_as` kind, if any


def counted_as(kind: str, fn):
    """fn with every op it runs counted as `kind` (an attention built from GEMM and softmax ops, for example)."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        _counted_as.append(kind)
        try:
            return fn(*args, **kwargs)
        finally:
            _counted_as.pop()

    return call


class OpTimes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seconds = dict.fromkeys(KINDS[:3], 0.0)
        self.wall = 0.0

    def __enter__(self):
        self._start = time.perf_counter()
        return super().__enter__()

    def __exit__(self, *exc):
        self.wall += time.perf_counter() - self._start
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        kind = _counted_as[-1] if _counted_as else "gemm" if name in GEMM else "attention" if name in ATTENTION \
            else "other_ops"
        self.seconds[kind] += time.perf_counter() - start
        return out

    def summary(self, steps: int) -> dict:
        per_step = {k: v / steps for k, v in self.seconds.items()}
        per_step["between_ops"] = self.wall / steps - sum(per_step.values())
        per_step["wall"] = self.wall / steps
        return per_step
