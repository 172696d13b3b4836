#!/usr/bin/env python
"""Seed 000's MoE conversion check, as its guide types it (run it before training):

    python3 examples/deepseek_v2/test_deepseek_moe.py --model_path DIR --device cpu|cuda:N|npu:N [--tp_size 2]

A thin front end of `megatron-patch preflight` (megatron_patch/training/preflight.py): [1/4] tokenizer,
[2/4] the config mapped by the family table and its MoE structure, [3/4] the checkpoint read (headers), [4/4] the model split over --tp_size CPU ranks with the HF weights loaded through the converter,
one forward+backward on CPU; then, for a cuda/npu device, one forward+backward there (one rank).
Ends with `All tests passed!` (exit 0), or names the failing step (exit 1). Bad input: exit 2.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
RULE = "=" * 60


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_path", required=True, help="HF model directory (config.json, safetensors, tokenizer)")
    p.add_argument("--device", default="cpu", help="cpu, cuda:N or npu:N (after the CPU check)")
    p.add_argument("--tp_size", type=int, default=2, help="tensor parallel ranks of the CPU conversion check")
    p.add_argument("--seq_length", type=int, default=64)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import warnings

    warnings.simplefilter("ignore")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    from megatron_patch.errors import UserError
    from megatron_patch.training.preflight import PreflightSpec, run_preflight

    print(f"{RULE}\nDeepSeek-V2 MoE TP Conversion Test\n{RULE}", flush=True)
    cpu = PreflightSpec(hf_path=args.model_path, tp=args.tp_size, device="cpu", seq_length=args.seq_length)
    titles = {"tokenizer": "[1/4] Loading tokenizer...", "config": "[2/4] Mapping the model config and inspecting its MoE structure...",
              "weights": "[3/4] Reading the checkpoint on CPU (safetensors headers)...",
              "model": f"[4/4] Testing TP conversion (tp_size={args.tp_size}, {args.tp_size} CPU ranks)...",
              "train step": "[CPU] Testing forward and backward pass on CPU..."}
    runs = [("CPU", cpu)]
    device = args.device.split(":")[0]
    if device != "cpu":
        runs.append((device.upper(), PreflightSpec(hf_path=args.model_path, device=args.device,
                                                   seq_length=args.seq_length)))
    try:
        for label, spec in runs:
            if label != "CPU":
                print(f"\n[{label}] Moving model to {args.device} and testing forward and backward pass...", flush=True)
            steps = run_preflight(spec, emit=lambda line: None)
            for step in steps:
                title = titles.get(step.name) if label == "CPU" else None
                if title:
                    print(f"\n{title}", flush=True)
                if step.ok is not None or title:
                    print(f"      {step.line()}", flush=True)
            failed = [s for s in steps if s.ok is False]
            if failed:
                print(f"\n{RULE}\nFAILED at {label} {failed[0].name}: {failed[0].detail}\n{RULE}", flush=True)
                return 1
            print(f"      {label} forward pass successful!\n      {label} backward pass successful!", flush=True)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"\n{RULE}\nAll tests passed!\n{RULE}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
