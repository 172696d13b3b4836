"""transformer_engine.common: only the FP8 recipe classes megatron-core subclasses or names at import."""
from transformer_engine.common import recipe  # noqa: F401
