"""Measure what autograd keeps for backward: the bytes of the storages of saved tensors, each storage once,
live (not yet freed) at the same time, and their peak over a forward/backward.

CPU torch has no allocator statistics; this counts exactly the part of memory the activation estimate of
`megatron-patch plan` models (tensors saved by autograd, custom Functions' save_for_backward included),
excluding parameters. Tensors a custom Function keeps as plain ctx attributes are not seen.
"""
from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef


class SavedTensorMeter:
    """with SavedTensorMeter(params) as m: loss = ...; loss.backward()  ->  m.peak, m.live_bytes()"""

    def __init__(self, params=()):
        self.exclude = {p.untyped_storage().data_ptr() for p in params}
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def live_bytes(self) -> int:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            del self.live[key]
        return sum(n for _, n in self.live.values())

    def _pack(self, t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key and key not in self.exclude and (key not in self.live or self.live[key][0].expired()):
                self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                self.peak = max(self.peak, self.live_bytes())
        return t

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False
