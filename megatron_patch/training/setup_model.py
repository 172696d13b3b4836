"""Wrap model chunks in megatron-core DDP and build its optimizer: the pieces a train step needs."""
from __future__ import annotations

import torch


def wrap_ddp(chunks: list, config, use_distributed_optimizer: bool = False) -> list:
    """megatron-core DistributedDataParallel around each chunk, and the config hooks the schedules call
    (no_sync for micro-batches, finalize_model_grads for DP/SP/embedding grad reduction)."""
    from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                           finalize_model_grads)

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer, check_for_nan_in_grad=False,
    )
    wrapped = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                       disable_bucketing=i > 0)
               for i, chunk in enumerate(chunks)]
    for w in wrapped:
        fuse_weight_grad_accumulation(w)
    config.no_sync_func = [w.no_sync for w in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


def fuse_weight_grad_accumulation(chunk) -> int:
    """Let megatron's linears whose weights DDP gave a main_grad accumulate their weight gradient straight
    into it (gradient_accumulation_fusion, Megatron-LM's default; without Apex the runtime supplies the
    kernel). Set on the modules, not the config: it needs the main_grad that only DDP creates."""
    from megatron.core.tensor_parallel import layers

    if not getattr(layers, "_grad_accum_fusion_available", False):
        return 0
    count = 0
    for module in chunk.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, (layers.ColumnParallelLinear, layers.RowParallelLinear)) and \
                isinstance(weight, torch.nn.Parameter) and weight.requires_grad and hasattr(weight, "main_grad"):
            module.gradient_accumulation_fusion = True
            count += 1
    return count


def build_optimizer(chunks: list, lr: float, optimizer: str = "adam", weight_decay: float = 0.0,
                    clip_grad: float = 1.0, use_distributed_optimizer: bool = False, bf16: bool = False,
                    min_lr: float = 0.0, adam_eps: float = 1e-8, adam_beta1: float = 0.9,
                    adam_beta2: float = 0.999, fp16: bool = False, loss_scale: float | None = None,
                    initial_loss_scale: float = 2.0 ** 32, min_loss_scale: float = 1.0,
                    loss_scale_window: float = 1000, hysteresis: int = 2):
    """megatron-core's optimizer: fp32 master weights for bf16/fp16 params; with fp16 a (dynamic) grad
    scaler that skips steps whose gradients overflow. The schedules scale the loss through
    config.grad_scale_func."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer=optimizer, lr=lr, min_lr=min_lr, weight_decay=weight_decay, clip_grad=clip_grad,
        use_distributed_optimizer=use_distributed_optimizer, bf16=bf16,
        adam_eps=adam_eps, adam_beta1=adam_beta1, adam_beta2=adam_beta2, fp16=fp16, loss_scale=loss_scale,
        initial_loss_scale=initial_loss_scale, min_loss_scale=min_loss_scale,
        loss_scale_window=loss_scale_window, hysteresis=hysteresis,
    )
    optimizer = get_megatron_optimizer(config, chunks)
    use_fused_adam(optimizer)
    if fp16:  # the schedules multiply each micro-batch's loss by the current scale
        from megatron.core.utils import get_model_config

        get_model_config(chunks[0]).grad_scale_func = optimizer.scale_loss
    return optimizer


def use_fused_adam(optimizer) -> None:
    """Without TE/Apex megatron-core falls back to torch's AdamW, which on CPU steps one tensor at a time;
    torch's fused CPU kernel (what megatron asks for when it offloads the optimizer to the CPU) takes a
    third of that time. Its updates differ from the per-tensor loop by an ulp or so. Call it again after
    loading optimizer state: a checkpoint's param groups carry their own `fused` flag."""
    import torch

    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = getattr(inner, "optimizer", None)
        if not isinstance(torch_opt, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in torch_opt.param_groups:
            on_cpu = all(p.device.type == "cpu" for p in group["params"])
            if on_cpu and not group.get("differentiable") and not group.get("capturable"):
                group.update(fused=True, foreach=False)


def zero_grads(chunks: list, optimizer=None) -> None:
    for chunk in chunks:
        chunk.zero_grad_buffer()
    if optimizer is not None:
        optimizer.zero_grad()
