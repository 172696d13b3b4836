"""DeepSeek-V2 / V2-Lite (DeepseekV2ForCausalLM) and DeepSeek-V3 (DeepseekV3ForCausalLM).

MLA attention + MoE with shared experts; the first `first_k_dense_replace` layers are dense.
Semantics were compared with transformers 5.23 (models/deepseek_v2|v3/modeling_*.py) and megatron-core
0.16.1 (transformer/moe/moe_utils.py topk_routing_with_score_function / group_limited_topk,
multi_latent_attention.py, yarn_rotary_pos_embedding.py, multi_token_prediction.py).
"""
from __future__ import annotations

from megatron_patch.errors import UserError
from megatron_patch.models.families import common as c
from megatron_patch.models.families.base import Column, Family, GateUp, HookPoint, ParamRow, Replicated, Row, Vocab, row
from megatron_patch.models.families.common import check, const, field, ignored, model


# ---------------------------------------------------------------------------------------------------
# HF config -> MLATransformerConfig
# ---------------------------------------------------------------------------------------------------
def _query_groups(kv_heads, heads):
    # HF MLA expands kv_b_proj to all heads and then repeat_kv's by heads // kv_heads: only equal works.
    if kv_heads not in (None, heads):
        raise UserError(f"num_key_value_heads={kv_heads} != num_attention_heads={heads} is not supported with MLA")
    return heads


_RopeFields = ("rope_type", "rotary_base", "rotary_percent", "rotary_scaling_factor",
               "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")

MLA_MAP = [
    field("num_layers", "num_hidden_layers"),
    field("hidden_size"),
    field("ffn_hidden_size", "intermediate_size"),                    # dense layers' MLP
    field("num_attention_heads"),
    field("num_query_groups", ("num_key_value_heads", "num_attention_heads"), _query_groups),
    field("q_lora_rank"),                                             # None -> linear_q_proj
    field("kv_lora_rank"),
    field("qk_head_dim", "qk_nope_head_dim"),
    field("qk_pos_emb_head_dim", "qk_rope_head_dim"),
    field(("v_head_dim", "kv_channels"), "v_head_dim", lambda v: (v, v)),
    check(("qk_head_dim", "qk_nope_head_dim", "qk_rope_head_dim"), lambda d, n, r: d in (None, n + r),
          "qk_head_dim must be qk_nope_head_dim + qk_rope_head_dim"),
    check(("head_dim", "qk_rope_head_dim"), lambda h, r: h in (None, r),
          "transformers sets head_dim = qk_rope_head_dim for MLA (the rope dimension)"),
    field("activation_func", "hidden_act", c.silu_only),
    const("gated_linear_unit", True),
    const("normalization", "RMSNorm"),
    field("layernorm_epsilon", "rms_norm_eps"),
    const("qk_layernorm", True),          # the local MLA spec builds q_layernorm/kv_layernorm only with it
    const("add_bias_linear", False),
    const("add_qkv_bias", False),
    check("attention_bias", c.is_false, "HF puts biases on q_a_proj/kv_a_proj_with_mqa/o_proj only; "
          "megatron MLA has no such option"),
    field("attention_dropout"),
    const("hidden_dropout", 0.0),         # HF has no residual dropout (megatron default is 0.1)
    field(_RopeFields, ("rope_parameters", "max_position_embeddings"), c.mla_rope),
    model("vocab_size"),
    model("max_position_embeddings"),
    model("untie_embeddings_and_output_weights", "tie_word_embeddings", lambda tied: not tied),
]

MOE_MAP = [
    field("num_moe_experts", "n_routed_experts"),
    field("moe_router_topk", "num_experts_per_tok"),
    field("moe_ffn_hidden_size", "moe_intermediate_size"),
    field("moe_shared_expert_intermediate_size", ("n_shared_experts", "moe_intermediate_size"),
          lambda n, size: n * size if n else None),
    field("moe_layer_freq", ("first_k_dense_replace", "num_hidden_layers"), c.dense_then_moe),
    check("moe_layer_freq", lambda f: f in (None, 1), "transformers' DeepSeek classes ignore it (every layer "
          "from first_k_dense_replace on is MoE); only 1 maps exactly"),
    field("moe_router_topk_scaling_factor", "routed_scaling_factor", c.scaling_or_none),
    # DeepSeek's own config classes default to aux_loss_alpha=0.001, seq_aux=True.
    field("moe_aux_loss_coeff", "aux_loss_alpha", lambda a: 0.001 if a is None else float(a)),
    field("moe_router_load_balancing_type", "seq_aux", lambda s: "aux_loss" if s is False else "seq_aux_loss"),
    const("moe_router_dtype", "fp32"),
    const("moe_token_dispatcher_type", "alltoall"),
    const("moe_grouped_gemm", False),     # SequentialMLP: the name table's local_experts.{expert}
    ignored("ep_size", "DeepSeek's inference-time expert-parallel hint"),
]

_RouterFields = ("moe_router_score_function", "moe_router_pre_softmax", "moe_router_num_groups",
                 "moe_router_group_topk", "moe_router_enable_expert_bias", "moe_router_group_score_topk")


def _groups(n_group, topk_group, topk, experts, family, min_group_size):
    """(num_groups, group_topk) when group-limited routing restricts anything, else (None, None)."""
    if not (n_group and n_group > 1 and topk_group and topk_group < n_group):
        return None, None
    if experts % n_group or experts // n_group < min_group_size:
        raise UserError(f"{family}: n_group={n_group} must divide n_routed_experts={experts} into groups of at "
                        f"least {min_group_size}")
    if topk > topk_group * (experts // n_group):
        raise UserError(f"{family}: num_experts_per_tok={topk} exceeds the experts in topk_group={topk_group} "
                        f"groups of {experts // n_group}")
    return n_group, topk_group


def v2_router(scoring, method, norm, n_group, topk_group, topk, experts):
    """HF DeepseekV2TopkRouter: softmax over all experts, top-k (greedy) or group-limited top-k where a
    group's score is its MAX expert score, no renormalisation (norm_topk_prob is NOT read by transformers
    5.23), then * routed_scaling_factor. megatron: softmax pre top-k (moe_router_pre_softmax) = the same;
    its groups are scored by the sum of their top-(topk/group_topk) scores, so the group score is fixed to
    top-1 through runtime/routing.py."""
    if scoring not in (None, "softmax"):
        raise UserError(f"deepseek_v2: scoring_func={scoring!r} is not supported (transformers' DeepseekV2 "
                        "always uses softmax)")
    if norm:
        raise UserError("deepseek_v2: norm_topk_prob=True is not supported: transformers' DeepseekV2 ignores it "
                        "(no renormalisation) while DeepSeek's original code renormalises; the meaning is "
                        "ambiguous")
    if method in (None, "greedy"):
        groups = (None, None)
    elif method == "group_limited_greedy":
        groups = _groups(n_group, topk_group, topk, experts, "deepseek_v2", 1)
    else:
        raise UserError(f"deepseek_v2: topk_method={method!r} is not supported (greedy, group_limited_greedy)")
    return ("softmax", True) + groups + (False, 1 if groups[0] else None)


def v3_router(scoring, method, norm, n_group, topk_group, topk, experts):
    """HF DeepseekV3TopkRouter: sigmoid scores; choice by scores + e_score_correction_bias, group-limited
    with a group scored by the sum of its top-2 biased scores; weights = unbiased scores of the chosen
    experts, renormalised if norm_topk_prob, * routed_scaling_factor. megatron (sigmoid + expert_bias):
    the same, with the group score fixed to top-2 through runtime/routing.py, and it always
    renormalises when topk > 1."""
    if scoring not in (None, "sigmoid"):
        raise UserError(f"deepseek_v3: scoring_func={scoring!r} is not supported (transformers' DeepseekV3 "
                        "always uses sigmoid)")
    if method not in (None, "noaux_tc"):
        raise UserError(f"deepseek_v3: topk_method={method!r} is not supported (transformers' DeepseekV3 "
                        "implements noaux_tc only)")
    if bool(norm) != (topk > 1):
        raise UserError(f"deepseek_v3: norm_topk_prob={norm} with num_experts_per_tok={topk} is not supported "
                        "(megatron's sigmoid router renormalises exactly when topk > 1)")
    groups = _groups(n_group, topk_group, topk, experts, "deepseek_v3", 2)
    return ("sigmoid", False) + groups + (True, 2 if groups[0] else None)


_ROUTER_HF = ("scoring_func", "topk_method", "norm_topk_prob", "n_group", "topk_group", "num_experts_per_tok",
              "n_routed_experts")


def _mtp_layer_is_moe(n_mtp, first_k_dense, num_layers):
    # megatron's MTP transformer layer copies the LAST decoder layer's spec; HF's MTP layer
    # (index num_layers + i) is MoE. They agree when the last decoder layer is MoE.
    return not n_mtp or num_layers - 1 >= (first_k_dense or 0)


V2_MAP = MLA_MAP + MOE_MAP + [
    field(_RouterFields, _ROUTER_HF, v2_router),
    check("mlp_bias", c.is_false, "megatron's add_bias_linear would also add biases to attention"),
]

V3_MAP = MLA_MAP + MOE_MAP + [
    field(_RouterFields, _ROUTER_HF, v3_router),
    check("rope_interleave", lambda v: v in (None, True), "megatron MLA always applies RoPE to interleaved "
          "pairs (x[0::2], x[1::2])"),
    field("mtp_num_layers", "num_nextn_predict_layers", c.none_if_zero),
    check(("num_nextn_predict_layers", "first_k_dense_replace", "num_hidden_layers"), _mtp_layer_is_moe,
          "megatron builds the MTP layer like the last decoder layer, which is dense here"),
]


TO_MCORE_V2 = c.ConfigMapper("deepseek_v2", V2_MAP, "MLATransformerConfig")
TO_MCORE_V3 = c.ConfigMapper("deepseek_v3", V3_MAP, "MLATransformerConfig")


# ---------------------------------------------------------------------------------------------------
# name table
# ---------------------------------------------------------------------------------------------------
def moe_layers(hf_config) -> list[int]:
    """Global decoder layers with an MoE MLP (the others are dense)."""
    k = hf_config.first_k_dense_replace or 0
    return list(range(k, hf_config.num_hidden_layers))


def dense_layers(hf_config) -> list[int]:
    return list(range(min(hf_config.first_k_dense_replace or 0, hf_config.num_hidden_layers)))


def mtp_layers(hf_config) -> int:
    return getattr(hf_config, "num_nextn_predict_layers", 0) or 0


def _layer_rows(hf_config, m: str, h: str, dense: tuple | None, moe: tuple | None) -> list[ParamRow]:
    """Rows of one transformer layer; `m` / `h` are the Megatron / HF name prefixes. `dense` / `moe`: the
    layers that have a dense / MoE MLP (None: no layer restriction, () : none)."""
    rows = [row(m + "input_layernorm.weight", h + "input_layernorm.weight")]
    a, s = m + "self_attention.", h + "self_attn."
    if hf_config.q_lora_rank is None:
        rows.append(row(a + "linear_q_proj.weight", s + "q_proj.weight", Column))
    else:
        rows += [
            # q/kv down-projections are replicated on every TP rank (runtime/modules.py DuplicatedLinear)
            row(a + "linear_q_down_proj.weight", s + "q_a_proj.weight", Replicated),
            row(a + "q_layernorm.weight", s + "q_a_layernorm.weight"),
            row(a + "linear_q_up_proj.weight", s + "q_b_proj.weight", Column),
        ]
    rows += [
        row(a + "linear_kv_down_proj.weight", s + "kv_a_proj_with_mqa.weight", Replicated),
        row(a + "kv_layernorm.weight", s + "kv_a_layernorm.weight"),
        row(a + "linear_kv_up_proj.weight", s + "kv_b_proj.weight", Column),
        row(a + "linear_proj.weight", s + "o_proj.weight", Row),
        row(m + "pre_mlp_layernorm.weight", h + "post_attention_layernorm.weight"),
    ]
    mm, hm = m + "mlp.", h + "mlp."
    if dense is None or dense:
        rows += [
            row(mm + "linear_fc1.weight", (hm + "gate_proj.weight", hm + "up_proj.weight"), GateUp, dense),
            row(mm + "linear_fc2.weight", hm + "down_proj.weight", Row, dense),
        ]
    if moe is None or moe:
        e, he = mm + "experts.local_experts.{expert}.", hm + "experts.{expert}."
        rows += [
            row(mm + "router.weight", hm + "gate.weight", Replicated, moe),
            row(e + "linear_fc1.weight", (he + "gate_proj.weight", he + "up_proj.weight"), GateUp, moe),
            row(e + "linear_fc2.weight", he + "down_proj.weight", Row, moe),
        ]
        if hf_config.model_type in ("deepseek_v3", "deepseek_v32"):  # sigmoid routers with a choice bias
            rows.append(row(mm + "router.expert_bias", hm + "gate.e_score_correction_bias", Replicated, moe))
        if hf_config.n_shared_experts:
            sh, hs = mm + "shared_experts.", hm + "shared_experts."
            rows += [
                row(sh + "linear_fc1.weight", (hs + "gate_proj.weight", hs + "up_proj.weight"), GateUp, moe),
                row(sh + "linear_fc2.weight", hs + "down_proj.weight", Row, moe),
            ]
    return rows


def params(hf_config) -> list[ParamRow]:
    rows = [row("embedding.word_embeddings.weight", "model.embed_tokens.weight", Vocab)]
    dense, moe = dense_layers(hf_config), moe_layers(hf_config)
    rows += _layer_rows(hf_config, "decoder.layers.{layer}.", "model.layers.{layer}.", tuple(dense), tuple(moe))
    rows.append(row("decoder.final_layernorm.weight", "model.norm.weight"))
    if not hf_config.tie_word_embeddings:
        rows.append(row("output_layer.weight", "lm_head.weight", Vocab))
    # MTP (DeepSeek-V3 num_nextn_predict_layers): HF stores MTP module i at model.layers.{L + i}.
    # megatron: mtp.layers.{i}.{enorm, hnorm, eh_proj, transformer_layer.*, final_layernorm}
    # (multi_token_prediction.py: eh_proj is a ColumnParallelLinear [h, 2h] applied to
    # cat(enorm(embedding), hnorm(hidden)) -- the order vLLM/SGLang use for the DeepSeek weights;
    # shared_head.norm is applied before the shared output layer = megatron's final_layernorm).
    # Names and shapes are checked against a megatron GPTModel built with an MTP block spec
    # (tests/test_families.py); the numerics (transformers 5.23 drops the MTP weights) against a
    # reference MTP module built from transformers' classes in tests/test_mtp.py (TP1, PP2, TP2xEP2).
    L = hf_config.num_hidden_layers
    for i in range(mtp_layers(hf_config)):
        m, h = f"mtp.layers.{i}.", f"model.layers.{L + i}."
        rows += [
            row(m + "enorm.weight", h + "enorm.weight"),
            row(m + "hnorm.weight", h + "hnorm.weight"),
            row(m + "eh_proj.weight", h + "eh_proj.weight", Column),
            row(m + "final_layernorm.weight", h + "shared_head.norm.weight"),
        ]
        rows += _layer_rows(hf_config, m + "transformer_layer.", h, dense=(), moe=None)
    return rows


def hf_copies(hf_config) -> dict[str, str]:
    """HF tensors that are copies of another tensor in the table (HF name -> Megatron name): DeepSeek-V3's
    MTP modules carry their own embed_tokens and shared_head.head, equal to the main ones. Importers skip
    them (or check equality); exporters write the copies."""
    L, out = hf_config.num_hidden_layers, {}
    for i in range(mtp_layers(hf_config)):
        out[f"model.layers.{L + i}.embed_tokens.weight"] = "embedding.word_embeddings.weight"
        out[f"model.layers.{L + i}.shared_head.head.weight"] = (
            "embedding.word_embeddings.weight" if hf_config.tie_word_embeddings else "output_layer.weight")
    return out


def hooks(hf_config) -> list[HookPoint]:
    return c.standard_hooks(has_moe=bool(moe_layers(hf_config)), has_shared=bool(hf_config.n_shared_experts))


# ---------------------------------------------------------------------------------------------------
# presets for make-mini
# ---------------------------------------------------------------------------------------------------
V2_LITE_REAL = dict(  # deepseek-ai/DeepSeek-V2-Lite config.json
    vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
    num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2,
    n_routed_experts=64, num_experts_per_tok=6, first_k_dense_replace=1, moe_layer_freq=1,
    routed_scaling_factor=1.0, topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
    scoring_func="softmax", aux_loss_alpha=0.001, seq_aux=True, q_lora_rank=None, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, hidden_act="silu",
    max_position_embeddings=163840, rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
    attention_dropout=0.0, initializer_range=0.02, bos_token_id=100000, eos_token_id=100001,
    rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=40, original_max_position_embeddings=4096,
                         beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
)

V3_REAL = dict(  # deepseek-ai/DeepSeek-V3 config.json (quantization_config left out: weights only)
    vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
    num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1,
    n_routed_experts=256, num_experts_per_tok=8, first_k_dense_replace=3, moe_layer_freq=1,
    routed_scaling_factor=2.5, topk_method="noaux_tc", n_group=8, topk_group=4, norm_topk_prob=True,
    scoring_func="sigmoid", aux_loss_alpha=0.001, seq_aux=True, ep_size=1, q_lora_rank=1536,
    kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, hidden_act="silu",
    max_position_embeddings=163840, rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
    attention_dropout=0.0, initializer_range=0.02, bos_token_id=0, eos_token_id=1, num_nextn_predict_layers=1,
    rope_interleave=True,
    rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=40, original_max_position_embeddings=4096,
                         beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
)

# Scaled down, same shape: dims divide TP 1/2/4 (heads 4, q_lora 32, kv_lora+rope 40), experts 8 (EP 1..8).
V2_LITE_MINI = dict(
    V2_LITE_REAL, vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
    num_experts_per_tok=2, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    max_position_embeddings=5120, bos_token_id=0, eos_token_id=1, initializer_range=0.1,
    rope_parameters=dict(V2_LITE_REAL["rope_parameters"], original_max_position_embeddings=128),
)

V3_MINI = dict(
    V3_REAL, vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
    num_experts_per_tok=2, n_group=2, topk_group=1,  # 2 groups of 4, one kept
    first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=16, max_position_embeddings=5120, bos_token_id=0, eos_token_id=1, initializer_range=0.1,
    rope_parameters=dict(V3_REAL["rope_parameters"], original_max_position_embeddings=128),
)

DEEPSEEK_V2 = Family(
    name="deepseek_v2",
    hf_architectures=("DeepseekV2ForCausalLM",),
    hf_model_type="deepseek_v2",
    to_mcore_config=TO_MCORE_V2,
    params=params,
    layer_spec=c.layer_spec,
    hooks=hooks,
    presets={"mini": V2_LITE_MINI, "real-config": V2_LITE_REAL},
)

DEEPSEEK_V3 = Family(
    name="deepseek_v3",
    hf_architectures=("DeepseekV3ForCausalLM",),
    hf_model_type="deepseek_v3",
    to_mcore_config=TO_MCORE_V3,
    params=params,
    layer_spec=c.layer_spec,
    hooks=hooks,
    presets={"mini": V3_MINI, "real-config": V3_REAL},
)
