"""The megatron-core layer spec every family builds with: the local spec with two changes for MLA.

Why not the plain local spec: it makes MLA's q/kv down-projections ColumnParallelLinear and gathers
their output. The RoPE part of kv_down_proj's output (k_pos_emb) is then used by each TP rank for its
own heads only, and nothing sums its gradient over TP: with TP>1 the forward pass and loss are right
but the kv_down_proj gradients are wrong (measured: up to 2.4e-4 off in fp32 at TP2+SP; megatron-core
0.16.1). Transformer Engine's spec avoids this with "duplicated" (replicated) down-projections, where
MLA gathers k_pos_emb over the sequence and the gather's backward sums it. DuplicatedLinear gives the
local spec the same structure without TE. It requires sequence parallelism when TP>1 (see
check_mla_layout), as MoE with TP already does.
"""
from __future__ import annotations

from megatron_patch.errors import UserError
from megatron_patch.runtime.modules import DuplicatedLinear


def check_mla_layout(config) -> None:
    if config.multi_latent_attention and config.tensor_model_parallel_size > 1 and not config.sequence_parallel:
        raise UserError("MLA with TP>1 needs sequence parallelism (its down-projection gradients are "
                        "summed over the sequence split); turn SP on")


def _duplicate_mla_down_projections(layer_spec) -> None:
    from megatron.core.transformer.multi_latent_attention import MLASelfAttentionSubmodules

    attention = getattr(layer_spec.submodules, "self_attention", None)
    subs = getattr(attention, "submodules", None)
    if isinstance(subs, MLASelfAttentionSubmodules):
        subs.linear_q_down_proj = DuplicatedLinear
        subs.linear_kv_down_proj = DuplicatedLinear


def local_block_spec(config, vp_stage: int | None = None):
    """Decoder block spec for this (virtual) pipeline stage: dense and MoE layers per moe_layer_freq."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    check_mla_layout(config)
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm",
                                       vp_stage=vp_stage)
    for layer_spec in block.layer_specs:
        _duplicate_mla_down_projections(layer_spec)
    return block


def te_block_spec(config, vp_stage: int | None = None):
    """megatron-core's Transformer Engine decoder block spec, as Megatron-LM builds it (its default
    --transformer-impl); needs transformer_engine importable."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    return get_gpt_decoder_block_spec(config, use_transformer_engine=True, normalization=config.normalization,
                                      vp_stage=vp_stage)


def uses_te(config) -> bool:
    """Whether a model for this config is built with the TE spec (models/impl.py chose it)."""
    return getattr(config, "transformer_impl", None) == "transformer_engine"


def dsa_block_spec(config, vp_stage: int | None = None):
    """DeepSeek-V3.2: the local block spec with megatron's DSA core attention (models/dsa.py) in every layer.

    Local spec only: megatron-core 0.16.1's TE DSA spec fuses q_layernorm into linear_q_up_proj, and MLA then
    hands the indexer the un-normalised q_compressed, while DeepSeek's reference (and HF) index from the
    normalised one."""
    if uses_te(config):
        raise UserError("deepseek_v32 (DSA) builds with --transformer-impl local only (megatron-core 0.16.1's TE "
                        "DSA spec feeds the indexer the un-normalised query latent); checkpoints with TE names "
                        "still load")
    from megatron_patch.models.dsa import dsa_core_attention_spec

    block = local_block_spec(config, vp_stage=vp_stage)
    core = dsa_core_attention_spec(config)
    for layer_spec in block.layer_specs:
        layer_spec.submodules.self_attention.submodules.core_attention = core
    return block
