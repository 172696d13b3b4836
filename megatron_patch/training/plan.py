"""`megatron-patch plan`: per-device memory of a training layout, before launching it, and the layouts that fit.

    megatron-patch plan --hf-config DIR --tp 8 --pp 2 [--ep --etp --cp] --micro-batch-size 1 --seq-length 4096
        [--lora-rank 16 [--lora-target NAMES]] [--use-distributed-optimizer] [--bf16] [--recompute none|selective|full]
        [--num-gpus 16 | --dp N] [--device-memory 64] [--gpus-per-node 8] [--global-batch-size N]

Parameters per rank come from the real megatron-core model built on the meta device (training/plan_params.py);
gradients, optimizer state and activations from training/plan_memory.py. With --device-memory, every layout
valid for the model and the device count (TP dividing the heads and FFN within a node, PP dividing the layers,
EP dividing the experts, CP dividing the sequence) is priced, and those that fit are listed best first: least
recompute, then fewest model-parallel ranks (most data parallelism), then least memory.
"""
from __future__ import annotations

import dataclasses
import math

from megatron_patch.errors import UserError
from megatron_patch.models.builder import add_layout_args, layout_from_args
from megatron_patch.training.plan_memory import GiB, RECOMPUTE, StageMemory, Workload

SEED_002_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclasses.dataclass
class Model:
    """The HF config, its megatron config and what the plan needs of both."""
    hf_config: object
    config: object
    moe: set
    padded_vocab: dict
    lora_rank: int | None = None
    lora_target: str | None = None
    adapters: tuple = ()     # (megatron linear, row parallel, adapter width) per LoRA target

    @classmethod
    def load(cls, hf_dir: str, lora_rank: int | None, lora_target: str | None) -> "Model":
        from megatron_patch.checkpoint.hf_config import load_hf_config
        from megatron_patch.models.families import family_for_config, moe_layers

        hf_config = load_hf_config(hf_dir)
        family = family_for_config(hf_config)
        config = family.to_mcore_config(hf_config)
        if lora_rank is not None:
            if lora_rank < 1:
                raise UserError(f"--lora-rank {lora_rank}: must be >= 1")
            lora_target = lora_target or default_targets(family, hf_config)
        model = cls(hf_config, config, set(moe_layers(hf_config)), {}, lora_rank, lora_target)
        if lora_rank:
            from megatron_patch.models.families.base import Row
            from megatron_patch.models.lora import lora_targets

            names = [n.strip() for n in lora_target.split(",") if n.strip()]
            model.adapters = tuple((t.rel, t.split is Row, len(t.parts) * lora_rank)
                                   for t in lora_targets(family, hf_config, names))
        return model

    def vocab(self, tp: int) -> int:
        from megatron_patch.models.families import model_args

        if tp not in self.padded_vocab:
            self.padded_vocab[tp] = model_args(self.hf_config).padded_vocab_size(tp)
        return self.padded_vocab[tp]


def default_targets(family, hf_config) -> str:
    """Seed 002's seven projections where the model has them, else every adaptable linear (MLA)."""
    from megatron_patch.models.lora import target_names

    names = target_names(family, hf_config)
    seven = SEED_002_TARGETS.split(",")
    return SEED_002_TARGETS if all(n in names for n in seven) else ",".join(names)


def validate(model: Model, layout, w: Workload, world: int) -> None:
    """One-line errors for a layout megatron would refuse (builder.check_layout) or a sequence it cannot split."""
    from megatron_patch.models.builder import check_layout

    check_layout(layout, model.config, world)
    if w.seq_length < 2 or w.micro_batch_size < 1:
        raise UserError("--seq-length must be >= 2 and --micro-batch-size >= 1")
    if layout.sequence_parallel and w.seq_length % (layout.tp * layout.cp):
        raise UserError(f"--seq-length {w.seq_length} must be divisible by TP x CP = {layout.tp * layout.cp} "
                        "(sequence parallel)")
    if layout.cp > 1 and w.seq_length % (2 * layout.cp):
        raise UserError(f"--seq-length {w.seq_length} must be divisible by 2 x CP = {2 * layout.cp}")


def plan_stages(model: Model, layout, w: Workload, world: int, cache: dict | None = None) -> list[StageMemory]:
    """StageMemory of every pipeline rank of `layout` on `world` devices."""
    from megatron_patch.models.pipeline import stage_map
    from megatron_patch.training.plan_memory import activation_bytes, logits_gradient_bytes, state_bytes
    from megatron_patch.training.plan_params import rank_params

    key = (layout.tp, layout.pp, layout.ep, layout.expert_tp, layout.vpp, *layout.split_fields().values())
    cache = {} if cache is None else cache
    if key not in cache:
        cache[key] = rank_params(model.hf_config, layout, w.bf16, model.lora_rank, model.lora_target)
    params = cache[key]
    stages = stage_map(model.config, layout)
    mtp = getattr(model.config, "mtp_num_layers", None) or 0
    out = []
    for rank in range(layout.pp):
        layers = [i for (pp, _), r in sorted(stages.decoder.items()) if pp == rank for i in r]
        last = rank == layout.pp - 1
        acts = activation_bytes(model.config, layout, w, [i in model.moe for i in layers], rank, last,
                                mtp if stages.mtp and stages.mtp[0] == rank else 0, model.vocab(layout.tp),
                                model.adapters, params[rank].trainable if model.lora_rank else 0)
        out.append(StageMemory(rank, len(layers), *state_bytes(params[rank], layout, w, world), acts,
                               logits_gradient_bytes(layout, w, model.vocab(layout.tp)) if last else 0.0))
    return out


def largest(stages: list[StageMemory], recompute: str) -> StageMemory:
    return max(stages, key=lambda s: s.total(recompute))


def candidate_layouts(model: Model, world: int, w: Workload, gpus_per_node: int):
    """Every (TP, PP, EP, ETP, CP) with an even pipeline split that validate() accepts on `world` devices."""
    from megatron_patch.models.builder import ParallelLayout

    def divisors(n):
        return [d for d in range(1, n + 1) if n % d == 0]

    experts = model.config.num_moe_experts or 0
    for tp in divisors(min(world, gpus_per_node)):
        for pp in divisors(world // tp):
            for cp in divisors(world // (tp * pp)):
                for ep in (divisors(math.gcd(experts, world // pp)) if experts else [1]):
                    for etp in sorted({1, tp}) if experts else [tp]:
                        layout = ParallelLayout(tp=tp, pp=pp, ep=ep, etp=etp, cp=cp)
                        try:
                            validate(model, layout, w, world)
                        except UserError:
                            continue
                        yield layout


def search(model: Model, world: int, w: Workload, device_bytes: float, gpus_per_node: int) -> list[tuple]:
    """[(layout, recompute, largest StageMemory)] of the layouts that fit, best first."""
    cache: dict = {}
    fits = []
    for layout in candidate_layouts(model, world, w, gpus_per_node):
        stages = plan_stages(model, layout, w, world, cache)
        for mode in RECOMPUTE:
            top = largest(stages, mode)
            if top.total(mode) <= device_bytes:
                fits.append((layout, mode, top))
                break
    fits.sort(key=lambda f: (RECOMPUTE.index(f[1]), f[0].tp * f[0].pp * f[0].cp, f[0].pp, f[2].total(f[1])))
    return fits


# --- output ------------------------------------------------------------------------------------------
def _g(n: float) -> str:
    return f"{n / GiB:8.2f} GiB"


def describe(model: Model, layout, w: Workload, world: int) -> str:
    from megatron_patch.training.preflight import describe_model

    dp = world // (layout.tp * layout.pp * layout.cp)
    lora = f", LoRA r{model.lora_rank} on {model.lora_target}" if model.lora_rank else ""
    return (f"model    {describe_model(model.config)}\n"
            f"layout   {layout.describe()}, DP{dp} on {world} devices; micro-batch {w.micro_batch_size} x seq "
            f"{w.seq_length}, {'bf16' if w.bf16 else 'fp32'}{lora}"
            f"{', distributed optimizer' if w.use_distributed_optimizer else ''}")


def report(stages: list[StageMemory], layout, w: Workload) -> list[str]:
    top = largest(stages, w.recompute)
    from megatron_patch.training.plan_memory import in_flight

    flight = in_flight(layout, top.pp_rank, w.num_micro_batches)
    lines = [f"per device, largest stage (pp rank {top.pp_rank}, {top.layers} layers, {flight:g} micro-batch(es) "
             "in flight):",
             f"  weights      {_g(top.weights)}",
             f"  gradients    {_g(top.gradients)}   (fp32 grad buffer of the trainable parameters)",
             f"  optimizer    {_g(top.optimizer)}   (Adam m, v{' + fp32 master' if w.bf16 else ''}"
             f"{', sharded over DP' if w.use_distributed_optimizer else ''})"]
    for mode in RECOMPUTE:
        mark = "  <- --recompute" if mode == w.recompute else ""
        if mode == "none" and top.transient:
            lines.append(f"  logits grad  {_g(top.transient)}   (last stage, during the loss backward)")
        lines.append(f"  activations  {_g(top.activations[mode])}   recompute {mode:<9} total "
                     f"{_g(top.total(mode))}{mark}")
    if layout.pp > 1:
        lines.append("per pipeline rank (total at --recompute " + w.recompute + "): " + ", ".join(
            f"{s.pp_rank}: {s.total(w.recompute) / GiB:.2f}" for s in stages) + " GiB")
    return lines


def fit_table(fits: list[tuple], world: int, limit: int = 12) -> list[str]:
    lines = [f"{'TP':>3} {'PP':>3} {'EP':>3} {'ETP':>3} {'CP':>3} {'DP':>4}  {'recompute':<9} {'peak/device':>13}"]
    for layout, mode, top in fits[:limit]:
        lines.append(f"{layout.tp:>3} {layout.pp:>3} {layout.ep:>3} {layout.expert_tp:>3} {layout.cp:>3} "
                     f"{world // (layout.tp * layout.pp * layout.cp):>4}  {mode:<9} {_g(top.total(mode))}")
    if len(fits) > limit:
        lines.append(f"... and {len(fits) - limit} more")
    return lines


def run(args) -> int:
    import warnings

    warnings.simplefilter("ignore")
    model = Model.load(args.hf_config, args.lora_rank, args.lora_target)
    layout = layout_from_args(args)
    for flag in ("tp", "pp", "ep", "cp", "dp", "num_gpus", "gpus_per_node"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} {value}: must be >= 1")
    world = args.num_gpus or layout.tp * layout.pp * layout.cp * (args.dp or 1)
    if args.num_gpus and args.dp and args.dp * layout.tp * layout.pp * layout.cp != args.num_gpus:
        raise UserError(f"--dp {args.dp} x TP x PP x CP = {args.dp * layout.tp * layout.pp * layout.cp} is not "
                        f"--num-gpus {args.num_gpus}; give one of them")
    dp = world // (layout.tp * layout.pp * layout.cp) if world % (layout.tp * layout.pp * layout.cp) == 0 else 1
    num_micro = None
    if args.global_batch_size:
        if args.global_batch_size % (args.micro_batch_size * dp):
            raise UserError(f"--global-batch-size {args.global_batch_size} is not a multiple of --micro-batch-size "
                            f"{args.micro_batch_size} x DP {dp}")
        num_micro = args.global_batch_size // (args.micro_batch_size * dp)
    w = Workload(args.seq_length, args.micro_batch_size, args.bf16, args.recompute, args.use_distributed_optimizer,
                 num_micro)
    validate(model, layout, w, world)
    if args.device_memory is not None and args.device_memory <= 0:
        raise UserError(f"--device-memory {args.device_memory}: must be > 0 (GiB per device)")
    stages = plan_stages(model, layout, w, world)
    print(describe(model, layout, w, world))
    if model.lora_rank and w.recompute == "full":
        print("warning  LoRA with full recompute: megatron's checkpoint of a frozen layer input gives the adapters "
              "no gradient in `train` today; use selective or none")
    for line in report(stages, layout, w):
        print(line)
    if args.device_memory is None:
        return 0
    budget = args.device_memory * GiB * args.usable_fraction
    need = largest(stages, w.recompute).total(w.recompute)
    print(f"device   {args.device_memory:g} GiB, {args.usable_fraction:.0%} usable = {budget / GiB:.2f} GiB "
          "(the rest: runtime context, communication buffers, allocator fragmentation)")
    print(f"this layout {'FITS' if need <= budget else 'does NOT fit'} with --recompute {w.recompute} "
          f"({need / GiB:.2f} GiB)")
    fits = search(model, world, w, budget, args.gpus_per_node)
    print(f"layouts that fit on {world} devices (best first: least recompute, most data parallelism):")
    if not fits:
        print("  none: add devices, shorten --seq-length, or use --lora-rank / --use-distributed-optimizer")
        return 0
    for line in fit_table(fits, world, limit=args.show):
        print("  " + line)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="per-device memory of a training layout and the layouts that fit",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-config", required=True, metavar="DIR", help="HF model directory (config.json)")
    add_layout_args(p)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--seq-length", type=int, required=True)
    p.add_argument("--global-batch-size", type=int, default=None,
                   help="caps the micro-batches in flight on a pipeline (default: enough to fill it)")
    p.add_argument("--lora-rank", type=int, default=None, metavar="R", help="train LoRA adapters only")
    p.add_argument("--lora-target", default=None, metavar="NAMES",
                   help=f"HF module names (default: {SEED_002_TARGETS}, or every linear for MLA)")
    p.add_argument("--use-distributed-optimizer", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bf16 parameters and activations (default fp32)")
    p.add_argument("--recompute", choices=RECOMPUTE, default="none",
                   help="activation recomputation (megatron's --recompute-granularity; full = uniform, 1 layer)")
    p.add_argument("--num-gpus", type=int, default=None, metavar="N", help="devices in the job (default TPxPPxCPxDP)")
    p.add_argument("--dp", type=int, default=None, help="data parallel size (instead of --num-gpus)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="TP stays within a node (search)")
    p.add_argument("--device-memory", type=float, default=None, metavar="GIB",
                   help="memory per device in GiB: say whether the layout fits and list the layouts that do")
    p.add_argument("--usable-fraction", type=float, default=0.9,
                   help="share of --device-memory the model may use (default 0.9)")
    p.add_argument("--show", type=int, default=12, help="layouts listed (default 12)")
    p.set_defaults(func=run)
