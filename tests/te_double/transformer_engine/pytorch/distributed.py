"""RNG tracker and activation checkpointing: megatron-core subclasses CudaRNGStatesTracker at import
(TECudaRNGStatesTracker) and calls checkpoint only for TE activation recomputation."""


class CudaRNGStatesTracker:
    def __init__(self):
        self.reset()

    def reset(self):
        self.states_ = {}

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self.states_ = dict(states)

    def add(self, name, seed):
        raise NotImplementedError("te_double: TE's RNG tracker is not emulated (use megatron's, the default)")

    def fork(self, name="model-parallel-rng"):
        raise NotImplementedError("te_double: TE's RNG tracker is not emulated (use megatron's, the default)")


def checkpoint(*_args, **_kwargs):
    raise NotImplementedError("te_double: TE activation recomputation is not emulated (recompute off)")


def activation_recompute_forward(*_args, **_kwargs):
    """megatron-core imports it (tensor_parallel/random.py) and uses it only when recomputing in FP8."""
    raise NotImplementedError("te_double: FP8 activation recomputation is not emulated")
