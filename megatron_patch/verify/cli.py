"""`megatron-patch compare`: activations of a Megatron model at any TP/PP/EP/ETP/VPP layout against HF.

    megatron-patch compare --hf-path DIR [--mcore-path DIR] --tp N --pp N --ep N --etp N [--vpp N] [--cp N]
        [--decoder-first-pipeline-num-layers N] [--decoder-last-pipeline-num-layers N]
        [--pipeline-model-parallel-layout STR] [--account-for-embedding/loss-in-pipeline-split]
        [--batch-size B] [--seq-length S] [--dtype fp32|bf16|fp16] [--json FILE] [--plot FILE] [--debug]
        [--moe-grouped-gemm] [--moe-expert-capacity-factor F [--moe-pad-expert-input-to-capacity]
         [--moe-token-drop-policy probs|position]] [--transformer-impl auto|transformer_engine|local]

Without --mcore-path the HF weights are converted in memory through the family table. The model is built
with megatron-core's Transformer Engine spec on CUDA when TE imports (auto), else the local one (models/impl.py). The ranks are
spawned here (gloo on CPU; the fewest the layout needs), or the existing ones are used inside torchrun.
Exit status: 0 PASS, 1 FAIL, 2 bad input, 3 the run itself failed (a rank crashed or hung).
"""
from __future__ import annotations

import sys

from megatron_patch.models.builder import add_layout_args, layout_from_args


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compare", help="compare Megatron activations with the HF model, hook point by hook point",
        description=__doc__.split("\n\n")[0] + " Prints one row per hook point and an overall PASS/FAIL.")
    p.add_argument("--hf-path", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--mcore-path", default=None,
                   help="Megatron checkpoint (torch per-rank layout or torch_dist) to compare instead of the "
                        "in-memory conversion; a torch-format one must have been saved at this layout")
    p.add_argument("--peft-path", default=None, help="a peft LoRA adapter (convert lora2peft): compare the LoRA "
                   "model of --mcore-path (a `train --lora-rank` checkpoint) with peft's on --hf-path")
    add_layout_args(p)  # with Megatron-LM's uneven pipeline flags
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=32)
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--atol", type=float, default=None,
                   help="tolerance (x max(1, max|HF|)) instead of the dtype's default (fp32 1e-5 on the max "
                        "diff, bf16 3e-2 and fp16 4e-3 on the mean diff)")
    p.add_argument("--router-mismatch", type=float, default=None,
                   help="fraction of tokens allowed a different expert choice (default fp32 0, bf16/fp16 0.1)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the random input tokens")
    p.add_argument("--json", default=None, metavar="FILE", help="write the full report as JSON")
    p.add_argument("--plot", default=None, metavar="FILE", help="write a PNG of the max diff per layer")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before a hung rank fails the run")
    p.add_argument("--heartbeat-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="a rank stopped or dead this long (start-up included) ends the run with exit 3 (0: off)")
    p.add_argument("--distributed-timeout-minutes", type=float, default=None, metavar="M",
                   help="Megatron-LM's name for the same limit, in minutes (overrides --timeout)")
    p.add_argument("--debug", action="store_true",
                   help="extra columns (max|HF|, bound), timings, warnings and full rank tracebacks")
    from megatron_patch.models.moe_options import add_moe_arguments

    add_moe_arguments(p)
    from megatron_patch.models.impl import add_impl_argument

    add_impl_argument(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import warnings

    with warnings.catch_warnings():
        if not args.debug:  # megatron's import-time notes (no Apex / TE, deprecations) hide the table
            warnings.simplefilter("ignore")
        return _run(args)


def _run(args) -> int:
    from megatron_patch.models.moe_options import moe_overrides
    from megatron_patch.runtime.multirank import RankFailure
    from megatron_patch.verify.compare import CompareSpec
    from megatron_patch.verify.compare import run as run_compare
    from megatron_patch.verify.report import format_report, write_json, write_plot

    from megatron_patch.models.impl import check_impl

    check_impl(args.transformer_impl)  # before any rank starts
    if args.plot:
        from megatron_patch.verify.report import require_matplotlib

        require_matplotlib()  # before minutes of work, not after
    layout = layout_from_args(args)
    spec = CompareSpec(hf_path=args.hf_path, layout=layout, mcore_path=args.mcore_path, peft_path=args.peft_path,
                       batch_size=args.batch_size, seq_length=args.seq_length, dtype=args.dtype,
                       seed=args.seed, atol=args.atol, router_mismatch=args.router_mismatch,
                       debug=args.debug, timeout=(args.distributed_timeout_minutes * 60
                                                  if args.distributed_timeout_minutes else args.timeout),
                       moe=moe_overrides(args), transformer_impl=args.transformer_impl,
                       heartbeat_timeout=args.heartbeat_timeout)
    try:
        report = run_compare(spec)
    except RankFailure as err:
        text = str(err)
        if err.one_line and not args.debug:  # a killed or stopped rank: which one, not the peers' tracebacks
            text = text.splitlines()[0]
        elif not args.debug:
            text = "\n".join(text.splitlines()[-25:])
        print(f"error: the comparison could not run: {text}", file=sys.stderr)
        return 3
    if report.get("rows") is None:  # a non-zero torchrun rank: rank 0 prints and writes
        return 0 if report["result"] == "PASS" else 1
    written = []
    if args.json:
        write_json(report, args.json)
        written.append(args.json)
    if args.plot:
        write_plot(report, args.plot)
        written.append(args.plot)
    print(format_report(report, debug=args.debug, written=written), flush=True)
    return 0 if report["result"] == "PASS" else 1
