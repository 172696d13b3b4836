"""Megatron-LM's MoE engine flags, shared by `train` and `compare`: grouped experts and static-shape
(capacity-bound, padded) token dispatch. They only set TransformerConfig fields; megatron-core implements
them (runtime/grouped_experts.py supplies the grouped experts without TE)."""
from __future__ import annotations

import argparse

from megatron_patch.errors import UserError

DROP_POLICIES = ("probs", "position")


def add_moe_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("MoE engine")
    g.add_argument("--moe-grouped-gemm", action="store_true", default=None,
                   help="all local experts in one grouped GEMM (TE-style weights linear_fc1.weight{e}; torch_dist "
                        "checkpoints are the same as without it); the default for MoE models")
    g.add_argument("--no-moe-grouped-gemm", dest="moe_grouped_gemm", action="store_false",
                   help="one GEMM per expert (SequentialMLP, local_experts.{e})")
    g.add_argument("--moe-expert-capacity-factor", type=float, default=None, metavar="F",
                   help="each expert takes at most F x its even share of the tokens; the rest are dropped")
    g.add_argument("--moe-pad-expert-input-to-capacity", action="store_true",
                   help="pad every expert's input to its capacity: every MoE shape is known before the data "
                        "(static graphs, e.g. Ascend); needs --moe-expert-capacity-factor")
    g.add_argument("--moe-token-drop-policy", choices=DROP_POLICIES, default="probs",
                   help="over capacity, drop the tokens with the lowest router probs (probs) or the latest "
                        "ones (position)")


def moe_overrides(args) -> dict:
    """TransformerConfig overrides for the flags given (nothing for flags left at their defaults)."""
    factor = getattr(args, "moe_expert_capacity_factor", None)
    pad = bool(getattr(args, "moe_pad_expert_input_to_capacity", False))
    if factor is not None and factor <= 0:
        raise UserError(f"--moe-expert-capacity-factor {factor}: must be > 0")
    if pad and factor is None:
        raise UserError("--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor F")
    out: dict = {}
    if getattr(args, "moe_grouped_gemm", None) is not None:
        out["moe_grouped_gemm"] = bool(args.moe_grouped_gemm)
    if factor is not None:
        out.update(moe_expert_capacity_factor=float(factor), moe_pad_expert_input_to_capacity=pad,
                   moe_token_drop_policy=getattr(args, "moe_token_drop_policy", "probs"))
    return out


def with_moe_defaults(overrides: dict, config) -> dict:
    """Grouped experts unless --no-moe-grouped-gemm: for MoE models the default (measured faster than
    SequentialMLP on CPU: benchmarks/train_bench.py); dense models get nothing."""
    if (config.num_moe_experts or 0) and "moe_grouped_gemm" not in overrides:
        return {**overrides, "moe_grouped_gemm": True}
    return overrides


def check_moe_overrides(overrides: dict, config) -> None:
    """Refuse MoE engine flags on a dense model (they would silently do nothing)."""
    keys = [k for k in ("moe_grouped_gemm", "moe_expert_capacity_factor") if overrides.get(k)]
    if keys and not (config.num_moe_experts or 0):
        flags = ", ".join("--" + k.replace("_", "-") for k in keys)
        raise UserError(f"{flags}: the model has no MoE layers; drop the flag")
