"""The family registry. A new family = its file + one line in FAMILIES.

    fam = family_for_config(hf_config)          # by architectures / model_type
    config = fam.to_mcore_config(hf_config, tensor_model_parallel_size=2)
    args = model_args(hf_config)                # vocab size, max positions, tied embeddings, rope base
    spec = fam.layer_spec(config)
    rows = fam.params(hf_config)                # ParamRow table ({layer}, {expert} templates)
"""
from __future__ import annotations

from megatron_patch.errors import UserError
from megatron_patch.models.families.base import Family, HookPoint, ParamRow
from megatron_patch.models.families.common import (ConcreteRow, ModelArgs, expand_rows, layer_spec,
                                                   mtp_block_spec, shard_context)
from megatron_patch.models.families.deepseek import DEEPSEEK_V2, DEEPSEEK_V3
from megatron_patch.models.families.deepseek_v32 import DEEPSEEK_V32
from megatron_patch.models.families.qwen2 import QWEN2
from megatron_patch.models.families.qwen3_moe import QWEN3_MOE

FAMILIES: dict[str, Family] = {
    DEEPSEEK_V2.name: DEEPSEEK_V2,
    DEEPSEEK_V3.name: DEEPSEEK_V3,
    DEEPSEEK_V32.name: DEEPSEEK_V32,
    QWEN2.name: QWEN2,
    QWEN3_MOE.name: QWEN3_MOE,
}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UserError(f"unknown model family {name!r}; supported: {', '.join(FAMILIES)}") from None


def _supported() -> str:
    return ", ".join(a for f in FAMILIES.values() for a in f.hf_architectures)


def family_for_config(hf_config) -> Family:
    """The family serving an HF config: by `architectures` first, then by `model_type`."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    for arch in archs:
        for fam in FAMILIES.values():
            if arch in fam.hf_architectures:
                return fam
    model_type = getattr(hf_config, "model_type", None)
    if not archs:
        for fam in FAMILIES.values():
            if model_type == fam.hf_model_type:
                return fam
    what = f"architecture {', '.join(archs)}" if archs else f"model_type {model_type!r}"
    raise UserError(f"unsupported {what}; supported architectures: {_supported()}")


def _module(fam: Family):
    import importlib

    return importlib.import_module(fam.params.__module__)


def model_args(hf_config, make_vocab_size_divisible_by: int = 128) -> ModelArgs:
    """GPTModel arguments that are not TransformerConfig fields (vocab size, max positions, untied
    embeddings, rope base); `args.gpt_model_kwargs(tp)` gives the keyword arguments."""
    return family_for_config(hf_config).to_mcore_config.model_args(hf_config, make_vocab_size_divisible_by)


def moe_layers(hf_config) -> list[int]:
    """Global decoder layers whose MLP is MoE."""
    return _module(family_for_config(hf_config)).moe_layers(hf_config)


def hf_copies(hf_config) -> dict[str, str]:
    """HF tensors that duplicate another table tensor (HF name -> Megatron name), e.g. DeepSeek-V3 MTP's
    embed_tokens / shared_head.head. Empty for most families."""
    fn = getattr(_module(family_for_config(hf_config)), "hf_copies", None)
    return fn(hf_config) if fn else {}


__all__ = [
    "FAMILIES", "Family", "HookPoint", "ParamRow", "ConcreteRow", "ModelArgs", "get_family", "family_for_config",
    "model_args", "moe_layers", "hf_copies", "layer_spec", "mtp_block_spec", "shard_context", "expand_rows",
]
