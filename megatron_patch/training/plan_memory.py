"""Per-device memory of a training layout: weights, gradients, optimizer state, activations.

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
Table 2; Megatron-LM's theoretical_memory_usage.py): bytes per layer = the tensors autograd keeps for
backward, per token. Here the terms are the ones this stack's modules actually save (PortableNorm keeps the
fp32 normalised input and its fp32 rstd; linears keep their input, the SP shard under
sequence parallelism; the core attention keeps q, k and v (K/V per KV group: SDPA's enable_gqa), the output and the
fp32 log-sum-exp of a fused kernel (or the probabilities of the math path); SwiGLU keeps fc1's output and
two f-wide tensors (three in grouped experts); grouped experts keep the permuted tokens, their fc1/fc2 activations and the fp32 probs
(the weights are one block, read without a copy); the loss keeps fp32 softmax over the vocabulary shard), each
counted with the layout's split of it:
- TP splits heads and FFN widths; with sequence parallelism the norms and linear inputs hold s/TP tokens;
- CP splits the sequence (each rank s/CP tokens) but the all-gather CP keeps the full K and V;
- EP/ETP: each rank computes on average top-k x its tokens x ETP, with 1/ETP of the expert width;
- PP: pipeline rank r of the 1F1B schedule holds min(PP - r, micro-batches) micro-batches in flight (interleaved:
  2(PP-r-1) + (VPP-1)PP + 1 chunk passes, Megatron's schedule); the last stage adds the loss;
- recompute: selective (megatron's core_attn) drops the attention kernel's own saved state; full keeps each
  layer's input and re-materialises one layer at a time in backward.
tests/test_plan.py checks these against what autograd saves in real runs (SavedTensorMeter) and the optimizer
and gradient terms against a CPU run's peak RSS.
"""
from __future__ import annotations

from dataclasses import dataclass

GiB = 2 ** 30
RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class Workload:
    seq_length: int
    micro_batch_size: int = 1
    bf16: bool = True
    recompute: str = "none"
    use_distributed_optimizer: bool = False
    num_micro_batches: int | None = None   # per step per DP rank; None: enough to fill the pipeline
    fused_attention: bool = True           # flash-style kernel (GPU/NPU, CPU when q/k and v widths agree)

    @property
    def elem(self) -> int:
        return 2 if self.bf16 else 4


@dataclass(frozen=True)
class StageMemory:
    pp_rank: int
    layers: int
    weights: float
    gradients: float
    optimizer: float
    activations: dict           # recompute mode -> bytes
    transient: float = 0.0      # last stage: the fp32 logits gradient, alive next to the saved softmax

    def total(self, recompute: str) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations[recompute] + self.transient


def _norm(h: float, e: int, frozen: bool = False) -> float:
    """The fp32 normalised input and the fp32 rstd (kernels/rms_norm.py's closed-form backward derives the
    weight's gradient from them), frozen or not."""
    return 4 * h + 4


def _swiglu(f: float, e: int, fc2_input: bool = True, fused: bool = False) -> float:
    """fc1 output (2f), the activation's pieces, and fc2's input when fc2 needs it for a weight gradient.
    fused: megatron's bias_activation_fusion path (dense MLP and shared experts; kernels/swiglu.py) keeps the
    two halves as views of fc1's output and silu(gate): one f-wide tensor fewer than the grouped experts'."""
    return e * ((3 if fused else 4) + fc2_input) * f


def attention_bytes(c, layout, w: Workload, core: bool = True, frozen: bool = False,
                    proj_adapted: bool = False) -> tuple[float, float]:
    """(bytes per token of the SP region, bytes per token of the full local sequence) of one attention block.
    core=False: without what the core-attention kernel keeps for itself (selective recompute). frozen: the base
    weights take no gradient (LoRA), so base linears keep no input and norms no normalised output."""
    e, t = w.elem, layout.tp
    a = c.num_attention_heads / t
    lin = 0 if frozen else e                                            # a base linear's saved input, per unit width
    sp = _norm(c.hidden_size, e, frozen) + lin * c.hidden_size         # input norm, first linear's input
    s_kv = w.seq_length                                                 # keys a query sees (all-gather CP: all)
    if c.multi_latent_attention:
        dqk, dv = c.qk_head_dim + c.qk_pos_emb_head_dim, c.v_head_dim
        if c.q_lora_rank:
            sp += _norm(c.q_lora_rank, e, frozen) + lin * c.q_lora_rank  # q_layernorm, linear_q_up_proj input
        sp += _norm(c.kv_lora_rank, e, frozen) + e * c.qk_pos_emb_head_dim + lin * c.kv_lora_rank
    else:
        dqk = dv = c.kv_channels
    kv_factor = layout.cp                                               # K and V gathered over CP
    # torch's fused SDPA takes one head dim: kernels/attention.py pads MLA's v (and so the output) to q/k's
    dv_kernel = max(dqk, dv) if w.fused_attention else dv
    if w.fused_attention and kv_factor == 1 and not c.multi_latent_attention:
        # SDPA's enable_gqa takes the KV groups as they are (kernels/attention.py): k after rope is its own
        # tensor, v a view of the fused qkv projection's output, which it keeps whole
        g = c.num_query_groups / t
        full = e * a * dqk + e * g * dqk + e * (a + 2 * g) * dqk
    else:  # MLA (no groups) and the all-gather CP path: k and v with one head per query head
        full = e * a * dqk + e * a * (dqk + dv_kernel) * kv_factor
    if w.fused_attention or not frozen or proj_adapted:
        full += e * a * dv_kernel                                       # output (kernel's / linear_proj input)
    if w.fused_attention and dv_kernel != dv and not (frozen and not proj_adapted):
        full += e * a * dv                                              # linear_proj's input: the unpadded copy
    if core:
        full += 4 * a if w.fused_attention else e * a * s_kv            # lse, or the softmax probabilities
    return sp, full


def mlp_bytes(c, layout, w: Workload, moe: bool, frozen: bool = False,
              fc2_adapted: bool = False) -> tuple[float, float, float]:
    """(per SP-region token, per full-sequence token, per layer) bytes of one MLP block."""
    e, t, h = w.elem, layout.tp, c.hidden_size
    lin = 0 if frozen else e
    sp = _norm(h, e, frozen)
    fc2_input = not frozen or fc2_adapted
    if not moe:
        return sp + lin * h, _swiglu(c.ffn_hidden_size / t, e, fc2_input, fused=True), 0.0
    shared = c.moe_shared_expert_intermediate_size or 0
    if shared:
        sp += lin * h
    full = _swiglu(shared / t, e, fc2_input, fused=True) if shared else 0.0
    experts, k = c.num_moe_experts, c.moe_router_topk
    sp += 16 * experts + 16 * k + 5 * experts + 8 * k                  # fp32 router scores; routing map, probs, ids
    routed = k * layout.expert_tp                                       # expert rows per SP-region token
    sp += routed * (e * h + _swiglu(c.moe_ffn_hidden_size / layout.expert_tp, e) + 4)
    return sp, full, 0.0  # the grouped GEMM reads the experts' one weight block: no stacked copy is kept


def adapter_bytes(adapters: list, moe: bool, c, layout, w: Workload) -> tuple[float, float]:
    """(per SP-region token, per full-sequence token) bytes the LoRA adapters of one layer keep (models/lora.py):
    a column-parallel target keeps its input (gathered over SP) and A's output, a row-parallel one A's output
    after the reduce-scatter (its input is the base linear's, counted there). adapters: (megatron linear path,
    row parallel, adapter width = parts x r)."""
    sp = full = 0.0
    for rel, row, width in _in_layer(adapters, moe):
        if row:
            sp += w.elem * width
        else:
            full += w.elem * (width + c.hidden_size)
    return sp, full


def _in_layer(adapters, moe: bool) -> list:
    """Dense-MLP targets live in dense layers, shared-expert ones in MoE layers, attention ones in all."""
    return [a for a in adapters if not a[0].startswith("mlp.") or moe == a[0].startswith("mlp.shared_experts.")]


def layer_bytes(c, layout, w: Workload, moe: bool, core: bool = True, adapters: tuple = ()) -> float:
    """Bytes one decoder layer keeps for backward for one micro-batch on one rank."""
    tokens = w.seq_length * w.micro_batch_size / layout.cp
    sp_tokens = tokens / layout.tp if layout.sequence_parallel else tokens
    frozen = bool(adapters)
    rows = {a[0] for a in _in_layer(adapters, moe) if a[1]}
    a_sp, a_full = attention_bytes(c, layout, w, core, frozen, "self_attention.linear_proj" in rows)
    m_sp, m_full, per_layer = mlp_bytes(c, layout, w, moe, frozen, any(r.endswith("linear_fc2") for r in rows))
    l_sp, l_full = adapter_bytes(list(adapters), moe, c, layout, w)
    return sp_tokens * (a_sp + m_sp + l_sp) + tokens * (a_full + m_full + l_full) + per_layer


def loss_bytes(c, layout, w: Workload, padded_vocab: int) -> float:
    """Final norm, output layer input and the fp32 softmax of the vocab-parallel cross entropy."""
    tokens = w.seq_length * w.micro_batch_size / layout.cp
    sp_tokens = tokens / layout.tp if layout.sequence_parallel else tokens
    return sp_tokens * (_norm(c.hidden_size, w.elem) + w.elem * c.hidden_size) + tokens * 4 * padded_vocab / layout.tp


def logits_gradient_bytes(layout, w: Workload, padded_vocab: int) -> float:
    """The cross entropy's backward makes the fp32 gradient of this rank's logits shard at once."""
    return 4 * w.seq_length * w.micro_batch_size / layout.cp * padded_vocab / layout.tp


def in_flight(layout, pp_rank: int, num_micro: int | None) -> float:
    """Micro-batch passes of this rank's layers alive at the peak, in units of the whole stage
    (interleaved: chunk passes divided by VPP)."""
    pp, vpp = layout.pp, layout.vpp or 1
    if vpp == 1:
        n = pp - pp_rank
        return min(n, num_micro) if num_micro else n
    n = 2 * (pp - pp_rank - 1) + (vpp - 1) * pp + 1
    return (min(n, num_micro * vpp) if num_micro else n) / vpp


def activation_bytes(c, layout, w: Workload, stage_layers: list[bool], pp_rank: int, last: bool,
                     mtp_layers: int, padded_vocab: int, adapters: tuple = (), adapter_params: float = 0) -> dict:
    """Activation bytes of a pipeline rank for each recompute mode. stage_layers: one bool per decoder layer
    on the rank (True = MoE); adapter_params: the rank's LoRA parameters (each micro-batch keeps B x mask)."""
    flight = in_flight(layout, pp_rank, w.num_micro_batches)
    per_layer_adapters = w.elem * adapter_params / max(len(stage_layers), 1)
    extra = layer_bytes(c, layout, w, True) if mtp_layers else 0.0
    heads = loss_bytes(c, layout, w, padded_vocab) * (1 + bool(mtp_layers)) if last else 0.0
    heads += extra * mtp_layers  # each MTP layer: a decoder layer and its own loss (on the MTP stage)
    per_mode = {}
    for mode in RECOMPUTE:
        if mode == "full":
            tokens = w.seq_length * w.micro_batch_size / layout.cp
            sp_tokens = tokens / layout.tp if layout.sequence_parallel else tokens
            inputs = w.elem * c.hidden_size * sp_tokens * len(stage_layers) * flight
            one = max((layer_bytes(c, layout, w, moe, adapters=adapters) + per_layer_adapters
                       for moe in set(stage_layers)), default=0.0)
            per_mode[mode] = inputs + max(one, heads)  # the loss's tensors are freed before a layer is recomputed
        else:
            layers = sum(layer_bytes(c, layout, w, moe, mode == "none", adapters) + per_layer_adapters
                         for moe in stage_layers)
            per_mode[mode] = layers * flight + heads
    return per_mode


def state_bytes(params, layout, w: Workload, world: int) -> tuple[float, float, float]:
    """(weights, gradients, optimizer) bytes of one rank. Gradients: megatron DDP's fp32 buffer
    (grad_reduce_in_fp32, as training/setup_model.wrap_ddp) for the trainable parameters; optimizer: Adam's
    two fp32 moments + the fp32 master copy with bf16, sharded over the data-parallel (x CP) group by the
    distributed optimizer (expert parameters over the expert-data-parallel group)."""
    weights = params.total * w.elem
    gradients = params.trainable * 4
    per_param = 8 + (4 if w.bf16 else 0)
    dense, expert = params.trainable - params.expert_trainable, params.expert_trainable
    if w.use_distributed_optimizer:
        dp_cp = world // (layout.tp * layout.pp)
        expert_dp = world // (layout.expert_tp * layout.ep * layout.pp)
        optimizer = per_param * (dense / dp_cp + expert / expert_dp)
    else:
        optimizer = per_param * params.trainable
    return weights, gradients, optimizer
