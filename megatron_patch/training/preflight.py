"""`megatron-patch preflight`: will this model train at this layout on this machine? One line per step.

    megatron-patch preflight --hf-path DIR --tp N [--pp N] [--ep N] [--etp N] [--device cpu|cuda|npu[:I]]
        [--random] [--dtype fp32|bf16] [--batch-size B] [--seq-length S]

Steps: environment (as env-check), tokenizer, config mapped (family table), weights readable
(safetensors headers), then on every rank (spawned gloo ranks on CPU, or the ranks of a torchrun):
model built at the layout, weights loaded through the converter (or left random with --random), one
forward+backward timed as the warm-up (first-call compilation happens there), a second one timed, the loss
and every gradient finite, peak memory per rank. Exit 0 when every step passes, 1 when one fails,
2 bad input.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_patch.errors import UserError
from megatron_patch.models.builder import add_layout_args


@dataclass
class PreflightSpec:
    hf_path: str
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None
    device: str | None = None  # cpu | cuda | npu, optionally :index (single rank)
    random: bool = False
    dtype: str = "fp32"  # fp32 | bf16 (parameters and compute)
    batch_size: int = 1
    seq_length: int = 64
    seed: int = 1234
    timeout: float = 900.0

    @property
    def device_type(self) -> str | None:
        return self.device.split(":")[0] if self.device else None

    @property
    def device_index(self) -> int | None:
        return int(self.device.split(":")[1]) if self.device and ":" in self.device else None

    @property
    def layout(self):
        from megatron_patch.models.builder import ParallelLayout

        return ParallelLayout(tp=self.tp, pp=self.pp, ep=self.ep, etp=self.etp)


@dataclass
class Step:
    name: str
    ok: bool | None  # None: skipped (does not fail the run)
    detail: str
    data: dict = field(default_factory=dict)

    def line(self) -> str:
        status = "ok" if self.ok else ("skip" if self.ok is None else "FAIL")
        return f"[{status:^4}] {self.name:<14}{self.detail}"


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------------------------------
# steps that run in this process (no rank started yet)
# ---------------------------------------------------------------------------------------------------
def check_environment(spec: PreflightSpec) -> Step:
    from megatron_patch.runtime.accelerator import set_accelerator
    from megatron_patch.runtime.env_check import collect

    try:
        acc = set_accelerator(spec.device_type)
        info = collect()
    except Exception as err:  # noqa: BLE001 - e.g. cuda asked for on a machine without it
        return Step("environment", False, f"{spec.device}: {err}")
    if spec.device_type and acc.type != spec.device_type:
        return Step("environment", False, f"--device {spec.device}: this machine offers {acc.type}")
    if not info["backends_available"].get(acc.backend):
        return Step("environment", False, f"{acc.type}: backend {acc.backend} is not available in this torch")
    count = info["device_count"]
    if spec.device_index is not None and acc.type != "cpu" and spec.device_index >= count:
        return Step("environment", False, f"--device {spec.device}: only {count} {acc.type} device(s)")
    v = info["versions"]
    active = sum(p["applies"] for p in info["patches"])
    return Step("environment", True,
                f"{acc.type} x{count} ({info['device_name']}), {acc.backend}; torch {v['torch']}, megatron-core "
                f"{v['megatron-core']}, transformers {v['transformers']}; {active} of {len(info['patches'])} "
                "runtime patches apply", {"device": acc.type, "device_count": count})


def check_tokenizer(hf_path: str, vocab_size: int) -> Step:
    """The tokenizer next to the weights, if there is one; its ids must fit the model's embedding."""
    path = Path(hf_path)
    if not any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return Step("tokenizer", None, f"no tokenizer files in {hf_path}")
    from megatron_patch.data.preprocess import load_tokenizer

    try:
        tok = load_tokenizer(hf_path)
    except UserError as err:
        return Step("tokenizer", False, str(err))
    n = len(tok)
    ok = n <= vocab_size
    return Step("tokenizer", ok, f"{type(tok).__name__}, vocab {n} (model embedding {vocab_size})"
                + ("" if ok else ": token ids would fall outside the embedding"), {"vocab_size": n})


def check_config(spec: PreflightSpec, world: int):
    """(Step, hf_config, megatron config) with the family table's mapping and the layout checked."""
    from megatron_patch.checkpoint.hf_config import load_hf_config
    from megatron_patch.models.builder import check_layout
    from megatron_patch.models.families import family_for_config

    hf_config = load_hf_config(spec.hf_path)
    family = family_for_config(hf_config)
    config = family.to_mcore_config(hf_config)
    check_layout(spec.layout, config, world)
    if spec.layout.sequence_parallel and spec.seq_length % spec.tp:
        raise UserError(f"--seq-length {spec.seq_length} must be divisible by TP={spec.tp} (sequence parallel)")
    return Step("config", True, f"{family.name}: {describe_model(config)}; {spec.layout.describe()} on {world} "
                "rank(s)"), hf_config, config


def describe_model(config) -> str:
    """One line: layers (dense / MoE), hidden, attention kind, experts and routing."""
    experts = config.num_moe_experts or 0
    freq = config.moe_layer_freq
    moe_layers = sum(freq) if isinstance(freq, list) else (config.num_layers if experts else 0)
    text = (f"{config.num_layers} layers ({config.num_layers - moe_layers} dense + {moe_layers} MoE), hidden "
            f"{config.hidden_size}, {'MLA' if config.multi_latent_attention else 'GQA'} {config.num_attention_heads} heads")
    if experts:
        shared = config.moe_shared_expert_intermediate_size or 0
        text += (f", {experts} experts top-{config.moe_router_topk} ({config.moe_router_score_function}"
                 + (f", {config.moe_router_num_groups} groups" if config.moe_router_num_groups else "")
                 + (", shared experts" if shared else "") + ")")
    return text


def check_weights(hf_path: str) -> Step:
    from megatron_patch.checkpoint.hf_reader import HFCheckpoint

    with HFCheckpoint(hf_path) as ckpt:  # validates the index, shards and headers without reading tensors
        names = ckpt.keys()
        numel = sum(math.prod(ckpt.shape(n)) for n in names)
        nbytes = sum(ckpt.nbytes(n) for n in names)
        shards = len(ckpt.shards())
    return Step("weights", True, f"{len(names)} tensors, {numel:,} parameters, {_gib(nbytes)} in {shards} shard(s)",
                {"parameters": numel})


# ---------------------------------------------------------------------------------------------------
# the per-rank part
# ---------------------------------------------------------------------------------------------------
def run_on_rank(spec: PreflightSpec) -> dict:
    """Build, load, two timed forward+backward passes; returns this rank's figures (errors as text)."""
    import torch
    from megatron.core import parallel_state as ps

    from megatron_patch.data.batch import batch_from_tokens
    from megatron_patch.models.builder import build_family_model, initialize_parallel
    from megatron_patch.runtime import get_accelerator
    from megatron_patch.training.metrics import grads_finite
    from megatron_patch.training.setup_model import wrap_ddp, zero_grads
    from megatron_patch.training.step import forward_backward

    from transformers import AutoConfig

    acc = get_accelerator()
    if spec.device_index is not None and torch.distributed.get_world_size() == 1:
        acc.set_device(spec.device_index)
    out: dict = {"rank": torch.distributed.get_rank(), "device": str(acc.current_device())}
    hf_config = AutoConfig.from_pretrained(spec.hf_path)
    t0 = time.perf_counter()
    initialize_parallel(spec.layout, seed=spec.seed)
    bf16 = spec.dtype == "bf16"
    chunks, config, margs = build_family_model(hf_config, spec.layout, bf16=bf16,
                                               params_dtype=torch.bfloat16 if bf16 else torch.float32)
    # DDP as in training: its grad buffers, and finalize_model_grads reducing the SP / DP gradients
    out["params"] = sum(p.numel() for c in chunks for p in c.parameters())
    out["build_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if not spec.random:
        from megatron_patch.training.checkpointing import init_from_hf

        init_from_hf(spec.hf_path, chunks, hf_config, spec.layout, config, margs)
    out["load_s"] = time.perf_counter() - t0
    chunks = wrap_ddp(chunks, config)
    gen = torch.Generator().manual_seed(spec.seed)
    tokens = torch.randint(0, hf_config.vocab_size, (spec.batch_size * ps.get_data_parallel_world_size(),
                                                    spec.seq_length), generator=gen)
    batch = batch_from_tokens(tokens).to(acc.current_device())
    losses, times = [], []
    for _ in range(2):  # the first is the warm-up (compilation, allocator), the second the steady state
        zero_grads(chunks)
        acc.synchronize()
        t0 = time.perf_counter()
        loss = forward_backward(chunks, batch, spec.batch_size)
        acc.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(None if loss is None else float(loss))
    out["warmup_s"], out["step_s"] = times
    out["loss"] = losses[-1]
    out["grads_finite"] = bool(grads_finite(chunks))
    out["grads_present"] = any(bool(b.grad_data.abs().sum() > 0) for c in chunks
                               for b in list(c.buffers) + list(c.expert_parallel_buffers))
    out["peak_bytes"] = int(acc.memory_stats()["peak"])
    ps.destroy_model_parallel()
    return out


def _rank_entry(rank: int, world: int, spec: PreflightSpec) -> dict:
    return run_on_rank(spec)


def rank_steps(results: list[dict], spec: PreflightSpec) -> list[Step]:
    """The per-rank figures as steps (worst rank shown)."""
    params = [r["params"] for r in results]
    steps = [Step("model", True, f"built at {spec.layout.describe()}: {max(params):,} parameters on the largest rank "
                  f"({sum(params):,} over {len(results)} rank(s)), {max(r['build_s'] for r in results):.1f}s")]
    steps.append(Step("load", True, "random weights (--random)" if spec.random else
                      f"HF weights loaded through the family table in {max(r['load_s'] for r in results):.1f}s"))
    loss = next((r["loss"] for r in results if r["loss"] is not None), None)
    finite = loss is not None and math.isfinite(loss) and all(r["grads_finite"] for r in results)
    grads = all(r["grads_present"] for r in results)
    steps.append(Step("warm-up", True, f"first forward+backward {max(r['warmup_s'] for r in results):.2f}s "
                      "(includes first-call compilation)"))
    steps.append(Step("train step", finite and grads,
                      f"forward+backward {max(r['step_s'] for r in results):.2f}s on "
                      f"{', '.join(sorted({r['device'] for r in results}))}, batch {spec.batch_size} x seq "
                      f"{spec.seq_length}, {spec.dtype}, loss {loss:.4f}, gradients " + ("finite" if finite else "NOT finite")
                      + ("" if grads else ", some rank has no gradient"), {"loss": loss}))
    steps.append(Step("memory", True, "peak per rank: " + ", ".join(
        f"{r['rank']}: {_gib(r['peak_bytes'])}" for r in sorted(results, key=lambda r: r["rank"]))))
    return steps


def world_size_for(spec: PreflightSpec) -> int:
    from megatron_patch.models.builder import minimal_world_size
    from megatron_patch.runtime.multirank import in_torchrun

    if in_torchrun():
        return int(os.environ.get("WORLD_SIZE", "1"))
    return minimal_world_size(spec.layout)


def run_preflight(spec: PreflightSpec, emit=print) -> list[Step]:
    """All steps, each passed to `emit` as soon as it is known; stops at the first failing one."""
    from megatron_patch.runtime.multirank import RankFailure, in_torchrun, run_ranks

    if not Path(spec.hf_path).is_dir():
        raise UserError(f"--hf-path {spec.hf_path}: directory not found")
    steps: list[Step] = []

    def add(step: Step) -> bool:
        steps.append(step)
        emit(step.line())
        return step.ok is not False

    world = world_size_for(spec)
    if not add(check_environment(spec)):
        return steps
    cfg_step, hf_config, _ = check_config(spec, world)
    if not add(check_tokenizer(spec.hf_path, hf_config.vocab_size)) or not add(cfg_step):
        return steps
    if not spec.random and not add(check_weights(spec.hf_path)):
        return steps
    if in_torchrun():
        results = _run_torchrun(spec)
        if results is None:
            return steps  # rank 0 reports
    else:
        if steps[0].data["device"] == "cpu":  # jit_fuser is torch.compile: inductor on CPU, same numbers
            os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
        try:
            results = run_ranks(_rank_entry, world, timeout=spec.timeout, args=(spec,), device=steps[0].data["device"])
        except RankFailure as err:
            lines = str(err).strip().splitlines()
            add(Step("ranks", False, lines[0] if err.one_line else "a rank failed: " + " | ".join(lines[-3:])))
            return steps
    for step in rank_steps(results, spec):
        add(step)
    return steps


def _run_torchrun(spec: PreflightSpec) -> list[dict] | None:
    import torch.distributed as dist

    from megatron_patch.runtime import setup

    acc = setup(spec.device_type)
    if not dist.is_initialized():
        acc.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(acc.backend)
    mine = run_on_rank(spec)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return gathered if dist.get_rank() == 0 else None


def spec_from_args(args) -> PreflightSpec:
    return PreflightSpec(hf_path=args.hf_path, tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, device=args.device,
                         random=args.random, dtype=args.dtype, batch_size=args.batch_size, seq_length=args.seq_length,
                         seed=args.seed, timeout=args.timeout)


def run(args) -> int:
    import warnings

    warnings.simplefilter("ignore")  # megatron's import-time notes (no TE / Apex) hide the step lines
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    spec = spec_from_args(args)
    steps = run_preflight(spec, emit=lambda line: print(line, flush=True))
    failed = [s for s in steps if s.ok is False]
    if steps and not failed:
        print(f"preflight: all {sum(s.ok is True for s in steps)} steps passed", flush=True)
    elif failed:
        print(f"preflight: FAILED at {failed[0].name}", file=sys.stderr, flush=True)
    return 1 if failed else 0


def register(subparsers) -> None:
    p = subparsers.add_parser("preflight", help="env, config, build, load, one forward+backward at a layout",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-path", required=True, help="HF model directory (config.json + safetensors)")
    add_layout_args(p, vpp=False, cp=False, split=False)
    p.add_argument("--device", default=None, help="cpu | cuda | npu, optionally :INDEX (default: detected)")
    p.add_argument("--random", action="store_true", help="skip the weights: random initialisation")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="parameters and compute")
    p.add_argument("--batch-size", type=int, default=1, help="micro batch per data-parallel rank")
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before a hung rank fails the run")
    p.set_defaults(func=run)
