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
_timers = []  # the OpTimes in use, innermost last


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


def timed_as(kind: str, fn):
    """fn, a kernel that is not an aten op (a compiled library called through ctypes), timed as `kind` as a whole
    (the aten ops it runs, such as its output's allocation, included and not counted again); inside `counted_as`,
    as that kind."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if not _timers or _timers[-1].inside_kernel:
            return fn(*args, **kwargs)
        timer, start = _timers[-1], time.perf_counter()
        timer.inside_kernel = True
        try:
            return fn(*args, **kwargs)
        finally:
            timer.inside_kernel = False
            timer.seconds[_counted_as[-1] if _counted_as else kind] += time.perf_counter() - start

    return call


class OpTimes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seconds = dict.fromkeys(KINDS[:3], 0.0)
        self.wall = 0.0
        self.inside_kernel = False  # within a `timed_as` kernel: its ops are part of its time

    def __enter__(self):
        self._start = time.perf_counter()
        _timers.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        self.wall += time.perf_counter() - self._start
        _timers.remove(self)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.inside_kernel:
            return func(*args, **(kwargs or {}))
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
