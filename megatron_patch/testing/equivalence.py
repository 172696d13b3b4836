"""Layout equivalence: the same tiny MLA + MoE model, the same global batch, at TP1/PP1/EP1 and at a
parallel layout, must give the same loss, gradients and post-step weights.

The reference run (one rank) saves its weights, gradients and post-step weights as megatron-core
dist_checkpointing (torch_dist) checkpoints. A layout run loads the weights from that checkpoint
(resharding on load: dist_checkpointing is the independent reference for "which slice is mine"),
trains one step, then loads the reference gradients / post-step weights into its own sharding and
compares them with its local tensors.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from megatron_patch.data.batch import batch_from_tokens
from megatron_patch.models.builder import ParallelLayout, apply_layout, build_gpt_chunks, initialize_parallel
from megatron_patch.models.spec import local_block_spec
from megatron_patch.training.setup_model import build_optimizer, wrap_ddp
from megatron_patch.training.step import forward_backward

VOCAB = 256
SEQ = 16
GLOBAL_BATCH = 4
MICRO_BATCH = 1
LR = 1e-3
ADAM_EPS = 1e-3  # first Adam step is ~lr*sign(g) with a tiny eps; a larger eps keeps it smooth in g
LORA_RANK, LORA_ALPHA = 4, 8.0  # `lora` runs: adapters on the routed experts only, everything else frozen


def tiny_deepseek_config(**overrides):
    """DeepSeek-V3 shaped: MLA with q_lora, YaRN, first layer dense, sigmoid group-limited routing with
    expert bias and scaling, shared experts. Dimensions divide TP 1/2/4 and EP 1/2/4."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    fields = dict(
        num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
        q_lora_rank=32, kv_lora_rank=32, qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16,
        qk_layernorm=True, normalization="RMSNorm", layernorm_epsilon=1e-6,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=32,
        moe_shared_expert_intermediate_size=32, moe_layer_freq=[0, 1, 1, 1],
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=2.5, moe_router_num_groups=4, moe_router_group_topk=2,
        moe_router_dtype="fp32", moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=1e-2,
        rope_type="yarn", rotary_scaling_factor=4.0, mscale=1.0, mscale_all_dim=1.0,
        original_max_position_embeddings=8, rotary_base=10000,
        params_dtype=torch.float32, bf16=False, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, deterministic_mode=True,
    )
    fields.update(overrides)
    return MLATransformerConfig(**fields)


def global_batch(seed: int = 7, sft: bool = False):
    """`sft`: the loss on "answer" tokens only, as SFT trains: row i masks a prompt of 3 + 3i tokens, so the
    masked count differs per row, per micro-batch and per CP chunk (CP2 chunks are 4 tokens)."""
    gen = torch.Generator().manual_seed(seed)
    batch = batch_from_tokens(torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=gen))
    if sft:
        for row in range(GLOBAL_BATCH):
            batch.loss_mask[row, :3 + 3 * row] = 0
    return batch


def _sharded(chunks):
    """model-chunk sharded state dicts (dist_checkpointing's view of what each rank holds)."""
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _tensor_leaves(sharded):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    return [v for v in nested_values(sharded) if isinstance(v, (ShardedTensor, ShardedTensorFactory))]


def _params_only(sharded, chunks, replace=None, trainable=False):
    """Keep the parameter leaves of a sharded state dict (`trainable`: only those that train); optionally swap
    each param for replace(param)."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    params = {id(p): p for c in chunks for p in c.parameters() if p.requires_grad or not trainable}

    def keep(v):
        if isinstance(v, (ShardedTensor, ShardedTensorFactory)) and id(v.data) in params:
            if replace is not None:
                v.data = replace(params[id(v.data)])
            return v
        return None

    dict_list_map_inplace(keep, sharded)
    return _prune(sharded)


def _prune(d):
    if isinstance(d, dict):
        return {k: _prune(v) for k, v in d.items() if v is not None and _prune(v) != {}}
    return d


def _grad_of(param):
    grad = getattr(param, "main_grad", None)
    return (grad if grad is not None else param.grad).detach().clone()


def _build(layout: ParallelLayout, dist_opt: bool = False, overrides: dict | None = None, lora: bool = False):
    initialize_parallel(layout)
    config = apply_layout(tiny_deepseek_config(**(overrides or {})), layout)
    chunks = build_gpt_chunks(config, local_block_spec, VOCAB, 64, layout)
    if lora:
        from megatron_patch.models.lora import expert_targets, wrap_targets

        moe_layers = tuple(i for i, moe in enumerate(config.moe_layer_freq) if moe)
        wrap_targets(chunks, expert_targets(moe_layers), config, None, LORA_RANK, LORA_ALPHA, 0.0, seed=3)
    chunks = wrap_ddp(chunks, config, use_distributed_optimizer=dist_opt)
    optimizer = build_optimizer(chunks, lr=LR, optimizer="adam", adam_eps=ADAM_EPS, clip_grad=1.0,
                                use_distributed_optimizer=dist_opt)
    return config, chunks, optimizer


def _broadcast_loss(loss):
    """The loss lives on the last pipeline stage; give it to every rank."""
    from megatron.core import parallel_state

    value = torch.tensor([float("nan") if loss is None else loss.item()], dtype=torch.float64)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        last = parallel_state.get_pipeline_model_parallel_last_rank()
        torch.distributed.broadcast(value, last, group=parallel_state.get_pipeline_model_parallel_group())
    return value.item()


def _save(sharded, path: str) -> None:
    from megatron.core import dist_checkpointing

    os.makedirs(path, exist_ok=True)
    dist_checkpointing.save(sharded, path)


def reference_run(rank: int, world: int, out_dir: str, sft: bool = False, lora: bool = False) -> dict:
    """TP1/PP1/EP1: save weights, grads and post-step weights (the trained ones); return the loss. `lora`: B of
    every adapter drawn at random (not peft's zeros), so that A's gradients are not zero either."""
    _, chunks, optimizer = _build(ParallelLayout(), lora=lora)
    if lora:
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, p in chunks[0].named_parameters():
                if ".lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    _save(_params_only(_sharded(chunks), chunks), os.path.join(out_dir, "weights"))
    loss = forward_backward(chunks, global_batch(sft=sft), MICRO_BATCH)
    _save(_params_only(_sharded(chunks), chunks, _grad_of, trainable=True), os.path.join(out_dir, "grads"))
    _, grad_norm, _ = optimizer.step()
    _save(_params_only(_sharded(chunks), chunks, trainable=True), os.path.join(out_dir, "stepped"))
    return {"loss": loss.item(), "grad_norm": grad_norm}


def _max_diff_to_checkpoint(chunks, ckpt_dir, take) -> dict:
    """Load the reference checkpoint into this rank's sharding; per key of a trained parameter (max |local -
    reference|, max |reference|): the magnitude lets a caller bound the difference in ulps of the values."""
    from megatron.core import dist_checkpointing

    expected = dist_checkpointing.load(
        _params_only(_sharded(chunks), chunks, lambda p: torch.empty_like(p), trainable=True), ckpt_dir)
    local = _params_only(_sharded(chunks), chunks, take, trainable=True)
    diffs = {}
    _diff_walk(expected, local, "", diffs)
    return diffs


FP32_EPS = torch.finfo(torch.float32).eps  # one ulp at 1.0; ulp(x) <= FP32_EPS * |x|


def over_bound(diffs: dict, abs_tol: float, ulps: int = 4) -> list:
    """The (key, diff, bound) of every entry of `diffs` (key -> (max diff, max |reference|)) whose
    difference exceeds abs_tol + ulps ulps of the reference's magnitude.

    Why ulps: two runs that reduce in a different order can land on adjacent floats after the final
    rounding (w - lr * update), so a post-step weight near 1.0 may differ by a few 1.19e-7 steps on
    one CPU and not on another; abs_tol carries the error propagated from the gradients."""
    bad = []
    for key, (diff, scale) in diffs.items():
        bound = abs_tol + ulps * FP32_EPS * scale
        if not diff <= bound:
            bad.append((key, diff, bound))
    return bad


def _diff_walk(expected, local, prefix, out):
    if isinstance(expected, dict):
        for key in expected:
            _diff_walk(expected[key], local[key], f"{prefix}{key}.", out)
    elif torch.is_tensor(expected):
        out[prefix[:-1]] = ((expected - local.data).abs().max().item(), expected.abs().max().item())


def references_run(rank: int, world: int, runs: list[tuple]) -> list[dict]:
    """reference_run for several (out_dir, sft[, lora]) one after the other on one rank (the start-up is paid
    once)."""
    return [reference_run(rank, world, *run) for run in runs]


def layout_run(rank: int, world: int, layout: ParallelLayout, ref_dir: str, dist_opt: bool = False,
               overrides: dict | None = None, sft: bool = False, lora: bool = False) -> dict:
    """`overrides`: TransformerConfig fields of this run only (e.g. grouped experts against the reference's
    SequentialMLP: the torch_dist keys are the same). `sft`: the masked batch of global_batch (its reference
    must be an sft reference_run); `lora` likewise (the adapters load from the reference's weights)."""
    from megatron.core import dist_checkpointing

    _, chunks, optimizer = _build(layout, dist_opt, overrides, lora)
    loaded = dist_checkpointing.load(_params_only(_sharded(chunks), chunks), os.path.join(ref_dir, "weights"))
    del loaded  # loaded in place into the params
    loss = _broadcast_loss(forward_backward(chunks, global_batch(sft=sft), MICRO_BATCH))
    result = {"loss": loss}
    if not dist_opt:  # the distributed optimizer reduce-scatters: each rank holds only its grad shard
        result["grad_diff"] = _max_diff_to_checkpoint(chunks, os.path.join(ref_dir, "grads"), _grad_of)
    _, grad_norm, _ = optimizer.step()
    result["grad_norm"] = grad_norm
    result["step_diff"] = _max_diff_to_checkpoint(chunks, os.path.join(ref_dir, "stepped"),
                                                  lambda p: p.detach().clone())
    return result


def layouts_run(rank: int, world: int, layouts: list, ref_dir: str) -> list[dict]:
    """layout_run for several layouts one after the other on the same ranks (the start-up is paid once)."""
    return cases_run(rank, world, [dict(layout=layout, ref_dir=ref_dir) for layout in layouts])


def cases_run(rank: int, world: int, cases: list[dict]) -> list[dict]:
    """layout_run for several keyword sets (layout, ref_dir, dist_opt, overrides, sft, lora) on the same ranks."""
    return [layout_run(rank, world, **case) for case in cases]
