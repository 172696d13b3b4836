"""te.pytorch.ops (the operation fuser): names only. megatron-core annotates with them at import and
builds them only for TEFusedMLP / use_te_activation_func, which the double does not emulate."""


class FusibleOperation:
    def __init__(self, *_args, **_kwargs):
        raise NotImplementedError(f"te_double: te.pytorch.ops.{type(self).__name__} is not emulated "
                                  "(turn off use_transformer_engine_op_fuser / use_te_activation_func)")


_NAMES = ("Sequential", "BasicLinear", "Bias", "LayerNorm", "RMSNorm", "SwiGLU", "GEGLU", "ReGLU", "GELU", "ReLU",
          "SiLU", "AllReduce", "ReduceScatter")
globals().update({name: type(name, (FusibleOperation,), {}) for name in _NAMES})
