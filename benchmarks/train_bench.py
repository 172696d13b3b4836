"""Training throughput: megatron-core through megatron_patch vs plain HF transformers, same models.

    .venv/bin/python benchmarks/train_bench.py [--steps 8] [--seq-length 256] [--global-batch-size 8]
                                               [--micro-batch-size 2] [--threads N] [--device cpu|cuda|npu]
                                               [--models dense moe] [--hidden H] [--layers L] [--experts E]
                                               [--repeats 3] [--op-times-steps 2]

Two models from make-mini, 4 layers, hidden 256, fp32 on CPU (bf16 on an accelerator):
  dense  Qwen2 (GQA 8 heads / 4 groups, SwiGLU 768)
  moe    DeepSeek-V3 (MLA, 8 routed experts top-2 + 1 shared, first layer dense; no MTP, which HF does
         not train)
The MoE model runs through megatron twice: experts as one grouped GEMM (--moe-grouped-gemm) and as
SequentialMLP (one GEMM per expert). Both are trained on the shipped corpus (examples/data/corpus.txt) with the
same global batch and micro batches, each run in a process of its own with the same thread count: megatron by
`python -m megatron_patch.training.pretrain` at TP1 (its per-step times come from --metrics-file), HF by
benchmarks/hf_train_loop.py (torch, numpy and transformers only: a loop with gradient accumulation, clipping and
torch's AdamW with the fused kernel megatron_patch's optimizer uses). The first WARMUP steps of each are not
timed; batch building is outside the timed region on both sides. The runs are interleaved (megatron, HF,
megatron, HF, ... --repeats times) so that load on a shared machine does not favour one side; a row gives the
median over repeats of each run's median step, and the lines under the table each repeat's ratio, by wall time
and by the process's CPU seconds per step (which load from other jobs changes far less: on a busy machine
compare those).

Where a step goes (CPU, --op-times-steps N): after the timed runs, N more steps of megatron (grouped experts for
the MoE model) and of HF run under benchmarks/op_times.py, which times every aten op: ms per step in GEMMs,
attention (products and softmax, or SDPA's fused kernel), other ops, and between ops (Python, autograd, the
timer's own cost). The last line per model is the bound the kernels set: HF's measured step over the time of
the GEMMs and the attention alone (each the faster side's): no implementation on these kernels beats that ratio.

Reported per model: model FLOPs per token (megatron_patch.training.flops: 3 x forward GEMM FLOPs, MLA
and active experts included), tok/s, and MFU. On CPU, "CPU MFU" is model FLOP/s over this machine's
GEMM FLOP/s measured in the same run (a torch.matmul loop, same thread count), since a CPU has no
datasheet peak; on an accelerator it is against the accelerator's peak (runtime.Accelerator.peak_flops).
On a machine shared with other jobs, `--threads 1` gives repeatable figures: with every core requested,
OpenMP threads that wait on each other make the timings swing by several times.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "examples" / "data" / "corpus.txt"
WARMUP = 2

MODELS = {
    "dense": ("qwen2", dict(hidden=256, layers=4, overrides={
        "intermediate_size": 768, "num_attention_heads": 8, "num_key_value_heads": 4}),
        "Qwen2 dense"),
    "moe": ("deepseek_v3", dict(hidden=256, layers=4, experts=8, overrides={
        "intermediate_size": 768, "moe_intermediate_size": 256, "num_attention_heads": 8, "num_key_value_heads": 8,
        "q_lora_rank": 128, "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16,
        "v_head_dim": 32, "num_nextn_predict_layers": 0}),
        "DeepSeek-V3 MoE"),
}


HF = "HF transformers"
MOE_VARIANTS = (("megatron-core (grouped GEMM)", ("--moe-grouped-gemm",)),
                ("megatron-core (SequentialMLP)", ("--no-moe-grouped-gemm",)))


def gemm_flops(threads: int, device, n: int = 1024, seconds: float = 3.0, dtype=None) -> float:
    """Sustained matmul FLOP/s of this machine (n x n x n, fp32 on CPU), best of 3 timed bursts."""
    import torch

    torch.set_num_threads(threads)
    dtype = dtype or torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b)
    best = 0.0
    for _ in range(3):
        iters, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            torch.matmul(a, b)
            iters += 1
        if device.type != "cpu":
            getattr(torch, device.type).synchronize()
        best = max(best, 2.0 * n ** 3 * iters / (time.perf_counter() - start))
    return best


def prepare(root: Path, args) -> dict:
    import numpy

    from megatron_patch.convert.mini import make_mini
    from megatron_patch.data.preprocess import preprocess

    out = {}
    for name, (family, kw, _) in MODELS.items():
        kw = dict(kw, hidden=args.hidden or kw["hidden"], layers=args.layers or kw["layers"])
        if "experts" in kw and args.experts:
            kw["experts"] = args.experts
        out[name] = make_mini(family, root / name, **kw)
    out["data"] = str(root / "corpus")
    preprocess([str(CORPUS)], str(out["dense"]), out["data"], append_eod=True, progress=False)
    out["tokens"] = str(root / "tokens.npy")  # the same corpus as one stream, for the HF process
    numpy.save(out["tokens"], token_stream(out["data"]))
    return out


def token_stream(prefix: str):
    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return numpy.concatenate([ds[i] for i in range(len(ds))]).astype("int64")


def flops_per_token(model_dir: Path, seq_length: int) -> float:
    """Training FLOPs per token of the megatron config the trainer builds."""
    from transformers import AutoConfig

    from megatron_patch.models.families import family_for_config, model_args
    from megatron_patch.training.flops import training_flops_per_token

    hf = AutoConfig.from_pretrained(model_dir)
    cfg = family_for_config(hf).to_mcore_config(hf)
    return training_flops_per_token(cfg, model_args(hf).padded_vocab_size(1), seq_length)


def megatron_steps(model_dir: Path, data: str, args, threads: int, work: Path, extra=()):
    """Wall and CPU seconds of megatron's steps after warm-up (from its --metrics-file)."""
    metrics = work / f"{model_dir.name}{'-'.join(('',) + tuple(extra))}-metrics.jsonl"
    metrics.unlink(missing_ok=True)  # a repeat's steps only
    cmd = [sys.executable, "-m", "megatron_patch.training.pretrain",
           *megatron_args(model_dir, data, args, work, extra, args.steps + WARMUP), "--metrics-file", str(metrics)]
    proc = subprocess.run(cmd, env=run_env(threads), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        raise SystemExit(f"megatron run failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    steps = [json.loads(line) for line in metrics.read_text().splitlines()][WARMUP:]
    return [s["step_time"] for s in steps], [s["cpu_time"] for s in steps]


def megatron_args(model_dir: Path, data: str, args, work: Path, extra, iters: int) -> list[str]:
    cmd = ["--load-hf", str(model_dir), "--micro-batch-size", str(args.micro_batch_size),
           "--global-batch-size", str(args.global_batch_size), "--seq-length", str(args.seq_length),
           "--train-iters", str(iters), "--lr", "1e-4", "--lr-decay-style", "constant", "--data-path", data,
           "--data-cache-path", str(work / "cache"), "--log-interval", "1000", *extra]
    if args.device:
        cmd += ["--device", args.device]
    if args.bf16:
        cmd += ["--bf16"]
    return cmd


def hf_steps(model_dir: Path, tokens: str, args, threads: int, work: Path, op_times_steps: int = 0):
    """Wall and CPU seconds of the HF loop's steps (after warm-up), run by hf_train_loop.py in a fresh
    process, the model's parameter count, and (op_times_steps > 0) where its steps' time goes."""
    out = work / f"{model_dir.name}-hf.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "hf_train_loop.py"), str(model_dir), tokens, str(out),
           "--steps", str(args.steps), "--warmup", str(WARMUP), "--seq-length", str(args.seq_length),
           "--global-batch-size", str(args.global_batch_size), "--micro-batch-size", str(args.micro_batch_size),
           "--device", args.device or "cpu", "--op-times-steps", str(op_times_steps)] + (["--bf16"] if args.bf16 else [])
    proc = subprocess.run(cmd, env=run_env(threads), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    if proc.returncode:
        raise SystemExit(f"HF run failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    result = json.loads(out.read_text())
    return result["step_times"], result["cpu_times"], result["params"], result.get("op_times")


def megatron_op_times(model_dir: Path, data: str, args, threads: int, work: Path, extra=()) -> dict:
    """Where megatron's step time goes (benchmarks/megatron_op_times.py: the trainer `pretrain` builds from the
    same arguments, --op-times-steps steps after warm-up)."""
    out = work / f"{model_dir.name}-op-times.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "megatron_op_times.py"), str(out), str(WARMUP),
           str(args.op_times_steps)] + megatron_args(model_dir, data, args, work, extra, WARMUP + args.op_times_steps)
    proc = subprocess.run(cmd, env=run_env(threads), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    if proc.returncode:
        raise SystemExit(f"megatron op-times run failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    return json.loads(out.read_text())


def print_op_times(name: str, op_times: dict, hf_step: float) -> None:
    """Per side, ms per step by kind of kernel, and the bound they set: a step that ran only the GEMMs and the
    attention (each the faster side's) against HF's measured step."""
    kinds = ("gemm", "attention", "other_ops", "between_ops")
    print(f"op times, ms per step ({MODELS[name][2]}; GEMM / attention / other ops / between ops = Python, autograd "
          f"and the timer's own cost):")
    for impl, times in op_times.items():
        print(f"  {impl}: {' / '.join(f'{1e3 * times[k]:.0f}' for k in kinds)}")
    floor = min(t["gemm"] for t in op_times.values()) + min(t["attention"] for t in op_times.values())
    print(f"op times bound ({MODELS[name][2]}): GEMMs + attention alone take {1e3 * floor:.0f} ms; a step doing "
          f"nothing else would run at most {hf_step / floor:.2f}x HF's measured step ({1e3 * hf_step:.0f} ms)")


def run_env(threads: int) -> dict:
    """The environment of both sides' processes: the same thread count, no torch.compile."""
    return dict(os.environ, OMP_NUM_THREADS=str(threads), TORCHDYNAMO_DISABLE="1",
                PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def spread(ratios: list[float]) -> str:
    return f"{', '.join(f'{r:.3f}x' for r in ratios)} (median {statistics.median(ratios):.3f}x, spread " \
           f"{max(ratios) - min(ratios):.3f})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8, help="timed steps (after %d warm-up steps)" % WARMUP)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--device", choices=("cpu", "cuda", "npu"), default=None)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--hidden", type=int, default=None, help="hidden size of both models (default 256)")
    p.add_argument("--layers", type=int, default=None, help="layers of both models (default 4)")
    p.add_argument("--experts", type=int, default=None, help="routed experts of the MoE model (default 8)")
    p.add_argument("--op-times-steps", type=int, default=2,
                   help="CPU: then run this many more steps of each side under benchmarks/op_times.py and print where "
                        "a step goes (GEMMs, attention, other ops, between ops); 0: not")
    p.add_argument("--repeats", type=int, default=3,
                   help="interleaved megatron/HF run pairs per model (default 3); rows give the median")
    args = p.parse_args()

    import torch
    from transformers.utils import logging as hf_logging

    from megatron_patch.runtime import get_accelerator, set_accelerator

    hf_logging.disable_progress_bar()

    acc = set_accelerator(args.device) if args.device else get_accelerator()
    args.bf16 = acc.type != "cpu"
    threads = args.threads or os.cpu_count() or 1
    device = acc.current_device()
    if acc.type == "cpu":
        # The machine may be shared: GEMM throughput is measured again after every timed run and the best
        # figure is the reference (contention only ever lowers it).
        gemms = [gemm_flops(threads, device)]
        peak, peak_name = None, "CPU MFU (vs measured GEMM)"
    else:
        peak, peak_name = acc.peak_flops(torch.bfloat16), f"MFU (vs {acc.device_name()} bf16 peak)"
    tokens_per_step = args.global_batch_size * args.seq_length
    print(f"device: {acc.type} ({acc.device_name()}), threads {threads}; global batch {args.global_batch_size} x "
          f"{args.seq_length} tokens, micro batch {args.micro_batch_size}; {args.steps} timed steps")
    runs, ratios, op_times = [], [], {}
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        work = Path(tmp)
        prepared = prepare(work, args)
        for name in args.models:
            model_dir = Path(prepared[name])
            fpt = flops_per_token(model_dir, args.seq_length)
            # MoE: the experts as one grouped GEMM and as SequentialMLP, in the same run
            variants = MOE_VARIANTS if name == "moe" else (("megatron-core", ()),)
            impls = [impl for impl, _ in variants] + [HF]
            wall, cpu = ({impl: [] for impl in impls} for _ in range(2))
            op_steps = args.op_times_steps if acc.type == "cpu" else 0
            for repeat in range(args.repeats):  # megatron, HF, megatron, HF, ...: load hits both sides alike
                for impl, extra in variants:
                    times, cpu_times = megatron_steps(model_dir, prepared["data"], args, threads, work, extra)
                    wall[impl].append(statistics.median(times))
                    cpu[impl].append(statistics.median(cpu_times))
                last = repeat == args.repeats - 1
                times, cpu_times, params, hf_op_times = hf_steps(model_dir, prepared["tokens"], args, threads, work,
                                                                 op_steps if last else 0)
                wall[HF].append(statistics.median(times))
                cpu[HF].append(statistics.median(cpu_times))
                if acc.type == "cpu":
                    gemms.append(gemm_flops(threads, device))
            if op_steps:
                impl, extra = variants[0]
                op_times[name] = ({impl: megatron_op_times(model_dir, prepared["data"], args, threads, work, extra),
                                   HF: hf_op_times}, statistics.median(wall[HF]))
            runs += [(name, params, fpt, impl, statistics.median(wall[impl])) for impl in impls]
            ratios += [(name, impl, [h / m for h, m in zip(wall[HF], wall[impl])],
                        [h / m for h, m in zip(cpu[HF], cpu[impl])]) for impl in impls[:-1]]
    if acc.type == "cpu":
        peak = max(gemms)
        print(f"GEMM throughput (1024^3 fp32 matmul, {threads} threads): best {peak / 1e9:.1f} GFLOP/s of "
              f"{', '.join(f'{g / 1e9:.1f}' for g in gemms)}")
    rows = []
    for name, params, fpt, impl, step in runs:
        tps = tokens_per_step / step
        mfu = fpt * tps / peak if peak else None
        rows.append((MODELS[name][2], f"{params / 1e6:.2f}M", f"{fpt / 1e6:.1f}", impl, f"{step:.3f}",
                     f"{tps:.0f}", f"{100 * mfu:.1f}%" if mfu is not None else "n/a"))
    header = ("model", "params", "MFLOP/token", "implementation", "step s", "tok/s", peak_name)
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    for name, impl, by_wall, by_cpu in ratios:
        # (not starting with the model's name: readers of the table pick rows by it)
        print(f"ratio {impl} / HF ({MODELS[name][2]}) per interleaved repeat: tok/s {spread(by_wall)}; by CPU "
              f"seconds per step (what load does not change) {spread(by_cpu)}")
    for name, (times, hf_step) in op_times.items():
        print_op_times(name, times, hf_step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
