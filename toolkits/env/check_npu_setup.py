#!/usr/bin/env python
"""Seed 003's environment check before a multi-card launch, as its guide types it:

    export WORLD_SIZE=4 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500
    python toolkits/env/check_npu_setup.py [--device npu|cuda|cpu]

`megatron-patch env-check` (megatron_patch/runtime/env_check.py) plus a verdict: the device type asked
for (default npu) is there with its backend, WORLD_SIZE fits the devices, the master port is free.
Exit status: 0 ready, 1 a problem (each named on its own line).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("npu", "cuda", "cpu"), default="npu", help="the device type to expect")
    args = p.parse_args(argv)
    import warnings

    warnings.simplefilter("ignore")
    from megatron_patch.runtime.env_check import collect, format_table, launch_problems

    info = collect()
    print(format_table(info))
    names = {"npu": "Ascend NPU", "cuda": "CUDA GPU", "cpu": "CPU"}
    print(f"Using {names[info['device']]}, device count: {info['device_count']}")
    print(f"Distributed world size: {info['launcher'].get('WORLD_SIZE') or '1 (WORLD_SIZE not set)'}")
    problems = launch_problems(info, args.device)
    for problem in problems:
        print(f"problem: {problem}")
    print("ready to launch" if not problems else f"{len(problems)} problem(s): fix them before launching")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
