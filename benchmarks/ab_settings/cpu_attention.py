"""paired_ab.py settings: head-wise oneDNN attention (runtime/kernels/cpu_attention.py) against SDPA."""
from megatron_patch.runtime.kernels import cpu_attention

ENABLED = cpu_attention.takes


def headwise():
    cpu_attention.takes = ENABLED


def sdpa():
    cpu_attention.takes = lambda *args: False


SETTINGS = {"head-wise": headwise, "sdpa": sdpa}
