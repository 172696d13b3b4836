"""Conversion speed and memory on a synthetic DeepSeek-V2-Lite-width checkpoint (prints figures only).

    python benchmarks/convert_bench.py [--layers 8] [--out-dir /tmp/convert_bench] [--tp 2 --ep 4]
                                       [--format torch_dist|torch]

1. writes an HF checkpoint with the real DeepSeek-V2-Lite widths (hidden 2048, 64 experts x
   moe_intermediate 1408, q_lora none, kv_lora 512, vocab 102400; first layer dense) and `--layers`
   layers, bf16, in ~1 GiB safetensors shards, with its config.json (8 layers: ~9.2 GB, 3: ~3.3 GB);
2. times `cp -r` of those files (the input is warm in the page cache for both runs);
3. runs `megatron-patch convert hf2mcore --tp 2 --ep 4 --format F` in a subprocess and reads its peak RSS
   (wait4 rusage of that process) and wall time. This process stays small (the checkpoint is built in
   a child too): Linux keeps ru_maxrss across exec, so a child started from a big parent would report
   the parent's peak.

Targets: conversion wall / cp -r <= 1.4, peak RSS <= 1.5 GiB. The wall time includes a fixed ~7-8 s
of Python imports (torch, megatron-core, transformers) on a 2-core box, so a few-GB checkpoint
mostly measures start-up (3 layers: ~2x cp); the default is 8 layers. torch_dist (Megatron-LM's
default checkpoint format) stores every tensor once, so its output is the input's size. The torch
format's output is larger: Megatron-LM's torch format stores the dense part (embedding, attention,
dense MLP, shared experts) in every EP rank's file (6.75 GB written for 3.34 GB at EP4).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path


def build_checkpoint(out: Path, layers: int, shard_bytes: int = 1 << 30) -> int:
    import torch
    from safetensors.torch import save_file

    from megatron_patch.checkpoint.engine import ShardPlan
    from megatron_patch.checkpoint.hf_config import expected_hf_shapes
    from megatron_patch.convert.mini import build_hf_config, config_dict
    from megatron_patch.models.builder import ParallelLayout
    from megatron_patch.models.families import family_for_config

    cfg = build_hf_config("deepseek_v2", config_dict("deepseek_v2", preset="real-config", layers=layers))
    out.mkdir(parents=True)
    cfg.save_pretrained(out)
    plan = ShardPlan(family_for_config(cfg), cfg, ParallelLayout())
    shapes = expected_hf_shapes(cfg)
    pool = (torch.randn(1 << 25, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    shard, shard_size, weight_map, total, index = {}, 0, {}, 0, 0

    def flush():
        nonlocal shard, shard_size, index
        if shard:
            index += 1
            name = f"model-{index:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, shard_size = {}, 0

    for i, name in enumerate(plan.hf_names()):
        shape = shapes[name]
        numel = 1
        for d in shape:
            numel *= d
        start = (i * 7919) % (pool.numel() // 2)
        reps = -(-numel // (pool.numel() - start))
        data = pool[start:].repeat(reps)[:numel] if reps > 1 else pool[start:start + numel]
        shard[name] = data.reshape(shape).clone()
        shard_size += numel * 2
        total += numel * 2
        if shard_size >= shard_bytes:
            flush()
    flush()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def timed_child(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS GiB of that process, output)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{output}")
    return wall, usage.ru_maxrss / 1024**2, output


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8, help="decoder layers (8: ~9.2 GB, 3: ~3.3 GB)")
    ap.add_argument("--out-dir", default="/tmp/convert_bench", help="working directory (replaced)")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--ep", type=int, default=4)
    ap.add_argument("--format", default="torch_dist", choices=("torch_dist", "torch"), help="output format")
    ap.add_argument("--keep", action="store_true", help="keep the files afterwards")
    ap.add_argument("--no-output-copy", action="store_true", help="skip timing cp -r of the output")
    ap.add_argument("--build-only", default=None, metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args()

    work = Path(args.out_dir)
    if args.build_only is not None:
        print(build_checkpoint(Path(args.build_only), args.layers))
        return
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    hf, copy_dir, mcore = work / "hf", work / "cp", work / "mcore"
    t0 = time.perf_counter()
    _, _, built = timed_child([sys.executable, "-W", "ignore", __file__, "--layers", str(args.layers),
                               "--build-only", str(hf)])
    nbytes = int(built.strip().splitlines()[-1])
    print(f"synthetic DeepSeek-V2-Lite-width checkpoint: {args.layers} layers, {nbytes / 1e9:.2f} GB of bf16 "
          f"tensors, built in {time.perf_counter() - t0:.1f} s")

    subprocess.run(["sync"], check=False)
    cp_wall, _, _ = timed_child(["cp", "-r", str(hf), str(copy_dir)])
    shutil.rmtree(copy_dir)
    subprocess.run(["sync"], check=False)
    env_python = [sys.executable, "-W", "ignore", "-m", "megatron_patch.cli"]
    cmd = env_python + ["convert", "hf2mcore", "--hf-path", str(hf), "--out", str(mcore), "--tp", str(args.tp),
                        "--ep", str(args.ep), "--format", args.format]
    conv_wall, conv_rss, output = timed_child(cmd)
    out_bytes = dir_bytes(mcore)
    summary = [line for line in output.splitlines() if line.startswith("hf2mcore:")]
    print(f"command: {' '.join(cmd[1:])}")
    print(summary[-1] if summary else output)
    print(f"cp -r of the input:      {cp_wall:7.2f} s ({nbytes / 1e9 / cp_wall:.2f} GB/s)")
    print(f"hf2mcore {args.format:10s} TP{args.tp} x EP{args.ep}: {conv_wall:7.2f} s wall incl. startup "
          f"({nbytes / 1e9 / conv_wall:.2f} GB/s read, {out_bytes / 1e9 / conv_wall:.2f} GB/s written; "
          f"output {out_bytes / 1e9:.2f} GB)")
    phase = re.search(r" in ([\d.]+) s ", summary[-1]) if summary else None
    if phase:  # the converter's own timer starts after the imports
        print(f"  of which start-up:     {conv_wall - float(phase.group(1)):7.2f} s (imports, planning); streaming "
              f"phase / cp: {float(phase.group(1)) / cp_wall:.2f}")
    print(f"ratio conversion / cp:   {conv_wall / cp_wall:7.2f}  (target <= 1.4)")
    print(f"peak RSS of conversion:  {conv_rss:7.2f} GiB (target <= 1.5)")
    if not args.no_output_copy:  # the same bytes as the conversion writes, copied: the disk's share
        subprocess.run(["sync"], check=False)
        out_cp, _, _ = timed_child(["cp", "-r", str(mcore), str(work / "mcore-copy")])
        print(f"cp -r of the output:     {out_cp:7.2f} s ({out_bytes / 1e9 / out_cp:.2f} GB/s); "
              f"conversion / cp of its output: {conv_wall / out_cp:.2f}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
