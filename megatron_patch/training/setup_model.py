"""Wrap model chunks in megatron-core DDP and build its optimizer: the pieces a train step needs."""
from __future__ import annotations


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
    config.no_sync_func = [w.no_sync for w in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


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
    if fp16:  # the schedules multiply each micro-batch's loss by the current scale
        from megatron.core.utils import get_model_config

        get_model_config(chunks[0]).grad_scale_func = optimizer.scale_loss
    return optimizer


def zero_grads(chunks: list, optimizer=None) -> None:
    for chunk in chunks:
        chunk.zero_grad_buffer()
    if optimizer is not None:
        optimizer.zero_grad()
