"""Command-line arguments of the trainer, with Megatron-LM's flag names (a subset; see `--help`).

Import-light (argparse only) so `megatron-patch --help` stays fast.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from megatron_patch.errors import UserError
from megatron_patch.models.impl import add_impl_argument, check_impl
from megatron_patch.models.moe_options import add_moe_arguments, moe_overrides


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("model and checkpoints")
    g.add_argument("--hf-config", metavar="DIR",
                   help="HF model directory whose config.json defines the model (default: --load-hf, or the "
                   "hf_config/ folder `convert hf2mcore` writes into --load)")
    g.add_argument("--load", metavar="DIR", help="Megatron checkpoint: a training checkpoint to resume, or "
                   "model weights (torch per-rank layout or torch_dist, e.g. from `convert hf2mcore`) to start from")
    g.add_argument("--load-hf", metavar="DIR", help="start from HF safetensors weights")
    g.add_argument("--save", metavar="DIR", help="checkpoint directory; a run resumes from it when it holds a "
                   "training checkpoint")
    g.add_argument("--save-interval", type=int, default=None, metavar="N")
    g.add_argument("--exit-interval", type=int, default=None, metavar="N",
                   help="save (with --save) and stop when the iteration is a multiple of N")
    g.add_argument("--no-load-optim", action="store_true", help="resume the model only (fresh optimizer)")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--finetune", action="store_true",
                   help="take only the model from --load; start at iteration 0 with a fresh optimizer")
    g.add_argument("--device", choices=("cpu", "cuda", "npu"), default=None,
                   help="default: detected (MP_DEVICE overrides)")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-virtual-stages-per-pipeline-rank", "--virtual-pipeline-model-parallel-size",
                   dest="virtual_pipeline_model_parallel_size", type=int, default=None)
    from megatron_patch.models.pipeline import add_split_args

    add_split_args(g)  # --decoder-first/last-pipeline-num-layers, --pipeline-model-parallel-layout, ...
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-tensor-parallel-size", type=int, default=None)
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--cp-comm-type", default="all_gather", metavar="p2p|all_gather",
                   help="context parallelism's K/V exchange: all_gather (each rank holds the whole K/V) or p2p "
                   "(a ring: two K/V blocks at a time); Megatron-LM's a2a is not implemented")
    g.add_argument("--distributed-timeout-minutes", type=float, default=None, metavar="M",
                   help="a collective that waits longer fails every rank (default 30, or MP_DIST_TIMEOUT_MINUTES)")
    g.add_argument("--heartbeat-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="a rank whose heartbeat stops this long (stopped or dead process, start-up included: the "
                   "heartbeat starts before the process group) ends the job with exit 3, naming the rank and step "
                   "(0: off)")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="on by default whenever TP > 1 (megatron's MoE with TP requires it)")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--recompute-granularity", choices=("full", "selective"), default=None)
    g.add_argument("--recompute-method", choices=("uniform", "block"), default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)

    g = p.add_argument_group("batch and schedule")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x data parallel")
    g.add_argument("--seq-length", type=int, required=False, default=None)
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=("constant", "linear", "cosine", "inverse-square-root"),
                   default="linear")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--lr-warmup-init", type=float, default=0.0)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true",
                   help="fp16 weights and activations, fp32 master weights in the optimizer, loss scaling")
    g.add_argument("--loss-scale", type=float, default=None,
                   help="fp16: a fixed loss scale (default: dynamic loss scaling)")
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32,
                   help="fp16 dynamic loss scaling: the starting scale (halved on every overflow)")
    g.add_argument("--min-loss-scale", type=float, default=1.0,
                   help="fp16 dynamic loss scaling: the scale never drops below this")
    g.add_argument("--loss-scale-window", type=float, default=1000,
                   help="fp16 dynamic loss scaling: steps without overflow before the scale doubles")
    g.add_argument("--hysteresis", type=int, default=2,
                   help="fp16 dynamic loss scaling: overflows tolerated before the scale is halved")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--hidden-dropout", type=float, default=None,
                   help="residual dropout (default: the family's, 0 for DeepSeek and Qwen as in HF)")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=None,
                   help="default: from the HF config (DeepSeek aux_loss_alpha)")
    g.add_argument("--dsa-indexer-loss-coeff", type=float, default=None,
                   help="DeepSeek-V3.2 (DSA): weight of the indexer's KL loss (megatron's; default 0: the indexer "
                        "does not learn)")
    g.add_argument("--dsa-warmup-iters", type=int, default=0,
                   help="DSA: the first N steps are a dense warm-up training only the indexer (KL to the dense "
                        "attention); then sparse training of everything, the indexer on the selected keys")

    add_moe_arguments(p)
    add_impl_argument(p)

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", metavar="PREFIX",
                   help="Megatron indexed dataset prefix (PREFIX.bin/.idx), or WEIGHT PREFIX pairs")
    g.add_argument("--valid-data-path", nargs="+", metavar="PREFIX", default=None)
    g.add_argument("--split", default=None, help="train,valid,test weights of --data-path (default 100,0,0)")
    g.add_argument("--data-cache-path", default=None, metavar="DIR",
                   help="where GPTDataset caches its sample indices (default: next to the data)")
    g.add_argument("--eval-interval", type=int, default=None, metavar="N")
    g.add_argument("--eval-iters", type=int, default=0, metavar="N")


    g = p.add_argument_group("supervised fine-tuning (data from `preprocess --sft`)")
    g.add_argument("--sft", action="store_true",
                   help="one sample per sequence, loss = mean over the answer tokens (the stored loss mask)")
    g.add_argument("--pack", action="store_true",
                   help="--sft: several samples per sequence (attention within each sample, positions restarting; "
                   "samples of one difficulty level per sequence)")
    g.add_argument("--curriculum", action="store_true",
                   help="--sft: draw batches by 'difficulty' stages (see --curriculum-stages)")
    g.add_argument("--use_curriculum", "--use-curriculum", dest="use_curriculum", type=_bool, default=False,
                   metavar="True|False", help="seed 002's spelling of --curriculum")
    g.add_argument("--curriculum-seed", "--curriculum_seed", dest="curriculum_seed", type=int, default=None,
                   help="seed of the curriculum draws (default: --seed)")
    g.add_argument("--curriculum-stages", default=None, metavar="SPEC",
                   help="START-END:EXPLAIN/REASONING/TOPOLOGY in percent, comma-separated (default "
                   "0-30:80/20/0,30-70:40/40/20,70-100:25/35/40)")
    g.add_argument("--curriculum-report", default=None, metavar="PATH",
                   help="write the per-stage level counts actually drawn as JSON")

    g = p.add_argument_group("LoRA (adapters on the HF-named linears; base weights frozen)")
    g.add_argument("--lora-rank", type=int, default=None, metavar="R")
    g.add_argument("--lora-alpha", type=float, default=None, metavar="A", help="scaling alpha/R (default: R)")
    g.add_argument("--lora-dropout", type=float, default=0.0, metavar="P")
    g.add_argument("--lora-target", default=None, metavar="NAMES",
                   help="comma-separated HF module names, e.g. q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")

    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--metrics-file", default=None, metavar="PATH",
                   help="also write each step's metrics as a JSON line (exact float values)")
    g.add_argument("--exit-on-nan", dest="exit_on_nan", action="store_true", default=True,
                   help="stop with exit status 3 when the loss or grad norm is NaN/Inf (default)")
    g.add_argument("--no-exit-on-nan", dest="exit_on_nan", action="store_false",
                   help="report NaN/Inf, skip that update and go on")
    return p


def _bool(text: str) -> bool:
    """True/False as the seeds write them (--use_curriculum True)."""
    low = str(text).strip().lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def parse_data_blend(values: list[str] | None, flag: str) -> tuple[list[str], list[float] | None] | None:
    """Megatron's --data-path: one prefix, several prefixes, or WEIGHT PREFIX pairs."""
    if not values:
        return None
    try:
        weights = [float(v) for v in values[0::2]]
    except ValueError:
        return list(values), None
    if len(values) % 2:
        raise UserError(f"{flag}: weighted blends are WEIGHT PREFIX pairs, got an odd number of values")
    return list(values[1::2]), weights


def validate(args) -> None:
    """Refuse unsupported or inconsistent settings with a message naming the flag."""
    moe_overrides(args)  # raises on inconsistent MoE engine flags
    check_impl(args.transformer_impl)  # an explicit transformer_engine needs TE importable
    if args.fp16 and args.bf16:
        raise UserError("--fp16 and --bf16 exclude each other; pick one")
    if args.loss_scale is not None and not args.fp16:
        raise UserError("--loss-scale needs --fp16 (bf16 and fp32 train without loss scaling)")
    if (args.loss_scale is not None and args.loss_scale <= 0) or args.min_loss_scale <= 0 or args.initial_loss_scale <= 0:
        raise UserError("--loss-scale, --initial-loss-scale and --min-loss-scale must be > 0")
    if args.initial_loss_scale < args.min_loss_scale:
        raise UserError(f"--initial-loss-scale {args.initial_loss_scale:g} is below --min-loss-scale "
                        f"{args.min_loss_scale:g}")
    if args.use_curriculum:
        args.curriculum = True
    validate_sft(args)
    if (args.lora_target or args.lora_alpha is not None) and not args.lora_rank:
        raise UserError("--lora-target/--lora-alpha need --lora-rank R")
    if args.lora_target and "experts" in [n.strip() for n in args.lora_target.split(",")] and args.lora_dropout:
        raise UserError(f"--lora-dropout {args.lora_dropout:g} with --lora-target experts: peft adapts the fused "
                        "experts without dropout (its ParamWrapper refuses it); use --lora-dropout 0")
    if args.lora_rank and not args.lora_target:
        raise UserError("--lora-rank needs --lora-target NAMES (e.g. q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)")
    if args.load and args.load_hf:
        raise UserError("give either --load (Megatron checkpoint) or --load-hf (HF weights), not both")
    if args.train_iters is None or args.train_iters < 1:
        raise UserError("--train-iters N (>= 1) is required")
    if args.seq_length is None or args.seq_length < 2:
        raise UserError("--seq-length N (>= 2) is required")
    if not args.data_path:
        raise UserError("--data-path PREFIX is required (make one with `megatron-patch preprocess`)")
    for flag in ("micro_batch_size", "tensor_model_parallel_size", "pipeline_model_parallel_size",
                 "expert_model_parallel_size", "context_parallel_size", "log_interval"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1")
    for flag in ("distributed_timeout_minutes", "heartbeat_timeout"):
        value = getattr(args, flag)
        if value is not None and value < 0 or flag == "distributed_timeout_minutes" and value == 0:
            raise UserError(f"--{flag.replace('_', '-')} must be > 0")
    cp = args.context_parallel_size
    from megatron_patch.runtime.context_parallel import CP_COMM_TYPES

    if args.cp_comm_type not in CP_COMM_TYPES:
        raise UserError(f"--cp-comm-type {args.cp_comm_type} is not supported by the portable attention (a2a needs "
                        f"Transformer Engine's); use p2p or all_gather")
    if cp > 1 and args.seq_length % (2 * cp):
        raise UserError(f"--seq-length {args.seq_length} must be divisible by 2 x --context-parallel-size = {2 * cp} "
                        "(each CP rank holds two of 2 x CP chunks)")
    for flag in ("save_interval", "exit_interval", "eval_interval"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.lr_warmup_iters >= (args.lr_decay_iters or args.train_iters):
        raise UserError(f"--lr-warmup-iters {args.lr_warmup_iters} must be smaller than the decay iterations "
                        f"({args.lr_decay_iters or args.train_iters})")
    if args.min_lr > args.lr:
        raise UserError(f"--min-lr {args.min_lr} is larger than --lr {args.lr}")
    if args.recompute_granularity == "full" and not args.recompute_method:
        raise UserError("--recompute-granularity full needs --recompute-method uniform|block")
    if args.dsa_warmup_iters < 0 or args.dsa_warmup_iters and not (args.dsa_indexer_loss_coeff or 0) > 0:
        raise UserError("--dsa-warmup-iters N trains the indexer by its loss: give --dsa-indexer-loss-coeff > 0 "
                        "(and N >= 0)")
    if args.save_interval and not args.save:
        raise UserError("--save-interval needs --save DIR")
    from megatron_patch.data.gpt import check_prefix

    inputs = [("--load-hf", args.load_hf)] + ([("--load", args.load)] if args.load and args.save and
                                               Path(args.load).resolve() != Path(args.save).resolve() else [])
    for flag in ("--data-path", "--valid-data-path"):
        blend = parse_data_blend(getattr(args, flag[2:].replace("-", "_")), flag)
        for prefix in blend[0] if blend else ():
            check_prefix(prefix, flag)  # fail before the model is built
            inputs += [(flag, prefix + ".bin"), (flag, prefix + ".idx")]
    _check_save(args.save, inputs)
    if args.valid_data_path and args.split:
        raise UserError("--split applies to --data-path only; do not combine it with --valid-data-path")


def validate_sft(args) -> None:
    from megatron_patch.data.sft import is_sft_prefix

    uses = [f for f in ("curriculum_stages", "curriculum_report") if getattr(args, f) is not None]
    if args.curriculum and not args.sft:
        raise UserError("--curriculum (--use_curriculum True) needs --sft and data from `preprocess --sft`")
    if uses and not args.curriculum:
        raise UserError(f"--{uses[0].replace('_', '-')} needs --curriculum")
    if args.curriculum_stages is not None:
        from megatron_patch.data.curriculum import parse_stages

        parse_stages(args.curriculum_stages)
    sft_data = [p for p in args.data_path or () if is_sft_prefix(p)]
    if args.sft:
        if not args.data_path or len(args.data_path) != 1 or not sft_data:
            raise UserError("--sft trains on one prefix written by `megatron-patch preprocess --sft` "
                            "(PREFIX.sft.json next to PREFIX.bin/.idx)")
        if args.split:
            raise UserError("--sft: --split is not supported; give the validation set as --valid-data-path PREFIX "
                            "(also from `preprocess --sft`)")
        bad = [p for p in args.valid_data_path or () if not is_sft_prefix(p)]
        if bad or (args.valid_data_path and len(args.valid_data_path) != 1):
            raise UserError(f"--sft: --valid-data-path takes one prefix written by `megatron-patch preprocess --sft` "
                            f"(no {(bad or args.valid_data_path)[0]}.sft.json)" if bad else
                            "--sft: --valid-data-path takes one prefix written by `megatron-patch preprocess --sft`")
        if args.pack and args.context_parallel_size > 1:
            raise UserError("--pack with --context-parallel-size > 1 is not supported (the portable attention "
                            "splits whole sequences over CP); use CP=1 or train unpacked")
    elif args.pack:
        raise UserError("--pack needs --sft (data from `megatron-patch preprocess --sft`)")
    elif sft_data:
        raise UserError(f"--data-path {sft_data[0]} is SFT data (it has {sft_data[0]}.sft.json): add --sft")


def _check_save(save, inputs) -> None:
    """--save may not be, contain or lie inside an input (--save == --load is Megatron-LM's resume convention:
    saves add iter_* directories and move the tracker, they never rewrite what --load holds)."""
    from megatron_patch.checkpoint.atomic import overlap

    for flag, path in inputs:
        if save and path and overlap(Path(save), Path(path)):
            raise UserError(f"--save {save} {overlap(Path(save), Path(path))} the input {flag} {path}: saving there "
                            "could destroy it; choose a separate --save directory")


def build_parser(prog: str = "megatron-patch train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Pretrain a DeepSeek-V2/V3 or Qwen model on megatron-core "
                                "(run under torchrun; CPU/gloo, CUDA/nccl or NPU/hccl).")
    return add_arguments(p)
