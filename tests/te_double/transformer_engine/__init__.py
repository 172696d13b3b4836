"""Test double of NVIDIA Transformer Engine 2.x (see tests/te_double/README.md).

Like the real package, the version comes from the installed distribution's metadata (here the
dist-info folder next to this package), which is where megatron-core's get_te_version() looks when
`__version__` is missing and what importlib.metadata answers.
"""
from importlib import metadata

import transformer_engine.common  # noqa: F401  (te.common.recipe is used as an attribute)
from transformer_engine import pytorch  # noqa: F401

IS_TEST_DOUBLE = True
__version__ = str(metadata.version("transformer_engine"))
