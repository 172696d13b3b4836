"""The megatron side of train_bench.py's "where a step goes" lines: builds the trainer `pretrain` builds from
the same arguments, runs WARMUP steps, then STEPS steps under benchmarks/op_times.py, and writes the seconds per
step by kind of kernel as JSON.

    python benchmarks/megatron_op_times.py OUT.json WARMUP STEPS PRETRAIN_ARGS...
"""
from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    out, warmup, steps, pretrain_args = argv[0], int(argv[1]), int(argv[2]), argv[3:]
    import torch

    from megatron_patch.runtime.console import quiet_known_warnings
    from megatron_patch.training.arguments import build_parser, validate
    from megatron_patch.training.trainer import Trainer
    from megatron_patch.runtime.kernels import cpu_attention, cpu_native
    from op_times import OpTimes, counted_as, timed_as  # next to this file

    # the compiled kernels are not aten ops: timed by kind around their calls
    for name, kind in (("gemm", "gemm"), ("causal_softmax_", "attention"), ("transposed", "other_ops"),
                       ("swiglu", "other_ops"), ("swiglu_backward", "other_ops")):
        setattr(cpu_native, name, timed_as(kind, getattr(cpu_native, name)))

    # the head-wise CPU attention's GEMMs and softmax are attention (SDPA's fused kernel is by its op name)
    for step in ("forward", "backward"):
        setattr(cpu_attention._HeadwiseAttention, step,
                staticmethod(counted_as("attention", getattr(cpu_attention._HeadwiseAttention, step))))
    quiet_known_warnings()
    args = build_parser("megatron_op_times").parse_args(pretrain_args)
    validate(args)
    trainer = Trainer(args)
    try:
        for _ in range(warmup):
            trainer.train_step(trainer.batches.next())
        batches = [trainer.batches.next() for _ in range(steps)]  # batch building is outside, as in train()
        with OpTimes() as op_times:
            for batch in batches:
                trainer.train_step(batch)
    finally:
        trainer.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    with open(out, "w") as f:
        json.dump(op_times.summary(steps), f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
