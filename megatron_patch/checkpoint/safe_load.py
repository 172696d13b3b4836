"""Reading checkpoints without running code from them.

A pickle can name any importable callable and have the loader call it, so a checkpoint downloaded from
a hub or shared between teams must never be unpickled freely. Every reader of ours goes through here:

- `.pt` files (Megatron-LM's model_optim_rng.pt, dist_checkpointing's common.pt and the ShardedObjects
  stored inside torch_dist files) load with torch.load(weights_only=True) and an explicit allowlist:
  megatron-core's own SAFE_GLOBALS (argparse.Namespace, its enums and OptimizerConfig, numpy arrays as
  np.random.get_state() returns them, ...) plus numpy's scalar/dtype classes. Torch dtypes, tensors,
  OrderedDict and plain containers are allowed by weights_only itself.
- torch DCP's `.metadata` (plain pickle in torch's FileSystemReader) goes through an unpickler that
  accepts only DCP's metadata classes, torch.Size, torch dtypes and layouts.

`install()` (idempotent) routes torch DCP's and megatron's own loaders (FileSystemReader.read_metadata,
DefaultLoadPlanner.load_bytes, TorchCommonLoadStrategy.load_common) through these, so
dist_checkpointing.load / load_common_state_dict are safe too. Anything else in a file is refused:
`UnsafeCheckpoint`, a UserError (one `error:` line, exit 2).
"""
from __future__ import annotations

import io
import pickle
import re
import zipfile
from pathlib import Path

import torch

from megatron_patch.errors import UserError, exception_chain


class UnsafeCheckpoint(UserError):
    """A checkpoint file holds an object that is not plain data: refused before anything runs."""


def _refused(source, what: str) -> UnsafeCheckpoint:
    return UnsafeCheckpoint(f"{source}: refused to load: it holds {what}, which is not checkpoint data (a pickled "
                            "object that could run code on load); only Megatron's own args, rng and optimizer "
                            "types are accepted. Re-create the checkpoint from a source you trust")


# ---------------------------------------------------------------------------------------------------
# torch.load
# ---------------------------------------------------------------------------------------------------
def _numpy_globals() -> list:
    """numpy's array/scalar rebuilders under both module names (numpy 2 pickles `numpy._core`, numpy 1
    `numpy.core`) and its dtype classes: what pickled numpy data (np.random.get_state()) names."""
    import numpy
    from numpy import dtypes

    out: list = [numpy.ndarray, numpy.dtype]
    out += [cls for cls in vars(dtypes).values() if isinstance(cls, type) and issubclass(cls, numpy.dtype)]
    from numpy._core import multiarray

    for name in ("_reconstruct", "scalar"):
        fn = getattr(multiarray, name)
        out += [(fn, f"numpy._core.multiarray.{name}"), (fn, f"numpy.core.multiarray.{name}")]
    return out


_ALLOWLIST: list | None = None


def allowlist() -> list:
    """The globals a Megatron checkpoint may name, besides what weights_only allows anyway."""
    global _ALLOWLIST
    if _ALLOWLIST is None:
        from megatron.core.safe_globals import SAFE_GLOBALS  # megatron's own list of what its checkpoints hold

        _ALLOWLIST = list(SAFE_GLOBALS) + _numpy_globals()
    return _ALLOWLIST


_GLOBAL_IN_MESSAGE = re.compile(r"(?:GLOBAL|global) ([\w.]+)")


def torch_load(source, *, mmap: bool = False, name: str | None = None):
    """torch.load of a file (path) or buffer with weights_only=True and the allowlist; a refused or damaged
    file is a UserError naming it (`name` describes a buffer)."""
    label = name or source
    if mmap and isinstance(source, (str, Path)) and not zipfile.is_zipfile(source):
        mmap = False  # torch's pre-1.6 (non-zip) format cannot be mapped; it is read weights-only all the same
    try:
        with torch.serialization.safe_globals(allowlist()):
            return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "weights only" in text.lower() or "weights_only" in text:
            m = _GLOBAL_IN_MESSAGE.search(text)
            raise _refused(label, m.group(1) if m else "an object weights_only refuses") from None
        raise UserError(f"cannot load {label} ({text.splitlines()[0][:200]}); the file is corrupt (re-copy it)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"cannot load {label} ({first}); the file is corrupt or truncated (re-copy it)") from None


# ---------------------------------------------------------------------------------------------------
# torch DCP .metadata
# ---------------------------------------------------------------------------------------------------
_DCP_META = "torch.distributed.checkpoint.metadata"
_METADATA_GLOBALS = {
    (_DCP_META, n) for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                             "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    # megatron's saver keeps every rank's save plan in the metadata (global_metadata.all_local_plans)
    ("torch.distributed.checkpoint.planner", n) for n in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData",
                                                          "BytesIOWriteData")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    # torch < 2.4 kept TensorProperties with the sharded tensors
    ("torch.distributed._shard.sharded_tensor.metadata", "TensorProperties"),
    ("torch.distributed._shard.sharded_tensor.metadata", "MEM_FORMAT_ENCODING"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")


def load_dcp_metadata(stream, source):
    """A torch DCP Metadata object from an open `.metadata` stream, through the restricted unpickler."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        metadata = _MetadataUnpickler(stream).load()
    except pickle.UnpicklingError as err:
        m = _GLOBAL_IN_MESSAGE.search(str(err))
        if m:
            raise _refused(source, m.group(1)) from None
        raise UserError(f"cannot read {source} ({err}); the file is corrupt (re-copy the checkpoint)") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
        raise UserError(f"cannot read {source} ({type(err).__name__}: {str(err)[:200]}); the file is corrupt "
                        "(re-copy the checkpoint)") from None
    if not isinstance(metadata, Metadata):
        raise UserError(f"{source} holds a {type(metadata).__name__}, not torch DCP metadata (re-copy the checkpoint)")
    return metadata


SCAN_LIMIT = 64 * 1024**2  # stored objects larger than this are checked when read, not up front


def check_dist_checkpoint(ckpt_dir) -> None:
    """Read the pickled parts of a torch_dist checkpoint directory through the safe loaders (its `.metadata`,
    `common.pt` and the model's and rng objects stored among the tensors, e.g. `_extra_state`), so that a
    tampered file is refused up front, whichever parts the command goes on to read. Optimizer objects and
    anything over SCAN_LIMIT are left to the (patched) loader that reads them."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from megatron.core.dist_checkpointing.core import maybe_load_config

    ckpt_dir = Path(ckpt_dir)
    try:
        maybe_load_config(str(ckpt_dir))  # metadata.json: JSON, not a pickle, but a damaged one was a traceback
    except (ValueError, TypeError) as err:
        raise UserError(f"{ckpt_dir / 'metadata.json'} cannot be read ({err}); the checkpoint is damaged (re-copy "
                        "it)") from None
    meta_path = ckpt_dir / ".metadata"
    if not meta_path.is_file():
        raise UserError(f"{ckpt_dir}: no .metadata, not a complete torch_dist checkpoint (re-copy it)")
    with open(meta_path, "rb") as stream:
        metadata = load_dcp_metadata(stream, meta_path)
    if (ckpt_dir / "common.pt").is_file():
        torch_load(ckpt_dir / "common.pt")
    objects = {k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    for index, info in (metadata.storage_data or {}).items():
        if index.fqn not in objects or index.fqn.startswith("optimizer") or info.length > SCAN_LIMIT:
            continue  # the optimizer's state can be terabytes: read (safely) only by a resume that needs it
        path = ckpt_dir / info.relative_path
        if Path(info.relative_path).is_absolute() or ".." in Path(info.relative_path).parts:
            raise UserError(f"{meta_path} points {index.fqn!r} at {info.relative_path}, outside the checkpoint "
                            "(a damaged or tampered checkpoint; re-copy it)")
        if getattr(info, "transform_descriptors", None):  # stored through a transform (e.g. compressed)
            continue  # read by DCP's own reader, whose load_bytes install() makes safe
        try:
            with open(path, "rb") as f:
                f.seek(info.offset)
                data = f.read(info.length)
        except OSError as err:
            raise UserError(f"cannot read {path} ({err.strerror}); re-copy the checkpoint") from None
        torch_load(io.BytesIO(data), name=f"the object {index.fqn!r} stored in {path}")


# ---------------------------------------------------------------------------------------------------
# routing torch DCP's and megatron's loaders through the above
# ---------------------------------------------------------------------------------------------------
def _safe_read_metadata(original):
    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = load_dcp_metadata(stream, path)
        if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader.read_metadata does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    return read_metadata


def _safe_load_bytes(original):
    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        obj = torch_load(value, name=f"the object {fqn!r} stored in the torch_dist checkpoint")
        if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes does, minus weights_only=False
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj

    return load_bytes


def _safe_load_common(original):
    def load_common(self, checkpoint_dir):
        from megatron.core.dist_checkpointing.core import CheckpointingException
        from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME

        path = Path(checkpoint_dir) / COMMON_STATE_FNAME
        if not path.is_file():
            raise CheckpointingException(f"Common file {path} does not exist")
        return torch_load(path)

    return load_common


_REGISTRY = None


def install() -> None:
    """Route DCP's metadata reader, its load planner's object loading and megatron's common.pt loading
    through the safe loaders (idempotent; for every device)."""
    global _REGISTRY
    if _REGISTRY is None:
        from megatron_patch.runtime.patching import PatchRegistry

        registry = PatchRegistry()
        why = "never unpickle untrusted checkpoint data (megatron_patch.checkpoint.safe_load)"
        registry.add("torch.distributed.checkpoint.filesystem.FileSystemReader.read_metadata", why, devices=("any",))(
            _safe_read_metadata)
        registry.add("torch.distributed.checkpoint.default_planner.DefaultLoadPlanner.load_bytes", why,
                     devices=("any",))(_safe_load_bytes)
        registry.add("megatron.core.dist_checkpointing.strategies.common.TorchCommonLoadStrategy.load_common", why,
                     devices=("any",))(_safe_load_common)
        _REGISTRY = registry
    _REGISTRY.apply("any")


def dist_load(sharded_state_dict: dict, ckpt_dir) -> dict:
    """megatron's dist_checkpointing.load with the safe loaders installed; a refusal inside torch DCP (which
    wraps what its steps raise) comes out as the UnsafeCheckpoint it is, a shape mismatch as megatron's
    CheckpointingException."""
    from megatron.core import dist_checkpointing

    install()
    check_dist_checkpoint(ckpt_dir)  # torch 2.13's DCP turns a refused .metadata into a bare AssertionError text
    try:
        return dist_checkpointing.load(sharded_state_dict, str(ckpt_dir))
    except BaseException as err:  # DCP's CheckpointException is a BaseException; re-raised unless a refusal is inside
        from megatron.core.dist_checkpointing.core import CheckpointingException

        # a refusal, or megatron's own mismatch report (a checkpoint of another shape), comes out as itself
        inner = refusal_in(err) or next(
            (e for e in exception_chain(err) if isinstance(e, CheckpointingException)), None)
        if inner is None or inner is err:
            raise
        raise inner from None


def load_common(ckpt_dir) -> dict:
    """dist_checkpointing.load_common_state_dict (common.pt) through the safe loader."""
    from megatron.core import dist_checkpointing

    install()
    return dist_checkpointing.load_common_state_dict(str(ckpt_dir))


def refusal_in(err: BaseException) -> UserError | None:
    """The UserError (e.g. UnsafeCheckpoint) raised inside torch DCP, which wraps what its steps raise
    (CheckpointException.failures), or None."""
    return next((e for e in exception_chain(err) if isinstance(e, UserError)), None)


__all__ = ["UnsafeCheckpoint", "torch_load", "load_dcp_metadata", "check_dist_checkpoint", "install", "refusal_in", "dist_load", "load_common", "allowlist"]
