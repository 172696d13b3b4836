"""Runtime self-check: a tiny DeepSeek-style MLA + MoE model trained one step at TP1 and at a parallel
layout on local gloo ranks; prints loss / grad / post-step differences. Exit 0 when they match.

    python -m megatron_patch.testing.selfcheck [--tp 2 --pp 1 --ep 2 --etp 1]
"""
from __future__ import annotations

import argparse
import sys
import tempfile

from megatron_patch.models.builder import ParallelLayout
from megatron_patch.testing.equivalence import layout_run, reference_run
from megatron_patch.runtime.multirank import run_ranks

TOLERANCE = 1e-6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("tp", 2), ("pp", 1), ("ep", 2), ("etp", 1), ("vpp", 0)):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args(argv)
    layout = ParallelLayout(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, vpp=args.vpp or None)
    world = max(args.tp * args.pp, args.etp * args.ep * args.pp)
    with tempfile.TemporaryDirectory() as ref_dir:
        (ref,) = run_ranks(reference_run, 1, timeout=300, args=(ref_dir,))
        results = run_ranks(layout_run, world, timeout=300, args=(layout, ref_dir, False))
    print(f"{'rank':<6}{'layout':<22}{'loss':>12}{'ref loss':>12}{'max grad diff':>16}{'max step diff':>16}  result")
    ok = True
    for rank, res in enumerate(results):
        grad = max(diff for diff, _ in res["grad_diff"].values())
        step = max(diff for diff, _ in res["step_diff"].values())
        passed = abs(res["loss"] - ref["loss"]) <= TOLERANCE and grad <= TOLERANCE and step <= TOLERANCE
        ok &= passed
        print(f"{rank:<6}{layout.describe():<22}{res['loss']:>12.6f}{ref['loss']:>12.6f}{grad:>16.2e}{step:>16.2e}  "
              f"{'PASS' if passed else 'FAIL'}")
    print("Overall:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
