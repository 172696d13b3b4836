"""Fused MoE router kernels: megatron-core imports these names for TE >= 2.7 and calls them only with
moe_router_fusion=True, which the double does not emulate."""


def _not_emulated(*_args, **_kwargs):
    raise NotImplementedError("te_double: fused router kernels are not emulated (set moe_router_fusion=False)")


fused_topk_with_score_function = _not_emulated
fused_compute_score_for_moe_aux_loss = _not_emulated
fused_moe_aux_loss = _not_emulated
