"""Quantization recipes: names only. The double runs in full precision; megatron-core subclasses
DelayedScaling at import (TEDelayedScaling) and names the others when FP8/FP4 is configured."""
from enum import Enum


class Format(Enum):
    E4M3 = "E4M3"
    E5M2 = "E5M2"
    HYBRID = "HYBRID"


class Recipe:
    """Base of every recipe; constructing one works, using it under fp8_autocast does not."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def delayed(self) -> bool:
        return isinstance(self, DelayedScaling)


class DelayedScaling(Recipe):
    pass


class Float8CurrentScaling(Recipe):
    pass


class Float8BlockScaling(Recipe):
    pass


class MXFP8BlockScaling(Recipe):
    pass


class NVFP4BlockScaling(Recipe):
    pass
