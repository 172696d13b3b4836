"""Parameters per pipeline rank, counted on the real megatron-core model built on the meta device.

`megatron-patch plan` needs the parameters one rank holds at a layout (TP/ETP shards, EP's local experts, the
stage's layers under an even or uneven pipeline split, embedding / output layer / MTP where megatron puts
them, the vocabulary padded for TP, LoRA adapters with their block-masked B). Rather than a formula, each
pipeline rank's chunks are built with build_family_model (+ apply_lora) on the meta device, no memory and no
initialisation, inside torch's single-process "fake" process group (torch.testing's FakeStore: collectives
are no-ops) posing as one rank of the layout's world, so megatron-core itself decides every shape. TP ranks of
a stage hold the same shapes (the vocabulary is padded to a multiple of TP), and so do EP ranks: one build per
pipeline rank covers the layout. About 0.1-1 s per layout for a 32B model.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

from megatron_patch.errors import UserError


@dataclass(frozen=True)
class RankParams:
    """Parameter counts (elements) of one rank of pipeline stage `pp_rank` (all its virtual chunks)."""
    pp_rank: int
    total: int
    trainable: int          # requires_grad (with LoRA: the adapters only)
    expert_trainable: int   # of trainable: expert-parallel parameters (megatron's allreduce=False)


@contextlib.contextmanager
def fake_rank(layout, pp_rank: int):
    """megatron's parallel state as pipeline rank `pp_rank` (TP/CP/EP/DP rank 0) of the smallest world that
    fits `layout`, inside torch's fake process group; the runtime (CPU patches) set up for the block."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megatron_patch import runtime

    if dist.is_initialized():
        raise UserError("plan runs outside a distributed job (torch.distributed is already initialised)")
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()  # megatron's groups outlived their process group (an earlier in-process run)
    world = math.lcm(layout.tp * layout.pp * layout.cp, layout.expert_tp * layout.ep * layout.pp)
    own_runtime = runtime._STATE["device"] is None
    if own_runtime:
        runtime.setup("cpu")
    # megatron's default rank order tp-cp-ep-dp-pp: the pipeline rank is the slowest-varying
    dist.init_process_group("fake", store=FakeStore(), rank=pp_rank * (world // layout.pp), world_size=world)
    # megatron-core moves some tensors to "cuda" while building (LanguageModule's shared-embedding sync), which
    # the runtime maps to the accelerator's device: here that is the meta device
    acc = runtime.get_accelerator()
    acc.current_device = lambda: torch.device("meta")
    try:
        ps.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
            virtual_pipeline_model_parallel_size=layout.vpp, expert_model_parallel_size=layout.ep,
            expert_tensor_parallel_size=layout.expert_tp, context_parallel_size=layout.cp,
            create_gloo_process_groups=False)
        yield
    finally:
        del acc.current_device  # the class's method again
        ps.destroy_model_parallel()
        dist.destroy_process_group()
        if own_runtime:
            runtime.teardown()


@contextlib.contextmanager
def shapes_only_lora():
    """models.lora with A left uninitialised: its peft-style init is elementwise work that costs ~1 s per model
    on meta tensors and changes no shape."""
    import torch

    from megatron_patch.models import lora

    init_a = lora.init_a
    lora.init_a = lambda seed, layer, rel, part, rank, fan_in: torch.empty(rank, fan_in)
    try:
        yield lora
    finally:
        lora.init_a = init_a


def count_chunks(chunks: list, pp_rank: int) -> RankParams:
    """RankParams of built model chunks (meta or real): the same sums whatever the device."""
    params = [p for c in chunks for p in c.parameters()]
    trainable = [p for p in params if p.requires_grad]
    return RankParams(pp_rank, sum(p.numel() for p in params), sum(p.numel() for p in trainable),
                      sum(p.numel() for p in trainable if not getattr(p, "allreduce", True)))


def rank_params(hf_config, layout, bf16: bool = True, lora_rank: int | None = None,
                lora_target: str | None = None) -> list[RankParams]:
    """RankParams of every pipeline rank of `layout` (index = pp rank)."""
    import torch

    from megatron_patch.models.builder import build_family_model

    dtype = dict(bf16=True, params_dtype=torch.bfloat16) if bf16 else {}
    out = []
    for pp_rank in range(layout.pp):
        with fake_rank(layout, pp_rank), torch.device("meta"):
            chunks, config, margs = build_family_model(
                hf_config, layout, device="meta", transformer_impl="local", use_cpu_initialization=True,
                perform_initialization=False, **dtype)
            if lora_rank:
                with shapes_only_lora() as lora:
                    lora.apply_lora(chunks, hf_config, config, margs, layout, lora_rank, float(lora_rank), 0.0,
                                    lora_target, 0)
            out.append(count_chunks(chunks, pp_rank))
    return out
