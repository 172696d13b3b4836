#!/usr/bin/env python
"""Seed 000's short TP training run, as its guide types it:

    torchrun --nproc_per_node=4 examples/deepseek_v2/train_deepseek_v2_lite.py --model_path DIR \
        --tp_size 4 --batch_size 1 --max_length 256 --epochs 1 --dtype float32 [--data-path FILE|PREFIX]

A thin front end of `megatron-patch train` (megatron_patch/training): the HF weights are loaded into
Megatron-Core at TP=--tp_size (sequence parallel, experts split over the TP ranks), the data is
--data-path (a Megatron .bin/.idx prefix, or a text/jsonl file tokenized once with the model's tokenizer;
default: the shipped examples/data/corpus.txt), and the run is --epochs over it, capped at --max_steps
(default 20, the guide's short run; 0 = no cap). Log lines `Step N/M | Loss: .. | Aux: .. | LR: .. | Time: ..`,
then `[Done] Training completed successfully!`. Exit status: 0 done, 2 bad input, 3 NaN/Inf stop.
"""
import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
RULE = "=" * 60
DTYPES = {"float32": [], "fp32": [], "bfloat16": ["--bf16"], "bf16": ["--bf16"], "float16": ["--fp16"],
          "fp16": ["--fp16"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_path", required=True, help="HF model directory (config.json, safetensors, tokenizer)")
    p.add_argument("--tp_size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")),
                   help="tensor parallel size (default: all ranks)")
    p.add_argument("--batch_size", type=int, default=1, help="micro batch per data-parallel rank")
    p.add_argument("--max_length", type=int, default=256, help="sequence length")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max_steps", type=int, default=20, help="cap on the steps (0: the whole epochs)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--data-path", "--data_path", dest="data_path", default=os.path.join(REPO, "examples", "data", "corpus.txt"),
                   help="Megatron prefix (PREFIX.bin/.idx) or a text/jsonl file (default: the shipped corpus)")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_patch.errors import UserError
    from megatron_patch.runtime.console import print_once_per_node, quiet_known_warnings
    from megatron_patch.training.arguments import build_parser
    from megatron_patch.training.pretrain import run

    quiet_known_warnings()
    rank0 = os.environ.get("RANK", "0") == "0"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    say = (lambda *a: print(*a, flush=True)) if rank0 else (lambda *a: None)
    say(f"{RULE}\nDeepSeek-V2-Lite MoE TP Training\n{RULE}\nModel: {args.model_path}\nTP Size: {args.tp_size}\n"
        f"World Size: {world}\nBatch Size: {args.batch_size}\nMax Length: {args.max_length}\nData Type: {args.dtype}\n{RULE}")
    try:
        from megatron_patch.data.gpt import check_prefix, iterations_per_epoch
        from megatron_patch.data.preprocess import indexed_from_text

        if os.path.isfile(args.data_path):
            prefix = indexed_from_text(args.data_path, args.model_path)
        else:
            prefix = check_prefix(args.data_path)
        if args.tp_size < 1 or world % args.tp_size:
            raise UserError(f"--tp_size {args.tp_size} must divide the number of ranks ({world})")
        gbs = args.batch_size * (world // args.tp_size)
        per_epoch = iterations_per_epoch(prefix, args.max_length, gbs)
        steps = per_epoch * args.epochs if args.max_steps <= 0 else min(per_epoch * args.epochs, args.max_steps)
        say(f"[Data] {args.data_path}: {per_epoch} steps per epoch of global batch {gbs} x {args.max_length} tokens")
        say(f"[Train] Starting training ({steps} steps)...")
        train_args = build_parser().parse_args([
            "--hf-config", args.model_path, "--load-hf", args.model_path,
            "--tensor-model-parallel-size", str(args.tp_size), "--micro-batch-size", str(args.batch_size),
            "--global-batch-size", str(gbs), "--seq-length", str(args.max_length), "--train-iters", str(steps),
            "--lr", str(args.lr), "--data-path", prefix, "--seed", str(args.seed), *DTYPES[args.dtype]])
        rc = run(train_args)
    except UserError as err:
        print_once_per_node(f"error: {err}")
        return 2
    if rc == 0:
        say("[Done] Training completed successfully!")
    return rc


if __name__ == "__main__":
    sys.exit(main())
