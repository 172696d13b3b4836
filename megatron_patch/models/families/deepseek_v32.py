"""DeepSeek-V3.2 (DeepseekV32ForCausalLM): DeepSeek-V3 (MLA, sigmoid group-limited MoE, MTP) with DeepSeek
sparse attention (DSA): a lightning indexer per layer picks the top `index_topk` keys each query attends to.

megatron side: megatron-core 0.16.1's own DSA (`experimental_attention_variant="dsa"`, DSAttention /
DSAIndexer, `dsa_indexer_*` fields) in our local spec (models/dsa.py). Semantics were compared with
transformers 5.23 (models/deepseek_v32/modeling_deepseek_v32.py) and megatron-core 0.16.1
(transformer/experimental_attention_variant/dsa.py):
  * indexer q = wq_b(q_a_layernorm(q_a_proj(x))) (megatron's local spec keeps q_layernorm separate, so its
    `qr` is the normalised latent as in HF), k = k_norm(wk(x)) with k_norm a LayerNorm with bias (HF's eps
    is fixed at 1e-6, megatron's is layernorm_epsilon: only 1e-6 maps), RoPE on the rope part of q and k
    (different layouts: see base.IndexerRope), score = sum_h w_h relu(q_h.k) / sqrt(head_dim * n_heads),
    causal, top-k;
  * megatron rotates q and k by a Hadamard matrix (orthogonal: q.k unchanged up to rounding; HF skips it);
  * attention: softmax over the causal keys the indexer selected.
"""
from __future__ import annotations

from megatron_patch.errors import UserError
from megatron_patch.models.families import common as c
from megatron_patch.models.families import deepseek as ds
from megatron_patch.models.families.base import Family, HookPoint, IndexerRope, ParamRow, row
from megatron_patch.models.families.common import check, const, field


# the registry's per-family helpers (families/__init__.py) are DeepSeek-V3's
moe_layers, dense_layers, mtp_layers, hf_copies = ds.moe_layers, ds.dense_layers, ds.mtp_layers, ds.hf_copies


def _dsa(n_heads, head_dim, topk, rope_dim):
    if not (n_heads and n_heads > 0 and topk and topk > 0):
        raise UserError(f"index_n_heads={n_heads} and index_topk={topk} must be positive")
    if not head_dim or head_dim & (head_dim - 1):
        raise UserError(f"index_head_dim={head_dim} must be a power of two (megatron's indexer Hadamard rotation)")
    if not rope_dim or rope_dim > head_dim:
        raise UserError(f"qk_rope_head_dim={rope_dim} must be at most index_head_dim={head_dim}")
    return "dsa", n_heads, head_dim, topk


def _dense_prefix(types, first_k_dense, num_layers):
    k = min(first_k_dense or 0, num_layers)
    return types is None or list(types) == ["dense"] * k + ["sparse"] * (num_layers - k)


V32_MAP = ds.V3_MAP + [
    field(("experimental_attention_variant", "dsa_indexer_n_heads", "dsa_indexer_head_dim", "dsa_indexer_topk"),
          ("index_n_heads", "index_head_dim", "index_topk", "qk_rope_head_dim"), _dsa),
    const("dsa_indexer_loss_coeff", 0.0),  # a training knob (train --dsa-indexer-loss-coeff)
    check("q_lora_rank", lambda r: r is not None, "the indexer's query is made from the q LoRA latent"),
    check("rms_norm_eps", lambda e: e is None or float(e) == 1e-6, "transformers' indexer k_norm uses eps 1e-6 "
          "whatever rms_norm_eps is; megatron gives it layernorm_epsilon, so only 1e-6 maps exactly"),
    check(("mlp_layer_types", "first_k_dense_replace", "num_hidden_layers"), _dense_prefix,
          "megatron's moe_layer_freq comes from first_k_dense_replace: the layers must be that many dense, then MoE"),
    check("layer_types", lambda t: t is None or set(t) <= {"indexed_attention"}, "every layer is DSA here"),
    check("mlp_bias", c.is_false, "megatron's add_bias_linear would also add biases to attention"),
]

TO_MCORE_V32 = c.ConfigMapper("deepseek_v32", V32_MAP, "DSATransformerConfig")


def _indexer_rows(hf_config, m: str, h: str, layers) -> list[ParamRow]:
    """The indexer of one layer template; `m` / `h`: Megatron / HF attention prefixes."""
    rope = IndexerRope(hf_config.index_head_dim, hf_config.qk_rope_head_dim)
    i, hi = m + "core_attention.indexer.", h + "indexer."
    return [
        row(i + "linear_wq_b.weight", hi + "wq_b.weight", rope, layers),
        row(i + "linear_wk.weight", hi + "wk.weight", rope, layers),
        row(i + "k_norm.weight", hi + "k_norm.weight", rope, layers),
        row(i + "k_norm.bias", hi + "k_norm.bias", rope, layers),
        row(i + "linear_weights_proj.weight", hi + "weights_proj.weight", layers=layers),
    ]


def params(hf_config) -> list[ParamRow]:
    rows = ds.params(hf_config)
    rows += _indexer_rows(hf_config, "decoder.layers.{layer}.self_attention.", "model.layers.{layer}.self_attn.", None)
    L = hf_config.num_hidden_layers
    for k in range(ds.mtp_layers(hf_config)):
        rows += _indexer_rows(hf_config, f"mtp.layers.{k}.transformer_layer.self_attention.",
                              f"model.layers.{L + k}.self_attn.", None)
    return rows


def hooks(hf_config) -> list[HookPoint]:
    """DeepSeek-V3's points plus the indexer's selection (compared as sets per query, like the router's
    experts), listed before the attention output it feeds."""
    out = ds.hooks(hf_config)
    at = next(n for n, p in enumerate(out) if p.component == "attention")
    out.insert(at, HookPoint("indexer", "decoder.layers.{layer}.self_attention.core_attention.index_selection",
                             "model.layers.{layer}.self_attn.indexer", kind="indexer"))
    return out


def layer_spec(mcore_config, vp_stage: int | None = None):
    from megatron_patch.models.spec import dsa_block_spec

    return dsa_block_spec(mcore_config, vp_stage=vp_stage)


# deepseek-ai/DeepSeek-V3.2-Exp config.json: DeepSeek-V3's values plus the indexer's (see
# tests/data/real_configs/deepseek-v3.2-exp/config.json for the file and its sources).
V32_REAL = dict(ds.V3_REAL, index_n_heads=64, index_head_dim=128, index_topk=2048)

# The V3 mini plus an indexer: 8 index heads of 32 (a power of two, rope 8 of it), top-16 keys, below
# compare's default 32-token sequence so the selection matters; no MTP.
V32_MINI = dict(ds.V3_MINI, index_n_heads=8, index_head_dim=32, index_topk=16, num_nextn_predict_layers=0)

DEEPSEEK_V32 = Family(
    name="deepseek_v32",
    hf_architectures=("DeepseekV32ForCausalLM",),
    hf_model_type="deepseek_v32",
    to_mcore_config=TO_MCORE_V32,
    params=params,
    layer_spec=layer_spec,
    hooks=hooks,
    presets={"mini": V32_MINI, "real-config": V32_REAL},
)
