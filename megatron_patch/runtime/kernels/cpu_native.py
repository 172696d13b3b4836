"""Small compiled fp32 CPU kernels (cpu_native.c) for the hot spots of a CPU training step, on AVX-512 CPUs.

- `transposed(x)`: x^T as a new contiguous matrix. oneDNN's GEMM (kernels/cpu_gemm.py) takes its left operand
  with contiguous rows; torch copies a transposed one first (`contiguous()` inside the op) at ~17-20 GB/s on one
  thread (measured: [512, 768] in 160 us, a plain clone in 35 us). Weight gradients (grad^T @ x) and attention's
  backward (dS^T Q, P^T dO) pay it on every call: ~6 % of a MoE training step here. 16x16 tiles moved through
  AVX-512 registers: 70 us for the same matrix. Same bits (a copy).
- `swiglu(x, probs=None)`, `swiglu_backward(grad, x, probs=None)`: silu(gate) * up on x = [gate | up] (times
  each token's router probability for the grouped experts) and its gradients, each one pass (torch: silu, then
  products; the backward three ops or more, and the forward's silu kept for it).
- `gemm(a, b, out=None, accumulate=False)`: a @ b (or out += a @ b) on one thread for operands of any strides:
  BLIS's loop order, the right operand packed, the left one read in place, a 12 x 32 AVX-512 micro-kernel. About
  oneDNN's speed on the products of a training step (180-210 GFLOP/s on one Zen 5 core) without its ~20 us per
  call and per-shape compilation (kernels/cpu_gemm.py routes to it).
- `causal_softmax_(scores)`: softmax under the causal mask, in place, over the unmasked part of each row only
  (torch adds a -inf bias and exponentiates the whole row): [256, 256] in 16 us against 50. Its exp (Cephes'
  polynomial) and its sum order are its own: within the few ulps of torch's result (measured: the same error
  against float64).

The C is compiled on first use with the system's C compiler (CC, else cc) into the user's cache (MP_CACHE_DIR,
else $XDG_CACHE_HOME/megatron_patch, else ~/.cache/megatron_patch) under a name that hashes its source, compiler
and flags, and called through ctypes. Where there is no compiler, no AVX-512 or no writable cache, or with
MP_CPU_NATIVE=torch, callers run torch's ops instead.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

import torch

ENV = "MP_CPU_NATIVE"
CACHE_ENV = "MP_CACHE_DIR"
# Below this many elements a ctypes call (~2 us) costs more than it saves (transposes: even at 19 x 37).
MIN_ELEMENTS = 1024

_SOURCE = Path(__file__).with_suffix(".c")
_FLAGS = ("-O2", "-mavx512f", "-shared", "-fPIC")


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "megatron_patch"


def _build(compiler: str) -> Path:
    """The shared library, compiled once per source/flags/compiler into the cache (another process may be
    compiling it too: each writes a name of its own, then renames it into place)."""
    source_text = _SOURCE.read_text()
    tag = hashlib.sha256("\0".join((source_text, compiler, *_FLAGS)).encode()).hexdigest()[:16]
    library = cache_dir() / f"mp_native_{tag}.so"
    if library.is_file():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as work:
        source, built = Path(work) / "native.c", Path(work) / "native.so"
        source.write_text(source_text)
        subprocess.run([compiler, *_FLAGS, str(source), "-o", str(built)], check=True, capture_output=True,
                       timeout=120)
        os.replace(built, library)
    return library


_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
# C function -> argument types (void unless in _RETURNS)
_SIGNATURES = {
    "mp_transpose_f32": [_PTR, _I64, _I64, _I64, _PTR, _I64],
    "mp_causal_softmax_f32": [_PTR, _I64, _I64, _I64, _I64],
    "mp_swiglu_f32": [_PTR, _I64, _I64, _I64, _PTR, _PTR],
    "mp_swiglu_backward_f32": [_PTR, _I64, _PTR, _PTR, _I64, _I64, _I64, _PTR, _PTR],
    "mp_gemm_f32": [_I64, _I64, _I64, _PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _I64, ctypes.c_int],
}
_RETURNS = {"mp_gemm_f32": ctypes.c_int}


@functools.lru_cache(maxsize=None)
def _library():
    """The loaded library, or None where callers use torch's ops instead (see the module docstring)."""
    from megatron_patch.runtime.kernels import cpu_gemm

    choice = cpu_gemm.env_choice(ENV, ("auto", "torch"))
    if choice == "torch" or not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return None
    try:
        library = ctypes.CDLL(str(_build(os.environ.get("CC", "cc"))))
    except (OSError, RuntimeError, subprocess.SubprocessError):  # no compiler or HOME, failed build, read-only cache
        return None
    for name, argtypes in _SIGNATURES.items():
        function = getattr(library, name)
        function.restype, function.argtypes = _RETURNS.get(name), argtypes
    return library


def active() -> bool:
    """Whether the compiled kernels run in this process (else torch's ops)."""
    return _library() is not None


def _fits(x: torch.Tensor) -> bool:
    """A 2-D fp32 CPU matrix with contiguous rows, big enough that the call pays (MIN_ELEMENTS)."""
    return (x.dim() == 2 and x.dtype == torch.float32 and x.device.type == "cpu" and x.stride(1) == 1
            and x.numel() >= MIN_ELEMENTS)


def transposed(x: torch.Tensor) -> torch.Tensor:
    """x.t().contiguous() for a 2-D x (no autograd: inside autograd Functions)."""
    library = _library()
    if library is None or not _fits(x):
        return x.t().contiguous()
    out = x.new_empty(x.shape[1], x.shape[0])
    library.mp_transpose_f32(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), out.data_ptr(), x.shape[0])
    return out


def causal_softmax_(scores: torch.Tensor) -> bool:
    """Row i of scores [sq, sk] becomes the softmax of its entries 0..i, zeros after them (SDPA's top-left causal
    mask), in place; False, scores untouched, where the kernel does not run (the caller then masks and calls
    torch.softmax)."""
    library = _library()
    if library is None or not _fits(scores):
        return False
    library.mp_causal_softmax_f32(scores.data_ptr(), scores.shape[0], scores.shape[1], scores.stride(0), 0)
    return True


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., n] as the [rows, n] matrix the kernels read (a view where x's layout allows, else a copy)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def takes_swiglu(x: torch.Tensor, probs: torch.Tensor | None = None) -> bool:
    """Whether `swiglu` runs for x [..., 2 * half] (and probs [tokens], one per row of x, fp32, contiguous)."""
    return (active() and _fits(_rows(x)) and x.shape[-1] % 2 == 0
            and (probs is None or (probs.dtype == torch.float32 and probs.is_contiguous()
                                   and probs.numel() == x.numel() // x.shape[-1] and probs.dim() == 1)))


def swiglu(x: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up for x [..., 2 * half] = [gate | up], times probs[:, None] where given (megatron's order),
    where `takes_swiglu`."""
    rows = _rows(x)
    out = x.new_empty(*x.shape[:-1], x.shape[-1] // 2)
    _library().mp_swiglu_f32(rows.data_ptr(), rows.shape[0], out.shape[-1], rows.stride(0),
                             None if probs is None else probs.data_ptr(), out.data_ptr())
    return out


def swiglu_backward(grad: torch.Tensor, x: torch.Tensor, probs: torch.Tensor | None = None) -> tuple:
    """(dx, dprobs) of `swiglu` for grad [..., half]; dprobs None without probs."""
    rows, grad_rows = _rows(x), _rows(grad.float())  # the output's gradient: fp32 as the output (a no-op)
    dx = x.new_empty(x.shape)
    dprobs = None if probs is None else probs.new_empty(probs.shape)
    _library().mp_swiglu_backward_f32(grad_rows.data_ptr(), grad_rows.stride(0), rows.data_ptr(),
                                      None if probs is None else probs.data_ptr(), rows.shape[0], grad_rows.shape[1],
                                      rows.stride(0), dx.data_ptr(), None if probs is None else dprobs.data_ptr())
    return dx, dprobs


def takes_gemm(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `gemm` runs a @ b: 2-D fp32 CPU matrices, this process on one thread (the kernel is single-threaded:
    with more, oneDNN's threaded GEMMs are the faster choice)."""
    return (active() and a.dim() == 2 and b.dim() == 2 and a.dtype == b.dtype == torch.float32
            and a.device.type == b.device.type == "cpu" and torch.get_num_threads() == 1)


def gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None, accumulate: bool = False) -> torch.Tensor:
    """out = a @ b, or out += a @ b with accumulate, where `takes_gemm(a, b)`: a [m, k], b [k, n] of any strides
    (transposed views are read as they are); out [m, n] fp32 with contiguous rows, new when None. No autograd."""
    m, k = a.shape
    n = b.shape[1]
    if out is None:
        out = a.new_empty(m, n)
    if not (m and n):
        return out
    (ars, acs), (brs, bcs) = a.stride(), b.stride()  # one call each: ~3000 products per training step
    if _library().mp_gemm_f32(m, n, k, a.data_ptr(), ars, acs, b.data_ptr(), brs, bcs, out.data_ptr(), out.stride(0),
                              accumulate):
        raise MemoryError(f"cpu_native.gemm: no memory for the packing buffer of a {m}x{k}x{n} product")
    return out
