"""Qwen3-MoE (Qwen3MoeForCausalLM, e.g. Qwen3-30B-A3B): GQA with per-head q/k RMSNorm, no biases, an
explicit head_dim, MoE without shared experts (dense MLP on `mlp_only_layers` / off-step layers).

Router (transformers 5.23 Qwen3MoeTopKRouter): softmax over all experts, top-k, renormalise when
norm_topk_prob. megatron: norm_topk_prob=True -> top-k on logits then softmax over the k (the same
weights: softmax restricted to the top-k = renormalised top-k probs); False -> softmax before top-k
(moe_router_pre_softmax), no renormalisation.
"""
from __future__ import annotations

from megatron_patch.errors import UserError
from megatron_patch.models.families import common as c
from megatron_patch.models.families.base import Family, GateUp, HookPoint, ParamRow, Replicated, Row, row
from megatron_patch.models.families.common import check, const, field
from megatron_patch.models.families.qwen2 import QWEN_COMMON, attention_rows, dense_mlp_rows, outer_rows


def moe_pattern(num_layers, experts, step, mlp_only):
    """HF Qwen3MoeDecoderLayer: MoE iff layer not in mlp_only_layers and experts > 0 and
    (layer + 1) % decoder_sparse_step == 0."""
    mlp_only = set(mlp_only or [])
    step = step or 1
    return [int(i not in mlp_only and bool(experts) and (i + 1) % step == 0) for i in range(num_layers)]


def router(norm, topk):
    if norm and topk == 1:
        raise UserError("norm_topk_prob=True with num_experts_per_tok=1 is not supported (megatron needs "
                        "moe_router_pre_softmax for top-1, which does not renormalise)")
    return ("softmax", not norm)


QWEN3_MOE_MAP = QWEN_COMMON + [
    const("add_qkv_bias", False),
    check("attention_bias", c.is_false, "HF would put biases on q/k/v AND o_proj; megatron's add_bias_linear "
          "would also add them to the MLPs"),
    const("qk_layernorm", True),          # q_norm / k_norm over head_dim, before RoPE (as megatron)
    field("num_moe_experts", "num_local_experts"),
    field("moe_router_topk", "num_experts_per_tok"),
    field("moe_ffn_hidden_size", "moe_intermediate_size"),
    field("moe_layer_freq", ("num_hidden_layers", "num_local_experts", "decoder_sparse_step", "mlp_only_layers"),
          moe_pattern),
    field(("moe_router_score_function", "moe_router_pre_softmax"), ("norm_topk_prob", "num_experts_per_tok"),
          router),
    field("moe_aux_loss_coeff", "router_aux_loss_coef"),
    const("moe_router_load_balancing_type", "aux_loss"),
    const("moe_router_dtype", "fp32"),
    const("moe_token_dispatcher_type", "alltoall"),
    const("moe_grouped_gemm", False),     # SequentialMLP: the name table's local_experts.{expert}
]

TO_MCORE = c.ConfigMapper("qwen3_moe", QWEN3_MOE_MAP, "TransformerConfig")


def moe_layers(hf_config) -> list[int]:
    pattern = moe_pattern(hf_config.num_hidden_layers, hf_config.num_experts, hf_config.decoder_sparse_step,
                          hf_config.mlp_only_layers)
    return [i for i, p in enumerate(pattern) if p]


def dense_layers(hf_config) -> list[int]:
    moe = set(moe_layers(hf_config))
    return [i for i in range(hf_config.num_hidden_layers) if i not in moe]


def params(hf_config) -> list[ParamRow]:
    m, h = "decoder.layers.{layer}.", "model.layers.{layer}."
    first, last = outer_rows(hf_config)
    rows = first + attention_rows(m, h, qkv_bias=False, qk_norm=True)
    dense, moe = tuple(dense_layers(hf_config)), tuple(moe_layers(hf_config))
    if dense:
        rows += dense_mlp_rows(m, h, dense)
    if moe:
        e, he = m + "mlp.experts.local_experts.{expert}.", h + "mlp.experts.{expert}."
        rows += [
            row(m + "mlp.router.weight", h + "mlp.gate.weight", Replicated, moe),
            row(e + "linear_fc1.weight", (he + "gate_proj.weight", he + "up_proj.weight"), GateUp, moe),
            row(e + "linear_fc2.weight", he + "down_proj.weight", Row, moe),
        ]
    return rows + last


def hooks(hf_config) -> list[HookPoint]:
    return c.standard_hooks(has_moe=bool(moe_layers(hf_config)), has_shared=False)


QWEN3_30B_A3B_REAL = dict(  # Qwen/Qwen3-30B-A3B config.json
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
    num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
    num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
    router_aux_loss_coef=0.001, hidden_act="silu", max_position_embeddings=40960, max_window_layers=48,
    rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False, sliding_window=None,
    attention_bias=False, attention_dropout=0.0, initializer_range=0.02, bos_token_id=151643,
    eos_token_id=151645, rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
)

# head_dim 16 != hidden/heads (8), as the real model's 128 != 2048/32; 8 heads / 4 groups for TP 1/2/4.
QWEN3_MOE_MINI = dict(
    QWEN3_30B_A3B_REAL, vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
    num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=16, num_experts=8,
    num_experts_per_tok=2, max_position_embeddings=512, max_window_layers=4, bos_token_id=0, eos_token_id=1,
    initializer_range=0.1,
)

QWEN3_MOE = Family(
    name="qwen3_moe",
    hf_architectures=("Qwen3MoeForCausalLM",),
    hf_model_type="qwen3_moe",
    to_mcore_config=TO_MCORE,
    params=params,
    layer_spec=c.layer_spec,
    hooks=hooks,
    presets={"mini": QWEN3_MOE_MINI, "real-config": QWEN3_30B_A3B_REAL},
)
