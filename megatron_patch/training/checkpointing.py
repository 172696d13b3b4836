"""Training checkpoints (megatron-core dist_checkpointing, "torch_dist") and model initialisation.

Layout, as Megatron-LM writes it, so its tools (and `megatron-patch convert`) read it:

    SAVE/latest_checkpointed_iteration.txt     "<iteration>"
    SAVE/iter_0000100/                         dist_checkpointing: metadata.json, common.pt, shards
        model | model0, model1 ...             sharded model state (one per virtual pipeline chunk)
        optimizer                              sharded optimizer state
        rng_state                              one object per rank (python, numpy, torch, device, tracker)
        common: iteration, consumed_train_samples (the data position), opt_param_scheduler, args,
                world_size, parallel (layout + optimizer kind the optimizer state belongs to), checkpoint_version

A save is atomic: every rank writes into SAVE/.iter_0000100.tmp, then rank 0 renames it to
iter_0000100 and only then rewrites the tracker (write + rename). A process killed at any point leaves
the tracker on the previous complete checkpoint. `MP_TEST_CRASH_IN_SAVE=<iteration>` makes every rank
os._exit(43) after the files are written and before they are published (used by the tests).

Initialisation for a fresh run: `init_from_megatron` (--load of a model-only Megatron checkpoint: torch
per-rank layout via checkpoint.mcore_layout, or torch_dist) or `init_from_hf` (--load-hf: HF safetensors
through the family table and checkpoint.engine).
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
from pathlib import Path

import numpy
import torch

from megatron_patch.checkpoint import safe_load
from megatron_patch.checkpoint.chunks import (is_distributed, load_megatron, model_keys, model_sharded_state_dict,
                                              optimizers, sharded_metadata, unwrap)
from megatron_patch.checkpoint.mcore_layout import CHECKPOINT_VERSION, iteration_dir_name, write_latest
from megatron_patch.checkpoint.tensors import tensor_bytes
from megatron_patch.errors import UserError
from megatron_patch.runtime.multirank import start_checkpoint_workers

CRASH_ENV = "MP_TEST_CRASH_IN_SAVE"


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _device():
    """Where a collective's tensor lives (NCCL/HCCL reduce no CPU tensors)."""
    from megatron_patch.runtime import get_accelerator

    return get_accelerator().current_device()


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def parallel_signature(optimizer) -> dict:
    """The model-parallel layout and optimizer kind a checkpoint's optimizer state belongs to."""
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "ep": ps.get_expert_model_parallel_world_size(), "etp": ps.get_expert_tensor_parallel_world_size(),
            "vpp": ps.get_virtual_pipeline_model_parallel_world_size() or 1,
            "distributed_optimizer": is_distributed(optimizer), "optimizers": len(optimizers(optimizer)),
            **_experts_kind(optimizer)}


def _experts_kind(optimizer) -> dict:
    """{"experts": "grouped" | "sequential"} where the distributed optimizer holds routed experts: its dp_reshardable
    buckets follow the experts' parameter order, which differs between the two (the model weights do not)."""
    from megatron.core.transformer.moe.experts import SequentialMLP

    if not is_distributed(optimizer):
        return {}
    chunks = [c for o in optimizers(optimizer) for c in getattr(o, "model_chunks", [])]
    kinds = {"sequential" if isinstance(m, SequentialMLP) else "grouped"
             for c in chunks for name, m in c.named_modules() if name.endswith("mlp.experts")}
    return {"experts": kinds.pop()} if kinds else {}


def _same_layout(saved: dict | None, now: dict) -> bool:
    if saved is not None and "experts" not in saved:  # saved before the signature named the experts
        now = {k: v for k, v in now.items() if k != "experts"}
    return saved == now


def _describe(sig: dict) -> str:
    return (f"TP{sig['tp']} PP{sig['pp']} EP{sig['ep']} ETP{sig['etp']} VPP{sig['vpp']} with the "
            f"{'distributed' if sig['distributed_optimizer'] else 'regular'} optimizer"
            + (f" and {sig['experts']} experts" if sig.get("experts") else ""))


# ---------------------------------------------------------------------------------------------------
# the tracker
# ---------------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------------
# rng
# ---------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    from megatron.core import tensor_parallel

    from megatron_patch.runtime import get_accelerator

    return {
        "random": random.getstate(),
        "numpy": numpy.random.get_state(),
        "torch": torch.get_rng_state(),
        "device": get_accelerator().get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    from megatron_patch.runtime import get_accelerator

    random.setstate(state["random"])
    numpy.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_accelerator().set_rng_state(state["device"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded(state) -> "object":
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("rng_state", state, (_world(),), (_rank(),), replica_id=0)


# ---------------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------------
def _train_state(chunks, optimizer, scheduler, iteration: int, consumed: int, args: dict,
                 is_loading: bool, with_optimizer: bool = True, with_rng: bool = True, extra: dict | None = None) -> dict:
    model = model_sharded_state_dict(chunks)
    state = dict(model)
    if with_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(model, is_loading=is_loading,
                                                          metadata=sharded_metadata(optimizer))
    if with_rng:
        state["rng_state"] = _rng_sharded(rng_state() if not is_loading else None)
    if not is_loading:
        state.update(iteration=iteration, consumed_train_samples=consumed, checkpoint_version=CHECKPOINT_VERSION,
                     opt_param_scheduler=scheduler.state_dict(), args=args, world_size=_world(),
                     parallel=parallel_signature(optimizer), **(extra or {}))
    return state


def _maybe_crash(iteration: int) -> None:
    if os.environ.get(CRASH_ENV) == str(iteration):
        import multiprocessing

        print(f"[{CRASH_ENV}] rank {_rank()}: exiting while saving iteration {iteration}", flush=True)
        # dist_checkpointing's writer starts a multiprocessing Manager on the first save; os._exit skips
        # its shutdown, and the orphan would keep our stdout open (a caller reading it would never see EOF).
        for child in multiprocessing.active_children():
            child.kill()
        os._exit(43)


def remove_stale_saves(root: Path) -> None:
    """With the --save lock held: `.iter_N.tmp` of a killed save is removed; `.iter_N.old` (a killed re-save
    of iteration N) is put back when iter_N is missing, removed otherwise."""
    if not root.is_dir():
        return
    for path in root.glob(".iter_*.tmp"):
        shutil.rmtree(path, ignore_errors=True)
    for path in root.glob(".iter_*.old"):
        final = root / path.name[1:-len(".old")]
        if final.exists():
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.rename(path, final)


def _state_bytes(state) -> int:
    """This rank's tensor bytes in a sharded state dict (what a save needs, roughly, times the ranks)."""
    return _own_bytes(state) * _world()


def _own_bytes(state) -> int:
    """This rank's tensor bytes in a sharded state dict."""
    return sum(tensor_bytes(t) for t in _tensors(state))


def _check_room(root: Path, state) -> None:
    """Refuse a save that surely cannot fit before megatron's writers start (they print their own failure
    line ahead of ours, per writer process). A rank's own state is a lower bound of the checkpoint's size
    (every tensor is written once, by some rank), so this never refuses a save that would fit; all ranks
    agree through one all-reduce."""
    own = _own_bytes(state)
    free = shutil.disk_usage(root).free
    short = torch.tensor([own if own > free else 0], dtype=torch.int64, device=_device())
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(short, op=torch.distributed.ReduceOp.MAX)
    if short.item():
        raise UserError(f"no space left on the device of {root} (the checkpoint needs at least {short.item()} "
                        f"bytes, {free} bytes free); free space there or choose another --save")


def _tensors(value):
    data = getattr(value, "data", value)
    if isinstance(data, torch.Tensor):
        yield data
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _agreed(err: BaseException, disk: UserError | None) -> UserError | None:
    """DCP raises a failed write on every rank at once, with the details on its coordinator only (the others get an
    empty CheckpointException): every rank then reports the coordinator's full-disk line (printed once per node),
    not a traceback that exits 1 first under torchrun."""
    from torch.distributed.checkpoint.api import CheckpointException

    if not isinstance(err, CheckpointException) or _world() == 1:
        return disk
    lines = [None] * _world()
    torch.distributed.all_gather_object(lines, str(disk) if disk is not None else None)
    first = next((line for line in lines if line), None)
    return UserError(first) if first else None


@contextlib.contextmanager
def _writer_logs_quiet():
    """megatron's checkpoint writer logs its workers' failures ("Local process 1 encountered an error: [Errno 28]
    ...") before the exception reaches us; the exception carries the same text, reported once (one line for a
    full disk, the traceback otherwise)."""
    import logging

    logger = logging.getLogger("megatron.core.dist_checkpointing")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def save_checkpoint(root, iteration: int, chunks, optimizer, scheduler, consumed: int, args: dict,
                    extra: dict | None = None) -> Path:
    """Write SAVE/iter_XXXXXXX atomically and point the tracker at it. Call on every rank. `extra`: more
    common (non-sharded) state, e.g. the SFT sampler's."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = root / iteration_dir_name(iteration)
    tmp = root / f".{final.name}.tmp"
    created = torch.tensor([0], device=_device())  # this save makes --save itself (a failed one removes it again)
    if _rank() == 0:
        created[0] = not root.exists()
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # leftover of a save that was killed
        tmp.mkdir()
    if torch.distributed.is_initialized():  # (the barrier after the mkdir)
        torch.distributed.all_reduce(created, op=torch.distributed.ReduceOp.MAX)
    state = _train_state(chunks, optimizer, scheduler, iteration, consumed, args, is_loading=False, extra=extra)
    content = {k: v for k, v in sharded_metadata(optimizer).items() if k != "dp_cp_group"}
    try:
        _check_room(root, state)
        start_checkpoint_workers()
        with _writer_logs_quiet():
            dist_checkpointing.save(state, str(tmp), content_metadata=content)
    except BaseException as err:  # DCP's CheckpointException is a BaseException
        from megatron_patch.checkpoint.atomic import disk_error

        disk = None if isinstance(err, UserError) else _agreed(err, disk_error(err, root, _state_bytes(state)))
        # every rank cleans up (under torchrun the first rank to fail gets the others killed): half a checkpoint
        # helps no one, nor an empty --save this run made
        shutil.rmtree(tmp, ignore_errors=True)
        if created.item():
            with contextlib.suppress(OSError):  # not empty: another rank's files, or not ours to remove
                root.rmdir()
        if disk is not None:
            raise disk from None
        raise
    _barrier()
    _maybe_crash(iteration)
    if _rank() == 0:
        old = root / f".{final.name}.old"
        if final.exists():  # re-saving an iteration (e.g. after resuming from an earlier one)
            if old.exists():
                shutil.rmtree(old)
            os.rename(final, old)
        os.rename(tmp, final)
        write_latest(root, iteration)
        if old.exists():
            shutil.rmtree(old)
    _barrier()
    return final


# ---------------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------------
def _allocate_optimizer_state(optimizer) -> None:
    """megatron-core 0.16.1 without TE/Apex (CPU, NPU): DistributedOptimizer.sharded_state_dict(is_loading=
    True) first calls state_dict(), which reads torch Adam's per-parameter "step" and asserts there is
    exactly one value -- false before the first step (no state yet). Allocate the state with megatron's
    own init_state_fn and a step of 0; loading then overwrites all of it."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(opt, DistributedOptimizer) or inner is None or len(inner.state) or opt.init_state_fn is None:
            continue
        opt.init_state_fn(inner, opt.config)
        for state in inner.state.values():
            state.setdefault("step", torch.tensor(0.0))


def _restore_adam_steps(optimizer) -> None:
    """megatron-core 0.16.1 without TE/Apex: DistributedOptimizer keeps torch Adam's step in its param
    groups ("step") and on load (a) gives every parameter's state the SAME step tensor, which Adam then
    increments once per parameter, and (b) copies the in-memory step of the load request back over it
    (dp_reshardable loader). Set each parameter's step from its group's loaded value, in its own tensor."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, DistributedOptimizer):
            continue
        for group in opt.optimizer.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                state = opt.optimizer.state.get(param)
                if state is not None and "step" in state:
                    state["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)


def load_training_checkpoint(path, chunks, optimizer, scheduler, load_optim: bool = True,
                             load_rng: bool = True) -> tuple[int, int]:
    """Restore model, optimizer, scheduler, rng from a checkpoint written by save_checkpoint.
    Returns (iteration, consumed_train_samples)."""
    common = safe_load.load_common(path)
    saved, now = common.get("parallel"), parallel_signature(optimizer)
    if load_optim and not _same_layout(saved, now):
        raise UserError(f"{path} holds optimizer state for {_describe(saved) if saved else 'another layout'}; this "
                        f"run is {_describe(now)}. Resume at that layout (any data-parallel size), or add "
                        "--no-load-optim to continue from its weights with a fresh optimizer (weights reshard "
                        "to any layout)")
    if common.get("world_size") != _world() and load_rng:
        if _rank() == 0:
            print(f"note: {path} was saved by {common.get('world_size')} ranks, this run has {_world()}: "
                  "random states are not restored", flush=True)
        load_rng = False
    if load_optim:
        _allocate_optimizer_state(optimizer)
    request = _train_state(chunks, optimizer, scheduler, 0, 0, {}, is_loading=True,
                           with_optimizer=load_optim, with_rng=load_rng)
    from megatron.core.dist_checkpointing.core import CheckpointingException

    try:
        loaded = safe_load.dist_load(request, path)
    except CheckpointingException as err:
        raise UserError(f"--load {path}: the checkpoint does not match the model ({err})") from None
    from megatron_patch.models.lora import ADAPTER_MARK, has_adapters

    lora = has_adapters([unwrap(c) for c in chunks])
    for key, chunk in zip(model_keys(chunks), chunks):
        result = unwrap(chunk).load_state_dict(loaded[key], strict=not lora)
        if lora and (result.unexpected_keys or any(ADAPTER_MARK in k for k in result.missing_keys)):
            raise UserError(f"{path}: adapters do not match this run's LoRA settings (missing "
                            f"{[k for k in result.missing_keys if ADAPTER_MARK in k][:3]}, unexpected "
                            f"{result.unexpected_keys[:3]}); resume with the same --lora-* flags")
    if load_optim:
        # no_grad: with fp32 params the distributed optimizer's main params are views of the model params,
        # and megatron's dp_reshardable loader copies into them in place (it lacks the no_grad its
        # sibling loaders have).
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer)
        try:
            scheduler.load_state_dict(loaded["opt_param_scheduler"])
        except AssertionError as err:  # OptimizerParamScheduler checks its settings against the checkpoint
            raise UserError(f"{path}: the learning-rate schedule differs from the checkpoint ({err}); resume "
                            "with the same --lr/--min-lr/--lr-*/--train-iters/--weight-decay flags") from None
    else:
        optimizer.reload_model_params()  # fresh optimizer state around the loaded weights
        scheduler.step(increment=int(loaded["iteration"]))  # the LR schedule continues where it was
    if load_rng:
        set_rng_state(loaded["rng_state"])
    return int(loaded["iteration"]), int(loaded["consumed_train_samples"])


def init_from_megatron(root, chunks, layout) -> str:
    """Load model weights (only) from a Megatron checkpoint directory: torch_dist or torch layout."""
    return load_megatron(root, chunks, layout, "--load")


def init_from_hf(hf_dir, chunks, hf_config, layout, config, margs) -> str:
    from megatron_patch.checkpoint.engine import ShardPlan, check_hf_checkpoint, load_into_chunks
    from megatron_patch.checkpoint.hf_reader import HFCheckpoint
    from megatron_patch.models.families import family_for_config

    plan = ShardPlan(family_for_config(hf_config), hf_config, layout, config, margs)
    with HFCheckpoint(hf_dir) as ckpt:
        check_hf_checkpoint(plan, ckpt)
        load_into_chunks(chunks, plan, ckpt.get_slice)
    return f"HF {hf_dir}"
