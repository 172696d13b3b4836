"""Model FLOPs per token, for tok/s -> MFU.

Counts the matrix multiplications of one token's forward pass (2 FLOPs per multiply-add) and
multiplies by 3 for training (forward + data gradient + weight gradient), as Megatron-LM and the
PaLM/MFU convention do. Norms, activations, softmax and the optimizer are not counted.

Per decoder layer (h hidden, n heads, s sequence length):
  attention, MLA   q:      h*q_lora + q_lora*n*(d_nope+d_rope)     (or h*n*(d_nope+d_rope) without q_lora)
                   kv:     h*(kv_lora+d_rope) + kv_lora*n*(d_nope+d_v)
                   out:    n*d_v*h
                   core:   n*(d_nope+d_rope)*s/2 + n*d_v*s/2        (causal: on average s/2 keys)
  attention, GQA   q,k,v:  h*n*d + 2*h*g*d;  out: n*d*h;  core: 2*n*d*s/2
  MLP, dense       h*ffn*(3 if SwiGLU else 2)
  MLP, MoE         router h*E + top_k * h*moe_ffn*3 + h*shared_ffn*3  (active experts only)
plus the output layer h*V (padded vocab) and, per multi-token-prediction layer, eh_proj 2h*h, a
transformer layer shaped like the last decoder layer, and another output layer.
All terms above are multiply-adds; the forward FLOPs are twice their sum.
"""
from __future__ import annotations


def _mlp_macs(h: int, ffn: int, gated: bool) -> int:
    return h * ffn * (3 if gated else 2)


def _attention_macs(cfg, seq_length: int) -> float:
    h, n = cfg.hidden_size, cfg.num_attention_heads
    if getattr(cfg, "multi_latent_attention", False):
        d_nope, d_rope, d_v = cfg.qk_head_dim, cfg.qk_pos_emb_head_dim, cfg.v_head_dim
        d_qk = d_nope + d_rope
        q = h * cfg.q_lora_rank + cfg.q_lora_rank * n * d_qk if cfg.q_lora_rank else h * n * d_qk
        kv = h * (cfg.kv_lora_rank + d_rope) + cfg.kv_lora_rank * n * (d_nope + d_v)
        out = n * d_v * h
        core = n * d_qk * seq_length / 2 + n * d_v * seq_length / 2
        return q + kv + out + core
    d = cfg.kv_channels or h // n
    g = cfg.num_query_groups or n
    return h * n * d + 2 * h * g * d + n * d * h + 2 * n * d * seq_length / 2


def _moe_pattern(cfg) -> list[int]:
    layers = cfg.num_layers
    if not getattr(cfg, "num_moe_experts", None):
        return [0] * layers
    freq = getattr(cfg, "moe_layer_freq", 1)
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(layers)]
    return list(freq)


def _mlp_layer_macs(cfg, is_moe: bool) -> int:
    h, gated = cfg.hidden_size, cfg.gated_linear_unit
    if not is_moe:
        return _mlp_macs(h, cfg.ffn_hidden_size, gated)
    moe_ffn = cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size
    macs = h * cfg.num_moe_experts + cfg.moe_router_topk * _mlp_macs(h, moe_ffn, gated)
    if getattr(cfg, "moe_shared_expert_intermediate_size", None):
        macs += _mlp_macs(h, cfg.moe_shared_expert_intermediate_size, gated)
    return macs


def forward_flops_per_token(cfg, padded_vocab_size: int, seq_length: int) -> float:
    """Forward-pass FLOPs of one token of a sequence of `seq_length` (cfg: a megatron TransformerConfig
    or anything with the same fields)."""
    pattern = _moe_pattern(cfg)
    attention = _attention_macs(cfg, seq_length)
    macs = sum(attention + _mlp_layer_macs(cfg, bool(m)) for m in pattern)
    logits = cfg.hidden_size * padded_vocab_size
    macs += logits
    for _ in range(getattr(cfg, "mtp_num_layers", None) or 0):
        h = cfg.hidden_size
        macs += 2 * h * h + attention + _mlp_layer_macs(cfg, bool(pattern[-1])) + logits
    return 2.0 * macs


def training_flops_per_token(cfg, padded_vocab_size: int, seq_length: int) -> float:
    """Forward + backward (x3) FLOPs per trained token."""
    return 3.0 * forward_flops_per_token(cfg, padded_vocab_size, seq_length)
