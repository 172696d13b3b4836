#!/usr/bin/env python
"""Seed 001's MLA/MoE correctness check, as its guide types it:

    python examples/deepseek_v3/test_mla_moe_correctness.py --hf-model-path DIR --test-tp 2 --test-pp 1 \
        --test-batch-size 2 --test-seq-length 512 --debug

A thin front end of `megatron-patch compare` (megatron_patch/verify/compare.py): the HF model is put into
Megatron-Core at the layout (in memory, or from --mcore-path), both run the same tokens, and every hook
point is compared. Prints the guide's sections (MLA / MOE / Final Output) and `Overall Result`.
Exit status: 0 PASS, 1 FAIL, 2 bad input, 3 a rank crashed or hung.
"""
import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # megatron's jit_fuser = torch.compile: slow on CPU, same numbers


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-model-path", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--mcore-path", default=None, help="Megatron checkpoint to check instead of converting in memory")
    p.add_argument("--test-tp", type=int, default=1, help="tensor parallel size")
    p.add_argument("--test-pp", type=int, default=1, help="pipeline parallel size")
    p.add_argument("--test-ep", type=int, default=1, help="expert parallel size")
    p.add_argument("--test-etp", type=int, default=None, help="expert tensor parallel size (default: TP)")
    p.add_argument("--test-batch-size", type=int, default=2)
    p.add_argument("--test-seq-length", type=int, default=128)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--debug", action="store_true", help="also the full table, norms and timings")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.debug:
        warnings.simplefilter("ignore")
        os.environ.setdefault("PYTHONWARNINGS", "ignore")
    from megatron_patch.errors import UserError
    from megatron_patch.models.builder import ParallelLayout
    from megatron_patch.runtime.multirank import RankFailure
    from megatron_patch.verify.compare import CompareSpec, run
    from megatron_patch.verify.report import format_report, format_seed_sections

    layout = ParallelLayout(tp=args.test_tp, pp=args.test_pp, ep=args.test_ep, etp=args.test_etp)
    spec = CompareSpec(hf_path=args.hf_model_path, layout=layout, mcore_path=args.mcore_path,
                       batch_size=args.test_batch_size, seq_length=args.test_seq_length, dtype=args.dtype,
                       seed=args.seed, debug=args.debug)
    print(f"Testing {args.hf_model_path} at TP={layout.tp}, PP={layout.pp}, EP={layout.ep}, "
          f"batch {args.test_batch_size} x seq {args.test_seq_length}, {args.dtype}", flush=True)
    print("Loading the HuggingFace model and building the Megatron model; registering hooks on both; "
          "running the forward passes...", flush=True)
    try:
        report = run(spec)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RankFailure as err:
        print(f"error: the comparison could not run: {err}", file=sys.stderr)
        return 3
    if report.get("rows") is None:  # a non-zero rank under torchrun: rank 0 prints
        return 0 if report["result"] == "PASS" else 1
    if args.debug:
        print(format_report(report, debug=True))
    print(format_seed_sections(report, debug=args.debug), flush=True)
    return 0 if report["result"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
