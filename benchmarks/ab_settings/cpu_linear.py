"""paired_ab.py settings: the lean CPU linear (runtime/cpu_linear.py) against megatron-core's own Function.
The switches run after the Trainer has applied the runtime's patches, so the patched entry point is read then."""
import megatron.core.tensor_parallel.layers as layers

_PATCHED = []


def _entry_points():
    if not _PATCHED:
        _PATCHED.append(layers.linear_with_grad_accumulation_and_async_allreduce)
    lean = _PATCHED[0]
    return lean, getattr(lean, "__wrapped__", lean)


def lean():
    layers.linear_with_grad_accumulation_and_async_allreduce = _entry_points()[0]


def megatron():
    layers.linear_with_grad_accumulation_and_async_allreduce = _entry_points()[1]


SETTINGS = {"lean": lean, "megatron": megatron}
