"""Qwen2 / Qwen2.5 (Qwen2ForCausalLM): GQA attention with q/k/v biases, SwiGLU MLP, RMSNorm, RoPE.

Compared with transformers 5.23 models/qwen2/modeling_qwen2.py: q/k/v projections always carry a bias,
o_proj none (megatron add_qkv_bias=True, add_bias_linear=False); RoPE is the non-interleaved
rotate_half form (megatron's default rotary_interleaved=False).
"""
from __future__ import annotations

from megatron_patch.errors import UserError
from megatron_patch.models.families import common as c
from megatron_patch.models.families.base import QKV, Family, GateUp, HookPoint, ParamRow, Row, Vocab, row
from megatron_patch.models.families.common import check, const, field, ignored, model


def full_attention_only(use_sliding_window, layer_types):
    if use_sliding_window:
        raise UserError("use_sliding_window=True is not supported (HF slides only layers >= max_window_layers; "
                        "megatron has no per-layer window of that form)")
    bad = sorted({t for t in (layer_types or []) if t != "full_attention"})
    if bad:
        raise UserError(f"layer_types {bad} are not supported (full_attention only)")
    return True


def head_dim(head_dim_value, hidden, heads):
    # HF: getattr(config, "head_dim", hidden_size // num_attention_heads)
    return head_dim_value or hidden // heads


# The attention / MLP / norm / rope lines every Qwen family shares.
QWEN_COMMON = [
    field("num_layers", "num_hidden_layers"),
    field("hidden_size"),
    field("ffn_hidden_size", "intermediate_size"),
    field("num_attention_heads"),
    field("num_query_groups", "num_key_value_heads"),
    field("kv_channels", ("head_dim", "hidden_size", "num_attention_heads"), head_dim),
    field("activation_func", "hidden_act", c.silu_only),
    const("gated_linear_unit", True),
    const("normalization", "RMSNorm"),
    field("layernorm_epsilon", "rms_norm_eps"),
    const("add_bias_linear", False),
    field("attention_dropout"),
    const("hidden_dropout", 0.0),         # HF has no residual dropout (megatron default is 0.1)
    field(("model.rotary_base", "model.rotary_percent", "model.position_embedding_type"), "rope_parameters",
          c.plain_rope),
    check(("use_sliding_window", "layer_types"), full_attention_only, "sliding-window attention"),
    ignored(("sliding_window", "max_window_layers"), "used only with use_sliding_window=True (refused)"),
    model("vocab_size"),
    model("max_position_embeddings"),
    model("untie_embeddings_and_output_weights", "tie_word_embeddings", lambda tied: not tied),
]

QWEN2_MAP = QWEN_COMMON + [
    const("add_qkv_bias", True),          # Qwen2Attention: q/k/v bias=True (hard-coded), o_proj bias=False
    const("qk_layernorm", False),
]

TO_MCORE = c.ConfigMapper("qwen2", QWEN2_MAP, "TransformerConfig")


def attention_rows(m: str, h: str, qkv_bias: bool, qk_norm: bool) -> list[ParamRow]:
    a, s = m + "self_attention.", h + "self_attn."
    rows = [
        row(m + "input_layernorm.weight", h + "input_layernorm.weight"),
        # megatron's linear_qkv interleaves per query group: [q heads of g; k_g; v_g] (QKV split kind)
        row(a + "linear_qkv.weight", (s + "q_proj.weight", s + "k_proj.weight", s + "v_proj.weight"), QKV),
        row(a + "linear_proj.weight", s + "o_proj.weight", Row),
        row(m + "pre_mlp_layernorm.weight", h + "post_attention_layernorm.weight"),
    ]
    if qkv_bias:
        rows.insert(2, row(a + "linear_qkv.bias", (s + "q_proj.bias", s + "k_proj.bias", s + "v_proj.bias"), QKV))
    if qk_norm:
        rows += [row(a + "q_layernorm.weight", s + "q_norm.weight"), row(a + "k_layernorm.weight", s + "k_norm.weight")]
    return rows


def dense_mlp_rows(m: str, h: str, layers=None) -> list[ParamRow]:
    return [
        row(m + "mlp.linear_fc1.weight", (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"), GateUp, layers),
        row(m + "mlp.linear_fc2.weight", h + "mlp.down_proj.weight", Row, layers),
    ]


def outer_rows(hf_config) -> tuple[list[ParamRow], list[ParamRow]]:
    first = [row("embedding.word_embeddings.weight", "model.embed_tokens.weight", Vocab)]
    last = [row("decoder.final_layernorm.weight", "model.norm.weight")]
    if not hf_config.tie_word_embeddings:
        last.append(row("output_layer.weight", "lm_head.weight", Vocab))
    return first, last


def params(hf_config) -> list[ParamRow]:
    m, h = "decoder.layers.{layer}.", "model.layers.{layer}."
    first, last = outer_rows(hf_config)
    return first + attention_rows(m, h, qkv_bias=True, qk_norm=False) + dense_mlp_rows(m, h) + last


def moe_layers(hf_config) -> list[int]:
    return []


def hooks(hf_config) -> list[HookPoint]:
    return c.standard_hooks(has_moe=False)


QWEN25_32B_REAL = dict(  # Qwen/Qwen2.5-32B config.json
    vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
    num_attention_heads=40, num_key_value_heads=8, hidden_act="silu", max_position_embeddings=131072,
    rms_norm_eps=1e-5, tie_word_embeddings=False, use_sliding_window=False, sliding_window=131072,
    max_window_layers=64, attention_dropout=0.0, initializer_range=0.02, bos_token_id=151643,
    eos_token_id=151643, rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
)

# GQA kept (8 heads / 4 groups: TP 1/2/4), head_dim 16, untied, rope_theta 1e6.
QWEN25_MINI = dict(
    QWEN25_32B_REAL, vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512, max_window_layers=4,
    sliding_window=512, bos_token_id=0, eos_token_id=1, initializer_range=0.1,
)

QWEN2 = Family(
    name="qwen2",
    hf_architectures=("Qwen2ForCausalLM",),
    hf_model_type="qwen2",
    to_mcore_config=TO_MCORE,
    params=params,
    layer_spec=c.layer_spec,
    hooks=hooks,
    presets={"mini": QWEN25_MINI, "real-config": QWEN25_32B_REAL},
)
