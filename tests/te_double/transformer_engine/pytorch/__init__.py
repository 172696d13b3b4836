"""transformer_engine.pytorch: the module classes megatron-core's TE spec builds, in plain torch."""
from transformer_engine.pytorch import distributed, fp8, ops, router  # noqa: F401
from transformer_engine.pytorch.attention import DotProductAttention
from transformer_engine.pytorch.distributed import CudaRNGStatesTracker, checkpoint
from transformer_engine.pytorch.fp8 import fp8_autocast, fp8_model_init
from transformer_engine.pytorch.module import (GroupedLinear, LayerNorm, LayerNormLinear, Linear, RMSNorm,
                                               TransformerEngineBaseModule)

__all__ = ["DotProductAttention", "CudaRNGStatesTracker", "checkpoint", "fp8_autocast", "fp8_model_init",
           "GroupedLinear", "LayerNorm", "LayerNormLinear", "Linear", "RMSNorm", "TransformerEngineBaseModule"]
