"""`megatron-patch convert ...`: checkpoint conversion between HF and Megatron, at any layout.

    convert hf2mcore --hf-path DIR --out DIR [--tp N --pp N --ep N --etp N --vpp N] [SPLIT]
                     [--format torch|torch_dist] [--dtype fp32|bf16|fp16] [--force] [--verify] [--dry-run]
                     [--transformer-impl transformer_engine|local] [--moe-grouped-gemm]
    convert mcore2hf --mcore-path DIR --out DIR [--hf-config DIR] [--dtype ...] [--force]
    convert reshard  --mcore-path DIR --out DIR --tp N --pp N --ep N --etp N [--vpp N] [SPLIT] [--format ...]
                     [--transformer-impl ...] [--moe-grouped-gemm]
    convert fp8-to-bf16 --in DIR --out DIR [--force]

SPLIT: Megatron-LM's uneven pipeline flags, same names and meaning: --decoder-first-pipeline-num-layers N,
--decoder-last-pipeline-num-layers N, --pipeline-model-parallel-layout STR,
--account-for-embedding-in-pipeline-split, --account-for-loss-in-pipeline-split.
Outputs are written atomically (nothing is left behind on error; an existing output needs --force).
Bad input is one line on stderr and exit code 2; a --verify mismatch exits 1.
"""
from __future__ import annotations

import sys

from megatron_patch.models.builder import add_layout_args, layout_from_args

DTYPE_CHOICES = ("fp32", "bf16", "fp16")


def _show() -> bool:
    return sys.stderr.isatty()


def run_hf2mcore(args) -> int:
    from .hf2mcore import VerificationFailed, hf2mcore, plan_lines

    if args.dry_run:
        print("\n".join(plan_lines(args.hf_path, layout_from_args(args))))
        return 0

    try:
        result = hf2mcore(args.hf_path, args.out, layout_from_args(args), fmt=args.format, dtype=args.dtype,
                          force=args.force, verify=args.verify, model_size=args.model_size, show_progress=_show(),
                          transformer_impl=args.transformer_impl, moe_grouped_gemm=args.moe_grouped_gemm)
    except VerificationFailed as err:
        print(f"error: {err} (nothing written)", file=sys.stderr)
        return 1
    if result.get("size_note"):
        print(result["size_note"])
    print(f"hf2mcore: wrote {result['out']} ({result['format']}, {result['layout']}, {result['dtype']}, "
          f"{result['naming']} names): "
          f"{result['line']}")
    if "verify" in result:
        print(result["verify"])
    return 0


def run_mcore2hf(args) -> int:
    from .mcore2hf import mcore2hf

    result = mcore2hf(args.mcore_path, args.out, hf_config_dir=args.hf_config, dtype=args.dtype, force=args.force,
                      max_shard_bytes=int(args.max_shard_size * 1024**3), show_progress=_show())
    print(f"mcore2hf: wrote {result['out']} (from {result['format']}): {result['line']}")
    return 0


def run_reshard(args) -> int:
    from .reshard import reshard

    result = reshard(args.mcore_path, args.out, layout_from_args(args), fmt=args.format, force=args.force,
                     hf_config_dir=args.hf_config, show_progress=_show(), transformer_impl=args.transformer_impl,
                     moe_grouped_gemm=args.moe_grouped_gemm)
    print(f"reshard: wrote {result['out']} ({result['format']}, {result['layout']}, {result['dtype']}, "
          f"{result['naming']} names): "
          f"{result['line']}")
    return 0


def run_fp8(args) -> int:
    from .fp8 import fp8_to_bf16

    result = fp8_to_bf16(args.in_dir, args.out, force=args.force, show_progress=_show())
    print(f"fp8-to-bf16: wrote {result['out_dir']} ({result['shards']} shard(s)): {result['line']}")
    return 0


def _dtype(p, help_text):
    # No argparse `choices`: an unknown dtype is a UserError (one line, exit 2) like every other bad input.
    p.add_argument("--dtype", default=None, metavar="{fp32,bf16,fp16}", help=help_text)


def _spec_args(p) -> None:
    # No argparse `choices`: an unknown value is a UserError (one line, exit 2) like every other bad input.
    p.add_argument("--transformer-impl", default="transformer_engine", metavar="{transformer_engine,local}",
                   help="the megatron-core spec of the run that loads the output, as Megatron-LM's flag (default "
                        "transformer_engine, Megatron-LM's default): decides the parameter names written")
    p.add_argument("--moe-grouped-gemm", action="store_true",
                   help="write routed experts as TEGroupedMLP holds them (Megatron-LM's --moe-grouped-gemm)")


def register(subparsers) -> None:
    conv = subparsers.add_parser("convert", help="checkpoint conversion HF <-> Megatron (any layout)",
                                 description=__doc__.split("\n\n")[0])
    sub = conv.add_subparsers(dest="convert_command", metavar="CONVERSION", required=True)

    p = sub.add_parser("hf2mcore", help="HF safetensors -> Megatron checkpoint")
    p.add_argument("--hf-path", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="output checkpoint root (written atomically)")
    add_layout_args(p, cp=False)
    p.add_argument("--format", default="torch", help="torch (Megatron-LM per-rank files, default) or torch_dist")
    _dtype(p, "parameter dtype of the output (default: the checkpoint's)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--verify", action="store_true",
                   help="convert the output back in memory and compare every tensor bit for bit with the input")
    p.add_argument("--model-size", default=None, help="declared model size (e.g. 16B), checked against the weights")
    _spec_args(p)
    p.add_argument("--dry-run", action="store_true",
                   help="write nothing: list each pipeline rank's layers (config.json is enough)")
    p.set_defaults(func=run_hf2mcore)

    p = sub.add_parser("mcore2hf", help="Megatron checkpoint (torch or torch_dist) -> HF safetensors")
    p.add_argument("--mcore-path", required=True, help="Megatron checkpoint root")
    p.add_argument("--hf-config", default=None,
                   help="HF model directory: tokenizer files, and config.json when the checkpoint has none")
    p.add_argument("--out", required=True, help="output HF directory (written atomically)")
    _dtype(p, "dtype of the HF tensors (default: the checkpoint's)")
    p.add_argument("--max-shard-size", type=float, default=1.0,
                   help="GiB per safetensors shard (default 1; the writer buffers one shard in memory)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.set_defaults(func=run_mcore2hf)

    p = sub.add_parser("reshard", help="Megatron checkpoint -> the same at another layout")
    p.add_argument("--mcore-path", required=True, help="Megatron checkpoint root")
    p.add_argument("--out", required=True, help="output checkpoint root (written atomically)")
    add_layout_args(p, cp=False)  # omitted sizes are 1, as in hf2mcore
    p.add_argument("--format", default=None, help="torch or torch_dist (default: the input's)")
    p.add_argument("--hf-config", default=None, help="HF model directory, when the checkpoint has no hf_config/")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    _spec_args(p)
    p.set_defaults(func=run_reshard)

    p = sub.add_parser("fp8-to-bf16", help="DeepSeek-V3 block-scaled FP8 HF checkpoint -> BF16")
    p.add_argument("--in", dest="in_dir", required=True, help="FP8 HF model directory")
    p.add_argument("--out", required=True, help="output HF directory (written atomically)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.set_defaults(func=run_fp8)

    from megatron_patch.convert import lora2peft

    lora2peft.register(sub)
