"""fp32 GEMMs on CPU through cpu_native's compiled GEMM or oneDNN (torch's mkldnn backend) instead of torch's BLAS.

On one thread (train_bench --threads 1, every rank of a multi-rank CPU run) with cpu_native's library built, every
product here runs on its single-threaded AVX-512 GEMM (kernels/cpu_native.c): ~3 us per call against oneDNN's ~20,
operands at any strides (no transposed copies), weight gradients accumulated into main_grad in place, each
expert's rows straight into its rows of the output; none of the oneDNN workarounds below apply (measured, MoE
step, paired A/B: +6.7 % +- 1.7 % over oneDNN). With more threads, or MP_CPU_GEMM=onednn, oneDNN as follows.

torch multiplies fp32 CPU matrices with MKL's sgemm. On AMD CPUs MKL runs its AVX2 "zen" kernel even where the
core has AVX-512 (measured on an AMD EPYC Zen 5: ~85 GFLOP/s on one thread at the shapes of our layers), while
oneDNN's JIT kernels use AVX-512 (~150-190 GFLOP/s, same shapes). oneDNN computes in fp32 here (its default
fpmath mode is strict: no bf16/tf32 down-conversion); only the summation order differs from MKL's, a few ulps
of the sum of |terms|, as a different TP split does.

`enabled()` decides once per process: on when the CPU has AVX-512 and torch has oneDNN, unless
MP_CPU_GEMM=torch (MP_CPU_GEMM=onednn forces it on where oneDNN exists). Callers use `mm`/`addmm_` where they
would use torch.mm/Tensor.addmm_, `times_transposed` for F.linear's x @ W^T (oneDNN's own form: no transposed
views made and undone per call): they fall back to torch for anything but fp32 CPU matrices.

oneDNN compiles a kernel per GEMM shape (~0.6 ms on first use, measured; then cached, 1024 shapes by default).
Expert GEMMs have data-dependent rows (tokens per expert), so every step met new shapes: `mm` and `addmm_` cut
the rows and the contraction into pieces whose sizes have at most SIGNIFICANT_BITS significant bits (130 ->
128 + 2), about 8 sizes per power of two, all compiled after a few steps; shapes already of that form (the
dense layers' 512, 1536, 384) stay one GEMM. Grouped experts (`grouped_times_transposed`) instead round each
expert's rows up to such a size and run one GEMM over them, the next expert's rows riding along and dropped: up to
1/8 more rows against a second, small GEMM per expert (+3.4 % on a MoE step, paired A/B).
A oneDNN call also costs ~20 us before any arithmetic (MKL's ~3 us):
products under MIN_FLOPS (the tails of those cuts, tiny layers) stay with torch's GEMM, which is faster there.
"""
from __future__ import annotations

import functools
import os

import torch

from megatron_patch.errors import UserError
from megatron_patch.runtime.kernels import cpu_native

ENV = "MP_CPU_GEMM"
SIGNIFICANT_BITS = 4
# Below this many FLOPs torch's GEMM wins (measured, one thread: x @ w^T with 256x512 weights is faster in MKL up
# to ~12 rows); an accumulating product (addmm_) pays oneDNN's separate add as well: twice the bar.
MIN_FLOPS = 4_000_000


def env_choice(name: str, choices: tuple) -> str:
    """The environment variable `name` (default and first choice "auto"), refused unless one of `choices`."""
    choice = os.environ.get(name, "auto").lower()
    if choice not in choices:
        raise UserError(f"{name}={choice!r}: use {', '.join(choices[:-1])} or {choices[-1]}")
    return choice


@functools.lru_cache(maxsize=None)
def _choice() -> str:
    return env_choice(ENV, ("auto", "onednn", "torch"))


def reset() -> None:
    """Read MP_CPU_GEMM again at the next GEMM (tests that change it)."""
    _choice.cache_clear()
    enabled.cache_clear()


@functools.lru_cache(maxsize=None)
def enabled() -> bool:
    """oneDNN's GEMMs in this process (`native` ones take precedence where they run)."""
    choice = _choice()
    if choice == "torch" or not _onednn_linear_available():
        return False
    return choice == "onednn" or torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def takes(x: torch.Tensor) -> bool:
    """True when GEMMs on x (fp32, CPU) go through cpu_native's or oneDNN's GEMM in this process."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and (enabled() or _native_on())


def _native_on() -> bool:
    return _choice() == "auto" and cpu_native.active()


def native(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a @ b runs on cpu_native's GEMM (MP_CPU_GEMM=auto, the library built, one thread, 2-D fp32)."""
    return _choice() == "auto" and cpu_native.takes_gemm(a, b)


def _fits(a: torch.Tensor, w: torch.Tensor) -> bool:
    """a [..., k] and w [n, k] (or [k, n]: only dtype, device and rank are checked) for oneDNN."""
    return (takes(a) and w.dtype == torch.float32 and w.device.type == "cpu" and w.dim() == 2 and a.dim() >= 2
            and a.numel() > 0 and w.numel() > 0)


def _low_bits(n: int) -> int:
    """How many low bits of n fall below its SIGNIFICANT_BITS leading ones (the bits a piece size drops)."""
    return max(n.bit_length() - SIGNIFICANT_BITS, 0)


@functools.lru_cache(maxsize=8192)
def _piece_sizes(n: int) -> tuple:
    """`pieces`, cached: asked for on every GEMM."""
    sizes = []
    while n:
        low = _low_bits(n)
        sizes.append((n >> low) << low)
        n -= sizes[-1]
    return tuple(sizes)


def pieces(n: int) -> list[int]:
    """n as a sum of sizes with at most SIGNIFICANT_BITS significant bits, largest first (130 -> [128, 2])."""
    return list(_piece_sizes(n))


def small_product(m: int, k: int, n: int, bar: int = MIN_FLOPS) -> bool:
    """An m x k x n product under `bar` FLOPs: torch's GEMM is faster there."""
    return 2 * m * k * n < bar


def onednn_times_transposed(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a @ w^T on oneDNN, whatever the size, for 2-D fp32 CPU a [m, k] and w [n, k] (w any strides; a copied first
    unless its rows are contiguous). The overload itself: calling the packet resolves it on every call."""
    return torch.ops.mkldnn._linear_pointwise.default(a, w, None, "none", [], "")


def matrix_times_transposed(a: torch.Tensor, w: torch.Tensor, small_bar: int = MIN_FLOPS) -> torch.Tensor:
    """a @ w^T for a [m, k] and w [n, k], any strides: cpu_native's GEMM where it runs, else oneDNN from `small_bar`
    FLOPs up and torch's GEMM below. oneDNN's own form: `mm`'s b is w^T, a view. A transposed a (weight gradients'
    grad^T) is copied by cpu_native for oneDNN, not by torch's slower copy inside the op."""
    if native(a, w):
        return cpu_native.gemm(a, w.t())
    if small_product(a.shape[0], a.shape[1], w.shape[0], small_bar) or not enabled():
        return torch.matmul(a, w.t())
    return onednn_times_transposed(a if a.stride(-1) == 1 else cpu_native.transposed(a.t()), w)


def _row_blocks(rows: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor]:
    """rows @ w^T (rows 2-D) as one product per piece of the rows."""
    sizes = _piece_sizes(rows.shape[0])
    if len(sizes) == 1:
        return [matrix_times_transposed(rows, w)]
    return [matrix_times_transposed(block, w) for block in rows.split(sizes)]


def times_transposed(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a @ w^T for a [..., k] and w [n, k], F.linear without bias (no autograd: inside autograd Functions)."""
    if not _fits(a, w):
        return torch.matmul(a, w.t())
    # Leading dims folded here, not by oneDNN: its output would be a view of its [rows, n] result, which autograd
    # refuses to let callers change in place when returned from a custom Function (megatron's linears do).
    rows = a if a.dim() == 2 else a.reshape(-1, a.shape[-1])
    if native(rows, w):
        out = cpu_native.gemm(rows, w.t())
    else:
        blocks = _row_blocks(rows, w)
        out = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
    if a.dim() == 2:
        return out
    # _unsafe_view, as torch.matmul folds back: not a view to autograd, so callers' outputs may be changed in place
    return torch.ops.aten._unsafe_view(out, (*a.shape[:-1], w.shape[0]))


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for a [..., k] and b [k, n] (no autograd: for use inside autograd Functions)."""
    return times_transposed(a, b.t()) if b.dim() == 2 else torch.matmul(a, b)


def addmm_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out += a @ b (2-D), as out.addmm_(a, b)."""
    if not (_fits(a, b) and a.dim() == 2 and out.dtype == torch.float32):
        return out.addmm_(a, b)
    if native(a, b) and out.stride(-1) == 1:
        cpu_native.gemm(a, b, out, accumulate=True)
        return out
    sizes = _piece_sizes(a.shape[1])  # the contraction in pieces too: one more rounding per piece
    a_pieces, b_pieces = ((a,), (b,)) if len(sizes) == 1 else (a.split(sizes, 1), b.split(sizes))
    for a_piece, b_piece in zip(a_pieces, b_pieces):
        if small_product(a.shape[0], a_piece.shape[1], b.shape[1], 2 * MIN_FLOPS):
            out.addmm_(a_piece, b_piece)
            continue
        blocks = _row_blocks(a_piece, b_piece.t())
        if len(blocks) == 1:
            out.add_(blocks[0])
            continue
        row = 0
        for block in blocks:  # added where it lands: no cat
            out.narrow(0, row, block.shape[0]).add_(block)
            row += block.shape[0]
    return out


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) without bias, differentiable, its three GEMMs through oneDNN where it `takes` x."""
    if not (takes(x) and weight.dtype == torch.float32):
        return torch.nn.functional.linear(x, weight)
    return _Linear.apply(x, weight)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return times_transposed(x, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        dx = mm(grad, weight) if ctx.needs_input_grad[0] else None
        dw = mm(grad.reshape(-1, grad.shape[-1]).t(), x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
        return dx, dw


def grouped_times_transposed(x: torch.Tensor, weights, counts: list) -> torch.Tensor:
    """x [tokens, in] sorted by expert, weights one [out, in] per expert (a linear's layout), counts per expert
    (host ints) -> [tokens, out]: one GEMM per expert over its rows rounded up (torch's CPU grouped_mm runs MKL's
    kernel per group)."""
    if not (_fits(x, weights[0]) and x.dim() == 2):
        return torch.cat([torch.matmul(rows, w.t()) for rows, w in zip(x.split(counts), weights)])
    if native(x, weights[0]):  # each expert's rows straight into its rows of the output: no cat, no padding
        out, start = x.new_empty(sum(counts), weights[0].shape[0]), 0
        for n, w in zip(counts, weights):
            if n:
                cpu_native.gemm(x.narrow(0, start, n), w.t(), out.narrow(0, start, n))
            start += n
        return out
    blocks, start = [], 0
    for n, w in zip(counts, weights):
        blocks += _padded_rows_product(x, start, n, w) if n else []
        start += n
    return torch.cat(blocks) if blocks else x.new_empty(0, weights[0].shape[0])


@functools.lru_cache(maxsize=8192)
def _rounded_up(n: int) -> int:
    """n rounded up to at most SIGNIFICANT_BITS significant bits (137 -> 144): a size `pieces` keeps whole."""
    low = _low_bits(n)
    return -(-n >> low) << low


def _padded_rows_product(x: torch.Tensor, start: int, n: int, w: torch.Tensor) -> list[torch.Tensor]:
    """x[start:start + n] @ w^T as one GEMM over the rows rounded up (the next expert's rows ride along and are
    dropped: up to 1/8 more rows, against a second, small GEMM for the tail piece); the pieces where the rounded
    rows would run past x's end."""
    padded = _rounded_up(n)
    if start + padded > x.shape[0]:
        return _row_blocks(x.narrow(0, start, n), w)
    product = matrix_times_transposed(x.narrow(0, start, padded), w)
    return [product if padded == n else product[:n]]


class OneDNNMatmuls(torch.overrides.TorchFunctionMode):
    """Inside it, torch.matmul(a, b) / a.matmul(b) with a 2-D b go through `mm`: wraps code that is not ours
    (megatron-core's linear autograd Functions) without copying it."""

    _MATMULS = frozenset({torch.matmul, torch.Tensor.matmul})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._MATMULS and not kwargs and len(args) == 2 and args[1].dim() == 2:
            return mm(*args)
        return func(*args, **(kwargs or {}))


def with_onednn_matmuls(fn):
    """fn (an autograd Function's forward or backward) with its matmuls through oneDNN (the adapter applies it
    only where `enabled()`; `mm` still falls back to torch for what oneDNN does not take)."""

    @functools.wraps(fn)
    def call(*args):
        with OneDNNMatmuls():
            return fn(*args)

    return call
