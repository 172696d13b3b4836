"""Detect ops whose output shape depends on tensor values, or that copy a value to the host (a graph
break / device sync on NPU and CUDA graphs): nonzero, masked_select, boolean indexing, unique,
.item()/.tolist()."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
DATA_DEPENDENT = {
    aten.nonzero, aten.masked_select, aten._unique, aten._unique2, aten.unique_dim, aten.unique_consecutive,
    aten._local_scalar_dense,  # .item(), int(t), bool(t)
    aten.bincount, aten.histc,
}
INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


class DataDependentOps(TorchDispatchMode):
    """Records (in `seen`) every data-dependent op run inside it, forward and backward; Tensor.tolist (which
    reads CPU memory without dispatching) is recorded by a wrapper while the mode is active."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []
        self.count = 0  # ops dispatched (a test can check that the backward ran inside the mode)
        self._tolist = None

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        seen, original = self.seen, self._tolist

        def tolist(t, *a, **k):
            seen.append("Tensor.tolist")
            return original(t, *a, **k)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        packet = func.overloadpacket
        if packet in DATA_DEPENDENT or (packet is aten.repeat_interleave and "output_size" not in (kwargs or {})
                                        and isinstance(args[0], torch.Tensor) and len(args) == 1) \
                or (packet in INDEXING and _has_bool_index(args)):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))
