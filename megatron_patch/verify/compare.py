"""Hook-based activation comparison of a Megatron model (any TP/PP/EP/ETP/VPP/CP layout) against its HF model.

    from megatron_patch.verify.compare import CompareSpec, run
    report = run(CompareSpec(hf_path="/tmp/ds3-mini", layout=ParallelLayout(tp=2, pp=2, ep=2, etp=1)))
    report["result"]  # "PASS" / "FAIL"; report["rows"]: one row per hook point

What runs where:
  * `run` spawns the minimal number of gloo ranks for the layout (megatron_patch.runtime.multirank),
    or, inside torchrun (WORLD_SIZE/RANK set), uses the existing ranks.
  * every rank builds its Megatron chunks (models/builder.py) and fills them: from the HF checkpoint in
    memory through the family table (checkpoint/engine.py), or from a Megatron checkpoint (`mcore_path`,
    torch or torch_dist). Every data-parallel replica runs the whole batch (forward only), so each
    (TP, PP) position holds complete information; with CP each CP rank runs its two sequence chunks
    (megatron's get_batch_on_this_cp_rank).
  * forward hooks from the family's hook table capture each hook point (capture.py); captures are
    gathered over TP and CP and collected from the pipeline stages on rank 0 (normalize.py).
  * rank 0 runs the HF model on the same seeded tokens, compares row by row (max / mean abs diff,
    cosine; the router as selected-expert sets and their weights) and builds the report (report.py).
"""
from __future__ import annotations

import importlib
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from megatron_patch.checkpoint.locate import TORCH_DIST, locate
from megatron_patch.checkpoint.tensors import DTYPES, dtype_overrides
from megatron_patch.errors import UserError
from megatron_patch.models.builder import ParallelLayout, minimal_world_size
from megatron_patch.runtime.multirank import in_torchrun



@dataclass(frozen=True)
class Tolerance:
    """A hook point passes when its `metric` ('max' or 'mean' |megatron - hf|) is <= atol * max(1, max |hf|)
    (absolute for values up to 1, relative to the tensor's largest value above: the residual stream grows
    layer by layer) and, for a router, the fraction of tokens whose selected-expert set differs is
    <= router_mismatch (the weights are compared on the other tokens)."""

    atol: float
    router_mismatch: float = 0.0
    metric: str = "max"

    def bound(self, ref_max_abs: float) -> float:
        return self.atol * max(1.0, ref_max_abs)


# fp32: measured on the four mini families (make-mini, fp32) at TP1, TP2, PP2, EP2, TP2xEP2, TP2xPP2xEP2 and
# PP2xVPP2, batch 2 x seq 32 and batch 4 x seq 128: the largest logits diff was 6.8e-6 (qwen2 at TP2, 1.6e-6
# of the logits' scale) and no hook point exceeded 1.6e-6 x max(1, max|HF|); the bound sits just above.
# A wrong weight moves a hook point by 1e-2..1e0 at these scales.
# bf16: both models in bf16 (routers in fp32). The max diff is not a useful bar there: a token whose
# near-tied expert choice flips by rounding moves that layer's MoE output by O(1) (measured 1.3 at a
# scale of 1.6), so bf16 compares the MEAN |diff| (measured worst 1.2e-2 x scale) and allows a few tokens
# with a different expert choice (measured up to 3 of 64 tokens).
DEFAULT_TOLERANCES = {
    "fp32": Tolerance(atol=1e-5, router_mismatch=0.0, metric="max"),
    "bf16": Tolerance(atol=3e-2, router_mismatch=0.1, metric="mean"),
    # fp16: 3 more mantissa bits than bf16 (eps 9.8e-4 vs 7.8e-3), same mean-|diff| rule, an 8x tighter bar
    # (measured worst 1.3e-3 x scale on the DeepSeek-V3 mini, one token routed differently)
    "fp16": Tolerance(atol=4e-3, router_mismatch=0.1, metric="mean"),
}


@dataclass
class CompareSpec:
    hf_path: str
    layout: ParallelLayout = field(default_factory=ParallelLayout)
    mcore_path: str | None = None
    peft_path: str | None = None  # with mcore_path = a `train --lora-rank` checkpoint: LoRA vs peft
    batch_size: int = 2
    seq_length: int = 32
    dtype: str = "fp32"
    seed: int = 1234
    atol: float | None = None
    router_mismatch: float | None = None
    # Applied on every rank after loading, before the forward: callable(chunks, config, layout) or
    # "module:function". Used by the tests to break a conversion on purpose.
    mutate: Callable | str | None = None
    debug: bool = False
    timeout: float = 900.0
    heartbeat_timeout: float = 60.0  # a rank stopped or dead this long ends the run (exit 3); 0: off
    # TransformerConfig fields from the MoE engine flags (models.moe_options.moe_overrides)
    moe: dict = field(default_factory=dict)
    # Megatron-LM's --transformer-impl: auto, transformer_engine or local (models/impl.py)
    transformer_impl: str = "auto"

    @property
    def tolerance(self) -> Tolerance:
        tol = DEFAULT_TOLERANCES[self.dtype]
        if self.atol is not None:
            tol = replace(tol, atol=float(self.atol))
        if self.router_mismatch is not None:
            tol = replace(tol, router_mismatch=float(self.router_mismatch))
        return tol


# ---------------------------------------------------------------------------------------------------
# validation (runs before any rank is started: bad input is a UserError, exit 2)
# ---------------------------------------------------------------------------------------------------
def prepare(spec: CompareSpec, world_size: int | None = None):
    """Check the input and the layout; return (hf_config, family, megatron config)."""
    from megatron_patch.checkpoint.hf_reader import HFCheckpoint
    from megatron_patch.models.builder import check_layout
    from megatron_patch.models.families import family_for_config
    from megatron_patch.models.moe_options import check_moe_overrides

    path = Path(spec.hf_path)
    if not path.is_dir():
        raise UserError(f"--hf-path {spec.hf_path}: directory not found")
    if not (path / "config.json").is_file():
        raise UserError(f"--hf-path {spec.hf_path}: no config.json (point at an HF model directory)")
    if spec.dtype not in DTYPES:
        raise UserError(f"--dtype {spec.dtype}: choose one of {', '.join(DTYPES)}")
    lay = spec.layout  # sizes >= 1: ParallelLayout checked itself
    if spec.batch_size < 1 or spec.seq_length < 1:
        raise UserError("--batch-size and --seq-length must be >= 1")
    from megatron_patch.checkpoint.hf_config import load_hf_config

    hf_config = load_hf_config(path)
    family = family_for_config(hf_config)
    config = family.to_mcore_config(hf_config, **spec.moe)
    check_moe_overrides(spec.moe, config)
    check_layout(lay, config, world_size)
    experts = config.num_moe_experts or 0
    if experts:
        if config.moe_ffn_hidden_size % lay.expert_tp:
            raise UserError(f"ETP={lay.expert_tp} does not divide moe_intermediate_size={config.moe_ffn_hidden_size}")
        shared = config.moe_shared_expert_intermediate_size or 0
        if shared % lay.tp:
            raise UserError(f"TP={lay.tp} does not divide the shared experts' size {shared}")
    if lay.cp > 1 and spec.seq_length % (2 * lay.cp):
        raise UserError(f"--seq-length {spec.seq_length} must be divisible by 2 x CP={2 * lay.cp} (CP's chunks)")
    if lay.sequence_parallel and (spec.seq_length // lay.cp) % lay.tp:
        by = f"TP={lay.tp}" if lay.cp == 1 else f"TP x CP={lay.tp * lay.cp}"
        raise UserError(f"--seq-length {spec.seq_length} must be divisible by {by} (sequence parallel)")
    if lay.vpp and lay.vpp > 1 and spec.batch_size % lay.pp:
        raise UserError(f"--batch-size {spec.batch_size}: with VPP the batch runs as micro-batches of 1, and "
                        f"megatron's interleaved schedule needs a multiple of PP={lay.pp} of them")
    if spec.seq_length > hf_config.max_position_embeddings:
        raise UserError(f"--seq-length {spec.seq_length} exceeds max_position_embeddings="
                        f"{hf_config.max_position_embeddings}")
    if spec.peft_path is not None:
        if spec.mcore_path is None or locate(spec.mcore_path).fmt != TORCH_DIST:
            raise UserError("--peft-path needs --mcore-path, the --save directory of a `train --lora-rank` run")
        if not (Path(spec.peft_path) / "adapter_config.json").is_file():
            raise UserError(f"--peft-path {spec.peft_path}: no adapter_config.json (write one with "
                            "`megatron-patch convert lora2peft`)")
    # validates shards and headers (cheap), and the names against the table
    if spec.mcore_path is None or spec.peft_path is not None:
        from megatron_patch.checkpoint.engine import ShardPlan, check_hf_checkpoint

        with HFCheckpoint(path) as ckpt:
            check_hf_checkpoint(ShardPlan(family, hf_config, lay, config), ckpt)
    else:
        found = locate(spec.mcore_path)
        if found.fmt == TORCH_DIST:
            from megatron_patch.checkpoint.safe_load import check_dist_checkpoint

            check_dist_checkpoint(found.ckpt_dir)  # a tampered pickle is refused before any rank starts
        else:  # a torch-format checkpoint loads only at its own layout: refused before any rank starts
            from megatron_patch.checkpoint.chunks import check_same_layout
            from megatron_patch.checkpoint.mcore_layout import read_layout

            check_same_layout(read_layout(found.root)[1], lay, bool(experts), f"--mcore-path {spec.mcore_path}")
    return hf_config, family, config


# ---------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------
def describe_experts(config) -> str:
    """How the routed experts ran: grouped GEMM or SequentialMLP, dropless or capacity-bound."""
    text = "grouped GEMM" if config.moe_grouped_gemm else "SequentialMLP"
    if config.moe_expert_capacity_factor is not None:
        text += (f", capacity factor {config.moe_expert_capacity_factor:g} ({config.moe_token_drop_policy} drop"
                 + (", padded: static shapes)" if config.moe_pad_expert_input_to_capacity else ")"))
    return text


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten(), b.flatten()
    na, nb = a.norm(), b.norm()
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float((a @ b) / (na * nb))


def compare_tensors(component: str, layer: int | None, kind: str, mc: torch.Tensor, hf: torch.Tensor,
                    tol: Tolerance) -> dict:
    row: dict[str, Any] = {"component": component, "layer": layer, "kind": kind}
    if tuple(mc.shape) != tuple(hf.shape):
        row.update(max_abs=float("inf"), mean_abs=float("inf"), cos=0.0, ref_max_abs=float(hf.abs().max()),
                   passed=False, note=f"shape megatron {tuple(mc.shape)} vs HF {tuple(hf.shape)}")
        return row
    metric = "max_abs" if tol.metric == "max" else "mean_abs"
    mc, hf = mc.double(), hf.double()
    diff = (mc - hf).abs()
    row["ref_max_abs"] = float(hf.abs().max())
    row["bound"] = tol.bound(row["ref_max_abs"])
    row["cos"] = _cos(mc, hf)
    if kind == "router":
        sel_m, sel_h = mc != 0, hf != 0
        differs = (sel_m != sel_h).any(dim=-1)  # [b, s]
        agree = ~differs
        chosen = diff[agree][sel_h[agree]]
        row["max_abs"] = float(chosen.max()) if chosen.numel() else 0.0
        row["mean_abs"] = float(chosen.mean()) if chosen.numel() else 0.0
        row["selection_mismatch"] = float(differs.float().mean())
        row["tokens_with_other_experts"] = int(differs.sum())
        row["passed"] = row["selection_mismatch"] <= tol.router_mismatch and row[metric] <= row["bound"]
        if differs.any():
            row["note"] = f"{int(differs.sum())}/{differs.numel()} tokens routed to other experts"
    elif kind == "indexer":
        # the keys each query attends to, as sets (fp32: all equal). The mismatch is the share of selections
        # (either side's) the other side lacks: in bf16 a query swaps a boundary key now and then (rounding)
        differs = (mc != hf).any(dim=-1)  # [b, s]
        row["max_abs"] = row["mean_abs"] = 0.0  # no values to compare, only the sets
        row["selection_mismatch"] = float((mc != hf).sum() / (mc.sum() + hf.sum()).clamp(min=1))
        row["passed"] = row["selection_mismatch"] <= tol.router_mismatch
        if differs.any():
            row["note"] = f"{int(differs.sum())}/{differs.numel()} queries attend to other keys"
    else:
        row["max_abs"] = float(diff.max())
        row["mean_abs"] = float(diff.mean())
        row["passed"] = bool(row[metric] <= row["bound"])
    if not math.isfinite(row["max_abs"]):
        row["passed"] = False
    return row


def logits_summary(mc: torch.Tensor, hf: torch.Tensor) -> dict:
    if tuple(mc.shape) != tuple(hf.shape):
        return {"max_abs": float("inf"), "mean_abs": float("inf"), "top1_agreement": 0.0}
    diff = (mc.double() - hf.double()).abs()
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "top1_agreement": float((mc.argmax(-1) == hf.argmax(-1)).float().mean())}


# ---------------------------------------------------------------------------------------------------
# the per-rank run
# ---------------------------------------------------------------------------------------------------
def _resolve(fn):
    if fn is None or callable(fn):
        return fn
    module, _, name = str(fn).partition(":")
    return getattr(importlib.import_module(module), name)


def input_tokens(spec: CompareSpec, vocab_size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(spec.seed)
    return torch.randint(0, vocab_size, (spec.batch_size, spec.seq_length), generator=gen)


def _load_weights(spec: CompareSpec, chunks, family, hf_config, config, args) -> str:
    from megatron_patch.checkpoint.engine import ShardPlan, load_into_chunks

    if spec.mcore_path is None or spec.peft_path is not None:
        from megatron_patch.checkpoint.hf_reader import HFCheckpoint

        plan = ShardPlan(family, hf_config, spec.layout, config, args)
        with HFCheckpoint(spec.hf_path) as ckpt:
            load_into_chunks(chunks, plan, ckpt.get_slice)
        if spec.peft_path is None:
            return "converted in memory from HF (checkpoint.engine.load_into_chunks)"
        from megatron_patch.checkpoint.chunks import load_adapters

        saved = load_adapters(chunks, str(locate(spec.mcore_path).ckpt_dir), hf_config, config, args, spec.layout)
        return (f"HF base + LoRA r{saved['lora_rank']} adapters of {spec.mcore_path}, against peft "
                f"{spec.peft_path}")
    from megatron_patch.checkpoint.chunks import load_megatron

    loaded = load_megatron(spec.mcore_path, chunks, spec.layout, "--mcore-path")
    return f"Megatron checkpoint {spec.mcore_path} ({loaded.split()[0]})"


def _forward_step(data_iterator, model):
    from functools import partial

    from megatron.core.utils import get_batch_on_this_cp_rank

    tokens, labels = next(data_iterator)
    b, s = tokens.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    batch = get_batch_on_this_cp_rank({"tokens": tokens, "labels": labels, "position_ids": position_ids})
    tokens, labels, position_ids = batch["tokens"], batch["labels"], batch["position_ids"]
    s = tokens.shape[1]
    # labels: megatron's GPTModel with MTP clones them (a None crashes); logits come from the hook
    output = model(tokens, position_ids, None, labels=labels)
    return output, partial(_loss, b * s)


def _loss(count, output):
    loss = output.float().sum()
    return loss, torch.tensor(count, dtype=torch.int), {"lm loss": loss.detach()}


def megatron_forward(chunks, tokens: torch.Tensor, num_micro: int):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    b, s = tokens.shape
    mb = b // num_micro
    labels = torch.roll(tokens, -1, dims=1)
    micro = [(tokens[i * mb:(i + 1) * mb], labels[i * mb:(i + 1) * mb]) for i in range(num_micro)]
    iterators = [iter(micro) for _ in chunks] if len(chunks) > 1 else iter(micro)
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=_forward_step, data_iterator=iterators,
            model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=num_micro,
            seq_length=s, micro_batch_size=mb, forward_only=True)


def hf_forward(spec: CompareSpec, hooks, num_layers: int, tokens: torch.Tensor):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from megatron_patch.verify.capture import hf_recorder

    hf_logging.set_verbosity_error()  # e.g. DeepSeek-V3 MTP weights transformers does not use
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(spec.hf_path, dtype=DTYPES[spec.dtype]).eval()
    if spec.peft_path is not None:  # peft injects its LoRA layers into `model` in place (module paths unchanged)
        from peft import PeftModel

        PeftModel.from_pretrained(model, spec.peft_path).eval()
    rec = hf_recorder(model, hooks, num_layers)
    with torch.no_grad():
        model(tokens)
    rec.remove()
    return rec


def run_in_group(spec: CompareSpec) -> dict | None:
    """The comparison on the ranks of an initialised torch.distributed group (runtime set up).
    Returns the report on rank 0, None elsewhere."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_patch.models.builder import build_family_model, initialize_parallel
    from megatron_patch.verify.capture import hook_order, mcore_recorder
    from megatron_patch.verify.normalize import collect, local_sbx, normalize_hf, normalize_mcore

    t0 = time.perf_counter()
    world = dist.get_world_size()
    hf_config, family, base_config = prepare(spec, world)
    layout = spec.layout
    dtype = DTYPES[spec.dtype]
    initialize_parallel(layout, seed=spec.seed)
    from megatron_patch.models.moe_options import with_moe_defaults

    overrides = {**dtype_overrides(dtype), **with_moe_defaults(spec.moe, base_config)}
    notes: list[str] = []
    chunks, config, args = build_family_model(hf_config, layout, transformer_impl=spec.transformer_impl,
                                              **overrides)
    source = _load_weights(spec, chunks, family, hf_config, config, args)
    mutate = _resolve(spec.mutate)
    if mutate is not None:
        mutate(chunks, config, layout)
    for c in chunks:
        c.eval()
    t_build = time.perf_counter()

    hooks = family.hooks(hf_config)
    num_layers = hf_config.num_hidden_layers
    tokens = input_tokens(spec, hf_config.vocab_size)
    num_micro = spec.batch_size if (layout.vpp or 1) > 1 else 1
    rec = mcore_recorder(chunks, hooks)
    megatron_forward(chunks, tokens, num_micro)
    rec.remove()
    t_fwd = time.perf_counter()

    tp_group = ps.get_tensor_model_parallel_group()
    tp = ps.get_tensor_model_parallel_world_size()
    cp_group = ps.get_context_parallel_group() if layout.cp > 1 else None
    local = {}
    for key, calls in rec.calls.items():
        if not calls:
            notes.append(f"{key[0]} layer {key[1]}: Megatron module {rec.paths[key]} never ran")
            continue
        kind = rec.kinds[key]
        sbx = local_sbx(calls, kind, num_micro, spec.batch_size // num_micro)
        local[key] = normalize_mcore(kind, sbx, spec.seq_length, hf_config.vocab_size, tp_group, tp, cp_group)
    contribute = (ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
                  and ps.get_context_parallel_rank() == 0)
    gathered = collect({"captures": local, "notes": notes}, contribute)
    ps.destroy_model_parallel()
    if dist.get_rank() != 0:
        return None

    mcore: dict = {}
    for part in gathered:
        if part:
            notes += [n for n in part.get("notes", []) if n not in notes]
            for key, value in part["captures"].items():
                mcore.setdefault(key, value)
    hf_rec = hf_forward(spec, hooks, num_layers, tokens)
    t_hf = time.perf_counter()
    experts = config.num_moe_experts or 0
    tol = spec.tolerance
    rows = []
    logits = None
    for key in hook_order(hooks, num_layers):
        in_m, in_h = key in mcore, bool(hf_rec.calls.get(key))
        if not in_m and not in_h:
            continue
        if in_m != in_h:
            notes.append(f"{key[0]} layer {key[1]}: only in {'Megatron' if in_m else 'HF'}")
            continue
        kind = hf_rec.kinds[key]
        h = normalize_hf(kind, hf_rec.calls[key], spec.batch_size, spec.seq_length, experts)
        rows.append(compare_tensors(key[0], key[1], kind, mcore[key], h, tol))
        if kind == "logits":
            logits = logits_summary(mcore[key], h)
    if not rows:
        raise UserError("no hook point was captured on both sides; the family's hook table does not match the models")
    first = next((r for r in rows if not r["passed"]), None)
    passed = first is None and not [n for n in notes if "only in" in n]
    report = {
        "result": "PASS" if passed else "FAIL",
        "family": family.name,
        "hf_path": str(spec.hf_path),
        "mcore_path": spec.mcore_path,
        "weights": source,
        "model": {"num_layers": num_layers, "hidden_size": hf_config.hidden_size, "num_experts": experts,
                  "vocab_size": hf_config.vocab_size, "experts": describe_experts(config) if experts else None,
                  "transformer_impl": config.transformer_impl},
        "layout": {"tp": layout.tp, "pp": layout.pp, "ep": layout.ep, "etp": layout.expert_tp,
                   "vpp": layout.vpp, **({"cp": layout.cp} if layout.cp > 1 else {}),
                   **{k: v for k, v in layout.split_fields().items() if v}, "sp": layout.sequence_parallel, "world_size": world,
                   "name": layout.describe()},
        "dtype": spec.dtype,
        "dtypes": {"hf": str(DTYPES[spec.dtype]).replace("torch.", ""),
                   "megatron": str(config.params_dtype).replace("torch.", ""),
                   "router": getattr(config, "moe_router_dtype", None) or "model dtype",
                   "compared_in": "float64"},
        "tolerances": asdict(tol),
        "batch_size": spec.batch_size,
        "seq_length": spec.seq_length,
        "seed": spec.seed,
        "rows": rows,
        "logits": logits,
        "first_failure": None if first is None else {"component": first["component"], "layer": first["layer"],
                                                     "max_abs": first["max_abs"]},
        "notes": notes,
        "timings_s": {"build_and_load": round(t_build - t0, 3), "megatron_forward": round(t_fwd - t_build, 3),
                      "hf_forward": round(t_hf - t_fwd, 3)},
    }
    return report


# ---------------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------------
def _rank_entry(rank: int, world: int, spec: CompareSpec):
    return run_in_group(spec)


def run_specs_in_group(rank: int, world: int, specs: list) -> list:
    """Several comparisons one after the other on the same ranks (run_ranks entry point): the start-up
    of the ranks (imports) is paid once. Returns the reports on rank 0 (None elsewhere). The layouts may
    differ; each must fit the world size (data parallel fills the rest)."""
    return [run_in_group(spec) for spec in specs]


def run(spec: CompareSpec) -> dict | None:
    """Run the comparison: inside an existing torchrun (WORLD_SIZE/RANK set; returns the report on rank 0,
    None elsewhere) or on freshly spawned local gloo ranks (returns the report)."""
    if in_torchrun():
        return _run_torchrun(spec)
    prepare(spec)  # fail before starting any rank
    world = minimal_world_size(spec.layout)
    from megatron_patch.runtime.multirank import RankFailure, run_ranks

    saved = {k: os.environ.get(k) for k in ("TORCHDYNAMO_DISABLE", "PYTHONWARNINGS")}
    # jit_fuser is torch.compile: 13 s of inductor per rank on CPU for the same numbers.
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    if not spec.debug:
        os.environ.setdefault("PYTHONWARNINGS", "ignore")  # read by the spawned interpreters at start
    try:
        results = run_ranks(_rank_entry, world, timeout=spec.timeout, args=(spec,),
                            heartbeat_timeout=spec.heartbeat_timeout)
    except RankFailure as err:
        user = _user_error_in(str(err))
        if user:
            raise UserError(user) from None
        raise
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return results[0]


_USER_ERROR_LINE = re.compile(r"^megatron_patch\.[\w.]*\.(UserError|UnsafeCheckpoint): (.*)$")


def _user_error_in(text: str) -> str | None:
    """The message of a UserError (or subclass) a rank's traceback ends with: bad input, exit 2, not 3."""
    for line in text.splitlines():
        m = _USER_ERROR_LINE.match(line)
        if m:
            return m.group(2)
    return None


def _run_torchrun(spec: CompareSpec) -> dict | None:
    import torch.distributed as dist

    from megatron_patch.runtime import setup
    from megatron_patch.runtime.distributed_init import init_distributed, record_exit_code

    acc = setup()
    heartbeat = None
    if not dist.is_initialized():  # the heartbeat as in training: a stopped or dead rank ends every rank with 3
        _, _, heartbeat = init_distributed(acc, spec.timeout / 60, spec.heartbeat_timeout, on_abort=record_exit_code)
    try:
        report = run_in_group(spec)
        # every rank exits with rank 0's verdict
        verdict = [report["result"] if report else None]
        dist.broadcast_object_list(verdict, src=0)
    finally:  # (after the broadcast: a rank that stops beating earlier looks stopped to the others)
        if heartbeat is not None:
            heartbeat.stop()
    if report is None:
        report = {"result": verdict[0], "rank": dist.get_rank()}
    return report
