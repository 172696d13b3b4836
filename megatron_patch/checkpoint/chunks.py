"""This rank's model chunks and checkpoints: the sharded state dicts megatron's dist_checkpointing saves and
loads (one per virtual pipeline chunk, with Megatron-LM's metadata), and loading the model weights of a
Megatron checkpoint into the chunks, for `compare --mcore-path` and `train --load` alike:

- torch_dist: through dist_checkpointing (weights-only, safe_load), at any layout;
- Megatron-LM's torch layout: this rank's rank files, at the checkpoint's own layout only.

Either spec's names are read (key_map: local or Transformer Engine, SequentialMLP or grouped experts).
"""
from __future__ import annotations

from megatron_patch.errors import UserError

from . import mcore_layout, safe_load
from .locate import TORCH_DIST, locate

# The distributed optimizer saves its own DP shards in parallel ('dp_reshardable', Megatron-LM's default:
# no gather on one rank; reshardable in DP only). ('fully_reshardable' gathers with tensor.cuda() in
# megatron-core 0.16.1, which the CPU runtime does not cover.) The regular optimizer is saved per parameter.
DISTRIBUTED_OPTIMIZER_FORMAT = "dp_reshardable"


def unwrap(chunk):
    """The model of a chunk, DDP-wrapped or not."""
    return getattr(chunk, "module", chunk)


def model_keys(chunks) -> list[str]:
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def is_distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return optimizer is not None and any(isinstance(o, DistributedOptimizer) for o in optimizers(optimizer))


def sharded_metadata(optimizer=None) -> dict:
    """What Megatron-LM passes to sharded_state_dict(): the optimizer save format plus the DP(+CP) group
    (needed e.g. for MTP's tied embedding copy on the last pipeline stage)."""
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

    metadata = {"chained_optim_avoid_prefix": True}
    if is_distributed(optimizer):
        metadata["distrib_optim_sharding_type"] = DISTRIBUTED_OPTIMIZER_FORMAT
    return ensure_metadata_has_dp_cp_group(metadata)


def model_sharded_state_dict(chunks) -> dict:
    from megatron_patch.models.lora import adapters_only, has_adapters

    metadata = sharded_metadata()
    out = {key: unwrap(c).sharded_state_dict(metadata=metadata) for key, c in zip(model_keys(chunks), chunks)}
    if has_adapters([unwrap(c) for c in chunks]):  # LoRA: the base is frozen and comes from --load/--load-hf
        out = {key: adapters_only(sd) for key, sd in out.items()}
    return out


# ---------------------------------------------------------------------------------------------------
# loading a Megatron checkpoint's weights
# ---------------------------------------------------------------------------------------------------
def check_same_layout(sizes: dict, layout, experts: bool, where: str) -> None:
    """A torch-format checkpoint (rank files of `sizes`) loads only at its own layout; ETP counts only for
    a model with experts."""
    saved, want = mcore_layout.layout_key(sizes), mcore_layout.layout_key(mcore_layout.layout_dict(layout))
    keys = [k for k in want if k != "etp" or experts]
    if {k: saved[k] for k in keys} != {k: want[k] for k in keys}:
        saved_at = mcore_layout.describe_layout(mcore_layout.layout_of(sizes))
        raise UserError(f"{where}: torch-format checkpoint is for {saved_at}, this run is "
                        f"{mcore_layout.describe_layout(layout)}; convert for this layout (convert reshard) or "
                        "convert with --format torch_dist, which loads at any layout")


def copy_into(chunks, state_dicts: list[dict], where: str) -> None:
    """Load per-chunk (local-spec) state dicts into the model; every tensor of the model must be given."""
    from .engine import as_model_names

    if len(state_dicts) != len(chunks):
        raise UserError(f"{where} has {len(state_dicts)} model chunk(s) per rank, this run builds {len(chunks)} "
                        "(virtual pipeline size differs)")
    for i, (chunk, sd) in enumerate(zip(chunks, state_dicts)):
        try:
            module = unwrap(chunk)
            missing, unexpected = module.load_state_dict(as_model_names(sd, module.state_dict()), strict=False)
        except RuntimeError as err:  # shape mismatches
            raise UserError(f"{where} (chunk {i}) does not fit the model: {str(err).splitlines()[-1].strip()} "
                            "(converted for another parallel layout or config?)") from None
        missing = [k for k in missing if not k.endswith("_extra_state")]
        unexpected = [k for k in unexpected if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise UserError(f"{where} (chunk {i}) does not match the model: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}; was it converted from the same config?")


def load_torch(root, chunks, layout, where: str) -> int | str:
    """This rank's rank files of a torch-format checkpoint into the chunks; returns the iteration."""
    from megatron.core import parallel_state as ps

    from .key_map import down_projection_rows, read_local_rank

    iteration, sizes = mcore_layout.read_layout(root)
    config = unwrap(chunks[0]).config
    check_same_layout(sizes, layout, bool(config.num_moe_experts), where)
    # local-spec names whatever spec wrote it (Megatron-LM / Pai-Megatron-Patch TE checkpoints included)
    state_dicts, _ = read_local_rank(root, ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                                     ps.get_expert_model_parallel_rank(), sizes, iteration, down_projection_rows(config))
    copy_into(chunks, state_dicts, where)
    return iteration


def load_dist(path, chunks, where: str) -> None:
    """The model weights of a torch_dist checkpoint directory into the chunks (any layout)."""
    from megatron.core.dist_checkpointing.core import CheckpointingException

    from .key_map import match_sharded, stored_keys

    request = model_sharded_state_dict(chunks)
    stored = stored_keys(path)  # the checkpoint's names (local or TE spec) decide the keys requested
    request = {k: match_sharded(sd, stored, where, extra_state=False)[0] for k, sd in request.items()}
    try:
        loaded = safe_load.dist_load(request, path)
    except CheckpointingException as err:
        raise UserError(f"{where}: the checkpoint does not match the model ({err})") from None
    for key, chunk in zip(model_keys(chunks), chunks):
        module = unwrap(chunk)
        state = dict(loaded[key])
        for name in module.state_dict():  # TE `_extra_state` a local-spec checkpoint lacks: None, as TE accepts
            if name.endswith("_extra_state"):
                state.setdefault(name, None)
        module.load_state_dict(state, strict=True)


def load_megatron(path, chunks, layout, flag: str) -> str:
    """The model weights (only) of the Megatron checkpoint at `path` (a root or a dist_checkpointing
    directory; `flag` names it in errors) into this rank's chunks; returns what was loaded."""
    found = locate(path, flag)
    where = f"{flag} {path}"
    if found.fmt == TORCH_DIST:
        load_dist(found.ckpt_dir, chunks, where)
        return f"torch_dist {found.ckpt_dir}"
    iteration = load_torch(found.root, chunks, layout, where)
    return f"torch {found.root / mcore_layout.iteration_dir_name(iteration)}"


def load_adapters(chunks: list, ckpt_path: str, hf_config, config, margs, layout) -> dict:
    """Wrap `chunks` (base weights already loaded) with the LoRA of a `train --lora-rank` checkpoint and load its
    adapters. Returns the checkpoint's saved args."""
    from megatron_patch.models.lora import ADAPTER_MARK, adapters_only, apply_lora

    common = safe_load.load_common(ckpt_path)
    saved = common.get("args") or {}
    if not saved.get("lora_rank"):
        raise UserError(f"--mcore-path {ckpt_path} was not trained with --lora-rank (no adapters to compare)")
    apply_lora(chunks, hf_config, config, margs, layout, int(saved["lora_rank"]),
               float(saved.get("lora_alpha") or saved["lora_rank"]), 0.0, saved["lora_target"], 0)
    metadata = sharded_metadata()
    keys = model_keys(chunks)
    request = {k: adapters_only(c.sharded_state_dict(metadata=metadata)) for k, c in zip(keys, chunks)}
    loaded = safe_load.dist_load(request, ckpt_path)
    for k, c in zip(keys, chunks):
        result = c.load_state_dict(loaded[k], strict=False)
        if result.unexpected_keys or any(ADAPTER_MARK in m for m in result.missing_keys):
            raise UserError(f"--mcore-path {ckpt_path}: adapters do not match the model "
                            f"({result.unexpected_keys[:3]} {[m for m in result.missing_keys if ADAPTER_MARK in m][:3]})")
    return saved
