"""Paired A/B of code settings on train_bench's models, in one process, alternating the settings every step.

    .venv/bin/python benchmarks/paired_ab.py SETTINGS.py [--model moe|dense] [--pairs 40] [--threads 1]

SETTINGS.py defines SETTINGS = {name: switch, ...}: each switch() puts the code into that setting (for example by
swapping a function or a module constant); the last name is the baseline. One Trainer (as train_bench's megatron
run: same model, batch and arguments) runs warm-up steps in every setting, then --pairs rounds of one step per
setting, the order reversed every other round. Printed per setting: the median CPU seconds per step and the
speedup over the baseline as the mean (+- standard error) and median of the per-round ratios.

Why: on a shared machine load drifts over minutes, so separate runs (and train_bench's repeats) of the same code
differ by 20-35 %; consecutive steps share the load, and the per-round ratio resolves ~2-3 % effects in 40 rounds.
"""
from __future__ import annotations

import argparse
import os
import runpy
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_bench  # noqa: E402  (next to this file: its models, data and megatron arguments)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("settings", help="a Python file defining SETTINGS = {name: switch_function}")
    p.add_argument("--model", choices=list(train_bench.MODELS), default="moe")
    p.add_argument("--pairs", type=int, default=40, help="rounds of one step per setting")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per setting first")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if not Path(args.settings).is_file():
        return fail(f"{args.settings}: no such settings file; give a .py file defining SETTINGS (see "
                    "benchmarks/ab_settings/)")
    settings = runpy.run_path(args.settings).get("SETTINGS")
    if not isinstance(settings, dict) or len(settings) < 2 or not all(map(callable, settings.values())):
        return fail(f"{args.settings}: SETTINGS must map two or more names to switch functions")

    import torch

    from megatron_patch.runtime.console import quiet_known_warnings
    from megatron_patch.training.arguments import build_parser, validate
    from megatron_patch.training.trainer import Trainer

    quiet_known_warnings()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    bench = argparse.Namespace(hidden=None, layers=None, experts=None, micro_batch_size=2, global_batch_size=8,
                               seq_length=256, device=None, bf16=False)
    with tempfile.TemporaryDirectory(prefix="paired-ab-") as tmp:
        work = Path(tmp)
        prepared = train_bench.prepare(work, bench)
        extra = ("--moe-grouped-gemm",) if args.model == "moe" else ()
        iters = (args.warmup + args.pairs) * len(settings) + 1
        trainer_args = build_parser("paired_ab").parse_args(
            train_bench.megatron_args(Path(prepared[args.model]), prepared["data"], bench, work, extra, iters))
        validate(trainer_args)
        trainer = Trainer(trainer_args)
        try:
            seconds = run(trainer, settings, args.warmup, args.pairs)
        finally:
            trainer.close()
    report(seconds)
    return 0


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def run(trainer, settings: dict, warmup: int, pairs: int) -> dict:
    def step() -> float:
        batch = trainer.batches.next()  # built outside the timed region, as in train()
        start = time.process_time()
        trainer.train_step(batch)
        return time.process_time() - start

    names = list(settings)
    for name in names:
        settings[name]()
        for _ in range(warmup):
            step()
    seconds = {name: [] for name in names}
    for round_ in range(pairs):
        for name in names if round_ % 2 == 0 else names[::-1]:
            settings[name]()
            seconds[name].append(step())
    return seconds


def report(seconds: dict) -> None:
    names = list(seconds)
    base = seconds[names[-1]]
    for name in names:
        ratios = [b / s for s, b in zip(seconds[name], base)]
        error = statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else 0.0
        print(f"{name}: median {statistics.median(seconds[name]):.3f} CPU s/step; speedup over {names[-1]}: mean "
              f"{statistics.mean(ratios):.3f} +- {error:.3f}, median {statistics.median(ratios):.3f} "
              f"({len(ratios)} rounds)")


if __name__ == "__main__":
    sys.exit(main())
