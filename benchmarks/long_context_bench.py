"""Long sequences with context parallelism: per-rank peak memory and tok/s of a tiny model, CP 1/2/4.

    .venv/bin/python benchmarks/long_context_bench.py [--family mla gqa] [--seq-lengths 4096 8192 16384 32768]
                                                      [--cp 1 2 4] [--cp-comm-type all_gather p2p] [--steps 2]
                                                      [--quick] [--json FILE]

Models (fp32, megatron-core through megatron_patch, local spec, 2 layers, hidden 64, vocab 256):
  mla  DeepSeek-V3 shaped (testing/equivalence.py's config): MLA 4 heads, q/k 24, v 16, YaRN; layer 0 dense,
       layer 1 MoE (8 experts top-2 + shared)
  gqa  Qwen2 shaped: 4 query heads over 2 K/V groups of 16, RoPE, SwiGLU 128
One sequence per step (micro batch 1), split over CP gloo ranks (DP 1), one thread per rank, Adam. For every
CP size one spawn of CP ranks runs all (family, length, comm type) cases in turn, shortest first; each case
builds its model, runs one untimed step, then --steps timed ones.

Memory: per rank, the peak resident set size (RSS) during the timed steps minus the RSS just before them
(/proc/self/clear_refs resets the kernel's high-water mark VmHWM; glibc's free memory is returned first with
malloc_trim). It counts activations, attention workspace, K/V buffers and gradients' temporaries, not the
weights, gradient buffers or optimizer state (allocated before); allocator slack included. The table gives the
largest rank's figure. tok/s: sequence tokens per second of the slowest rank's median step (the wall time of
one step of the whole CP group). Ratios are against CP 1 of the same family and length in this run.
On a box with fewer cores than ranks (CP 4 on 2 cores) the ranks share cores: tok/s then shows overheads,
not the speed-up a rank per device would give; memory per rank is what CP is for.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VOCAB = 256
QUICK = dict(seq_lengths=[1024, 2048], cp=[1, 2], steps=1)


def model_config(family: str, cp_comm_type: str):
    import torch
    import torch.nn.functional as F

    from megatron_patch.testing.equivalence import tiny_deepseek_config

    if family == "mla":
        return tiny_deepseek_config(num_layers=2, moe_layer_freq=[0, 1], cp_comm_type=cp_comm_type)
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
        ffn_hidden_size=128, normalization="RMSNorm", layernorm_epsilon=1e-6, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, params_dtype=torch.float32, hidden_dropout=0.0,
        attention_dropout=0.0, use_cpu_initialization=True, cp_comm_type=cp_comm_type)


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> float:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    return _status_mib("VmRSS")


def run_case(family: str, seq: int, cp_comm_type: str, steps: int) -> dict:
    import torch

    from megatron_patch.data.batch import batch_from_tokens
    from megatron_patch.models.builder import ParallelLayout, apply_layout, build_gpt_chunks, initialize_parallel
    from megatron_patch.models.spec import local_block_spec
    from megatron_patch.training.setup_model import build_optimizer, wrap_ddp, zero_grads
    from megatron_patch.training.step import forward_backward

    layout = ParallelLayout(cp=torch.distributed.get_world_size())
    initialize_parallel(layout)
    config = apply_layout(model_config(family, cp_comm_type), layout)
    chunks = wrap_ddp(build_gpt_chunks(config, local_block_spec, VOCAB, seq, layout), config)
    optimizer = build_optimizer(chunks, lr=1e-4, optimizer="adam", clip_grad=1.0)
    batch = batch_from_tokens(torch.randint(0, VOCAB, (1, seq), generator=torch.Generator().manual_seed(0)))

    def step():
        zero_grads(chunks, optimizer)
        loss = forward_backward(chunks, batch, 1)
        optimizer.step()
        return loss

    step()  # warm-up, untimed
    before = _reset_peak()
    times, loss = [], None
    for _ in range(steps):
        torch.distributed.barrier()
        start = time.perf_counter()
        loss = step()
        torch.distributed.barrier()
        times.append(time.perf_counter() - start)
    peak = _status_mib("VmHWM") - before
    del chunks, optimizer
    return {"peak_mib": peak, "step_s": statistics.median(times), "loss": float(loss)}


def bench_ranks(rank: int, world: int, cases: list[dict], steps: int) -> list[dict]:
    return [dict(case, **run_case(case["family"], case["seq"], case["comm"], steps)) for case in cases]


def run_cp(cp: int, cases: list[dict], steps: int) -> list[dict]:
    """All cases on one spawn of `cp` ranks: per case the largest rank's memory and the slowest rank's time."""
    from megatron_patch.runtime.multirank import run_ranks

    per_rank = run_ranks(bench_ranks, cp, timeout=24 * 3600, args=(cases, steps), env={"TORCHDYNAMO_DISABLE": "1"})
    merged = []
    for i, case in enumerate(cases):
        ranks = [results[i] for results in per_rank]
        merged.append(dict(case, cp=cp, peak_mib=max(r["peak_mib"] for r in ranks),
                           peak_mib_ranks=[round(r["peak_mib"], 1) for r in ranks],
                           step_s=max(r["step_s"] for r in ranks), loss=ranks[0]["loss"]))
    return merged


def table(rows: list[dict]) -> str:
    base = {(r["family"], r["seq"]): r for r in rows if r["cp"] == 1}
    lines = [f"{'model':5} {'tokens':>7} {'CP':>3} {'comm':>10} {'peak MiB/rank':>14} {'x CP1':>6} "
             f"{'tok/s':>8} {'x CP1':>6} {'loss':>8}"]
    for r in rows:
        ref = base.get((r["family"], r["seq"]))
        tok_s = r["seq"] / r["step_s"]
        mem_ratio = f"{r['peak_mib'] / ref['peak_mib']:.2f}" if ref and ref["peak_mib"] > 0 else "-"
        tok_ratio = f"{tok_s / (ref['seq'] / ref['step_s']):.2f}" if ref else "-"
        lines.append(f"{r['family']:5} {r['seq']:>7} {r['cp']:>3} {r['comm'] if r['cp'] > 1 else '-':>10} "
                     f"{r['peak_mib']:>14.1f} {mem_ratio:>6} {tok_s:>8.0f} {tok_ratio:>6} {r['loss']:>8.4f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", nargs="+", choices=("mla", "gqa"), default=["mla", "gqa"])
    p.add_argument("--seq-lengths", nargs="+", type=int, default=[4096, 8192, 16384, 32768])
    p.add_argument("--cp", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--cp-comm-type", nargs="+", choices=("all_gather", "p2p"), default=["all_gather", "p2p"])
    p.add_argument("--steps", type=int, default=2, help="timed steps per case (after one untimed)")
    p.add_argument("--quick", action="store_true",
                   help=f"lengths {QUICK['seq_lengths']}, CP {QUICK['cp']}, {QUICK['steps']} step (under a minute)")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.seq_lengths, args.cp, args.steps = QUICK["seq_lengths"], QUICK["cp"], QUICK["steps"]
    for cp in args.cp:
        bad = [s for s in args.seq_lengths if s % (2 * cp)]
        if cp < 1 or bad:
            print(f"error: --cp {cp}: every --seq-lengths value must be divisible by 2 x CP (not {bad})",
                  file=sys.stderr)
            return 2
    if args.steps < 1:
        print("error: --steps must be >= 1", file=sys.stderr)
        return 2
    rows = []
    start = time.time()
    for cp in sorted(args.cp):
        comms = ["all_gather"] if cp == 1 else args.cp_comm_type  # CP 1 exchanges nothing
        cases = [dict(family=f, seq=s, comm=c) for s in sorted(args.seq_lengths) for f in args.family for c in comms]
        rows += run_cp(cp, cases, args.steps)
        print(f"[CP {cp} done, {time.time() - start:.0f} s]", file=sys.stderr)
    rows.sort(key=lambda r: (r["family"], r["seq"], r["cp"], r["comm"]))
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
