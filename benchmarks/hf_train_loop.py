"""The plain-HF side of train_bench.py, run in its own process: imports torch, numpy and transformers only
(nothing of megatron_patch or megatron-core, so nothing of ours can touch torch's state before it runs; with
--op-times-steps also benchmarks/op_times.py, torch only, after the timed steps).

    python benchmarks/hf_train_loop.py MODEL_DIR TOKENS.npy OUT.json --steps 8 --warmup 2 --seq-length 256
        --global-batch-size 8 --micro-batch-size 2 [--device cpu|cuda|npu] [--bf16]

The loop matches megatron's train step: a global batch of micro-batches with gradient accumulation, the
token-mean loss, clipping to 1.0, AdamW (lr 1e-4, weight decay 0.01, betas and eps as megatron's defaults)
with torch's fused kernel where torch has one (CPU, CUDA), as megatron_patch's optimizer uses on CPU. Batch
building is outside the timed region, as in megatron's loop. OUT.json: {"step_times": [...] (wall seconds after
warm-up), "cpu_times": [...] (this process's CPU seconds in the same steps), "params": N, and with
--op-times-steps "op_times": seconds per step by kind of kernel (op_times.OpTimes.summary)}.
"""
from __future__ import annotations

import argparse
import json
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("tokens", help=".npy of token ids (the corpus as one stream)")
    p.add_argument("out")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--seq-length", type=int, required=True)
    p.add_argument("--global-batch-size", type=int, required=True)
    p.add_argument("--micro-batch-size", type=int, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--op-times-steps", type=int, default=0,
                   help="then run this many more steps under benchmarks/op_times.py (CPU): time by kind of kernel")
    args = p.parse_args()

    import numpy
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).to(device).train()
    fused = True if device.type in ("cpu", "cuda") else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8,
                            fused=fused)
    tokens = torch.from_numpy(numpy.load(args.tokens).astype("int64"))
    span = args.seq_length + 1
    gbs, mbs = args.global_batch_size, args.micro_batch_size

    def batch(step):
        rows = [tokens[((step * gbs + i) * span) % (len(tokens) - span):][:span] for i in range(gbs)]
        return torch.stack(rows).to(device)

    def sync():
        if device.type != "cpu":
            getattr(torch, device.type).synchronize()

    def train_step(data):
        for m in range(0, gbs, mbs):
            chunk = data[m:m + mbs]
            targets = chunk[:, 1:].contiguous()  # already shifted, like megatron's labels
            out = model(input_ids=chunk[:, :-1], labels=targets, shift_labels=targets)
            (out.loss * mbs / gbs).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    times, cpu_times = [], []
    for step in range(args.steps + args.warmup):
        data = batch(step)
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        train_step(data)
        sync()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    result = {"step_times": times[args.warmup:], "cpu_times": cpu_times[args.warmup:], "params": model.num_parameters()}
    if args.op_times_steps:  # after the timed steps: the timer slows what it watches
        from op_times import OpTimes  # torch only, next to this file

        batches = [batch(args.steps + args.warmup + i) for i in range(args.op_times_steps)]
        with OpTimes() as op_times:
            for data in batches:
                train_step(data)
        result["op_times"] = op_times.summary(args.op_times_steps)
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
