"""Measurements `megatron-patch plan` is checked against (tests/test_plan.py), run inside spawned gloo ranks:
the parameters each rank of a real built model holds, the bytes autograd keeps during a pipelined training
step (SavedTensorMeter), and the peak RSS growth of a CPU training step with the optimizer."""
from __future__ import annotations

import resource

import psutil
import torch


def _build(case: dict):
    from megatron_patch.checkpoint.hf_config import load_hf_config
    from megatron_patch.models.builder import ParallelLayout, build_family_model, initialize_parallel

    hf_config = load_hf_config(case["hf"])
    layout = ParallelLayout(**case["layout"])
    initialize_parallel(layout)
    overrides = {"moe_grouped_gemm": True} if getattr(hf_config, "n_routed_experts", None) else {}
    if case.get("recompute"):  # as train --recompute-granularity (full: uniform, one layer per checkpoint)
        overrides.update(recompute_granularity=case["recompute"])
        if case["recompute"] == "full":
            overrides.update(recompute_method="uniform", recompute_num_layers=1)
    if case.get("bf16"):
        overrides.update(bf16=True, params_dtype=torch.bfloat16)
    chunks, config, margs = build_family_model(hf_config, layout, **overrides)
    if case.get("lora_rank"):
        from megatron_patch.models.lora import apply_lora

        apply_lora(chunks, hf_config, config, margs, layout, case["lora_rank"], 2.0 * case["lora_rank"], 0.0,
                   case["lora_target"], 0)
    return hf_config, chunks, config


def measure_cases(rank: int, world: int, cases: list[dict]) -> list[dict]:
    """Per case: this rank's position, parameter counts, the saved-activation peak of a training step and, for a
    case with steps=N, the peak RSS growth over the built model of N Adam steps (DDP grad buffer, optimizer
    state, activations: the first case of a run, as ru_maxrss never goes down). Run with MALLOC_MMAP_THRESHOLD_
    fixed in the environment so large tensors go back to the system when freed and RSS follows the live bytes.
    Attention runs SDPA and SwiGLU torch's ops, as on a GPU/NPU: fused attention keeps O(s) statistics, not the
    [s, s] probabilities of the CPU head-wise path (kernels/cpu_attention.py), and SwiGLU keeps silu(gate) beside
    fc1's output, which the compiled CPU pass (kernels/cpu_native.py) recomputes; the plan estimates the former."""
    import os

    from megatron_patch.runtime.kernels import cpu_attention, cpu_native

    before = {name: os.environ.get(name) for name in (cpu_attention.ENV, cpu_native.ENV)}
    os.environ.update({cpu_attention.ENV: "sdpa", cpu_native.ENV: "torch"})
    cpu_native._library.cache_clear()  # read once per process: again with this setting, and after it
    try:
        return [_measure(case) for case in cases]
    finally:
        for name, value in before.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value
        cpu_native._library.cache_clear()


def _measure(case: dict) -> dict:
    import gc

    from megatron.core import parallel_state as ps

    from megatron_patch.data.batch import batch_from_tokens
    from megatron_patch.testing.saved_memory import SavedTensorMeter
    from megatron_patch.training.setup_model import build_optimizer, wrap_ddp, zero_grads
    from megatron_patch.training.step import forward_backward

    hf_config, chunks, config = _build(case)
    params = [p for c in chunks for p in c.parameters()]
    row = dict(pp=ps.get_pipeline_model_parallel_rank(), tp=ps.get_tensor_model_parallel_rank(),
               ep=ps.get_expert_model_parallel_rank(), total=sum(p.numel() for p in params),
               trainable=sum(p.numel() for p in params if p.requires_grad))
    gen = torch.Generator().manual_seed(0)
    rows = case["mbs"] * case["num_micro"] * ps.get_data_parallel_world_size()
    batch = batch_from_tokens(torch.randint(0, hf_config.vocab_size, (rows, case["seq"]), generator=gen))
    gc.collect()
    base = psutil.Process().memory_info().rss
    chunks = wrap_ddp(chunks, config)
    optimizer = build_optimizer(chunks, lr=1e-4) if case.get("steps") else None
    with SavedTensorMeter(params) as meter:
        forward_backward(chunks, batch, case["mbs"])
    for _ in range(case.get("steps", 0)):
        optimizer.step()
        zero_grads(chunks, optimizer)
        forward_backward(chunks, batch, case["mbs"])
    row["rss_growth"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    row["saved_peak"] = meter.peak
    del chunks, optimizer, meter
    ps.destroy_model_parallel()
    return row
