"""A streaming torch_dist writer: one process, about one tensor in memory, every input byte read once.

A torch_dist checkpoint (megatron-core dist_checkpointing over torch DCP) stores global tensors: layers
by global index, experts along a global axis, TP shards as chunks of one tensor. Megatron reshards on
load, so the file set written for a TP1/PP1/EP1 model loads at any TP/PP/EP/ETP (only the vocab padding
depends on TP: the model is built with the target layout's padded vocab).

How: a GPTModel is built on the meta device at TP1 (a 1-rank gloo group for megatron's parallel
state), its `sharded_state_dict()` goes through megatron's own save pieces (save_preprocess, the
sharded-key grouping, mcore_to_pyt_state_dict, MCoreSavePlanner) and torch's synchronous
FileSystemWriter with a write loop that keeps nothing (megatron's FileSystemWriterAsync stages every
tensor up front; torch's own loop keeps every tensor it wrote until the file is closed). The planner's
`resolve_data` makes each write item's tensor only when the writer asks for it: the parameter is cut
from the source through the family table (engine.ShardPlan at TP1) and, for a ShardedTensorFactory
(e.g. the SwiGLU fc1 halves), megatron's build_fn is re-run on the real tensor to get the chunk.
common.pt and metadata.json are written with megatron's helpers, as dist_checkpointing.save does.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import queue
import threading
from pathlib import Path

import torch

from megatron_patch.errors import UserError

from .engine import RankPosition, ShardPlan
from .key_map import Naming, te_sharded
from .tensors import RELEASE_BYTES, dtype_overrides, tensor_bytes


# ---------------------------------------------------------------------------------------------------
# a TP1 model on the meta device, inside a 1-rank process group
# ---------------------------------------------------------------------------------------------------
_depth = 0  # single_rank nesting: a reader's block may hold a writer's (reshard torch_dist -> torch_dist)


@contextlib.contextmanager
def single_rank():
    """torch.distributed (gloo, world 1), the runtime patches and megatron's parallel state at TP1 for
    the block. The process group and runtime are torn down again if this set them up; the parallel
    state is always destroyed (hf2mcore and reshard run outside any training job). A nested block
    reuses the outer one's setup."""
    global _depth
    if _depth:
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
        return
    import torch.distributed as dist

    from megatron.core import parallel_state

    from megatron_patch import runtime
    from megatron_patch.models.builder import ParallelLayout, initialize_parallel

    own_runtime = runtime._STATE["device"] is None
    runtime.setup()
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise RuntimeError("torch_dist conversion runs in one process: call it outside a multi-rank job")
    _depth = 1
    try:
        initialize_parallel(ParallelLayout())
        yield
    finally:
        _depth = 0
        parallel_state.destroy_model_parallel()
        if own_group:
            dist.destroy_process_group()
        if own_runtime:
            runtime.teardown()


def meta_model(hf_config, dtype: torch.dtype, padded_vocab: int):
    """The GPTModel at TP1/PP1/EP1 on the meta device (no memory, no initialisation)."""
    from megatron_patch.models.builder import ParallelLayout, build_family_model

    # CPU initialisation: parameters are created without an explicit device, so on meta
    with torch.device("meta"):
        (model,), _, _ = build_family_model(hf_config, ParallelLayout(), vocab_size=padded_vocab, device="meta",
                                            use_cpu_initialization=True, perform_initialization=False,
                                            **dtype_overrides(dtype))
    return model


def tp1_plan(source, tp: int = 1, padded_vocab: int | None = None) -> ShardPlan:
    """The family table at TP1/PP1/EP1 with the vocab padded for `tp`, or to `padded_vocab` rows (what
    the checkpoint stores)."""
    from megatron_patch.models.builder import ParallelLayout

    plan = ShardPlan(source.family, source.hf_config, ParallelLayout())
    padded = padded_vocab or plan.model_args.padded_vocab_size(tp)
    plan.ctx = dataclasses.replace(plan.ctx, padded_vocab_size=padded)
    return plan


def output_bytes(plan: ShardPlan, meta, dtype: torch.dtype) -> int:
    """Bytes the checkpoint's tensors take (every parameter once), from a dry run on meta tensors."""
    (sd,) = plan.rank_state_dicts(meta, RankPosition(), dtype)
    return sum(tensor_bytes(t) for t in sd.values())


# ---------------------------------------------------------------------------------------------------
# write items -> tensors made on demand
# ---------------------------------------------------------------------------------------------------
def saved_tensors(entry) -> list:
    """The ShardedTensors a state-dict entry saves (a factory builds several; replicas save nothing)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory, is_main_replica

    if isinstance(entry, ShardedTensorFactory):
        out = entry.build()
        tensors = list(nested_values(out)) if isinstance(out, (dict, list)) else [out]
    else:
        tensors = [entry] if isinstance(entry, ShardedTensor) else []
    return [t for t in tensors if is_main_replica(t.replica_id)]


def table_rows(plan: ShardPlan) -> dict:
    """TP1 parameter name -> table row, in table order."""
    return {plan.local_name(row, place): row for row, place in plan.rows_for(RankPosition())}


def table_entries(plan: ShardPlan, model_sd: dict) -> dict:
    """The model's sharded-state-dict entries of the table's parameters, in table order; the table and
    the model must agree both ways (entries that save nothing, e.g. _extra_state, are left out)."""
    rows = table_rows(plan)
    saved = {name: entry for name, entry in model_sd.items() if saved_tensors(entry)}
    extra = [name for name in saved if name not in rows]
    if extra:
        raise UserError(f"family table and model disagree: the model saves {extra[0]}, the "
                        f"{plan.family.name} table has no row for it")
    missing = [name for name in rows if name not in saved]
    if missing:
        raise UserError(f"family table and model disagree: the model has no parameter {sorted(missing)[0]}")
    return {name: saved[name] for name in rows}


class TensorMaker:
    """Parameter tensors of the TP1 model from the source, one at a time, keyed by write item.

    `index` maps (checkpoint key, global offset) -> (parameter name, factory or None, meta parameter).
    A parameter is cut once and kept until every chunk of it has been handed out (the writer asks for
    them in a row); the input is unmapped every RELEASE_BYTES."""

    def __init__(self, plan: ShardPlan, source, model_sd: dict, dtype: torch.dtype, progress=None):
        self.plan, self.source, self.dtype, self.progress = plan, source, dtype, progress
        self.rows = table_rows(plan)
        self.index: dict[tuple, tuple] = {}
        self.left: dict[str, int] = {}
        for name, entry in table_entries(plan, model_sd).items():
            for st in saved_tensors(entry):
                factory = entry if st is not entry else None
                like = entry.data if factory is not None else st.data  # the meta parameter
                self.index[(st.key, tuple(st.global_offset))] = (name, factory, like)
                self.left[name] = self.left.get(name, 0) + 1
        self.cache: dict[str, torch.Tensor] = {}
        self.read_since = 0
        self.tensors = self.bytes = 0

    def read_order(self, grouped: dict) -> list[str]:
        """The HF tensors the writer reads, in order: DCP asks for the items checkpoint key by key."""
        names = dict.fromkeys(self.index[(st.key, tuple(st.global_offset))][0] for sts in grouped.values()
                              for st in sts if (st.key, tuple(st.global_offset)) in self.index)
        return [hf for name in names for hf in self.rows[name].hf]

    def param(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The whole TP1 parameter, in the model's dtype (megatron keeps e.g. expert_bias in fp32)."""
        if name not in self.cache:
            tensor = self.plan.shard_row(self.rows[name], self.source.read, 0, self.dtype).to(like.dtype)
            if tuple(tensor.shape) != tuple(like.shape):
                raise UserError(f"{name}: the source gives shape {tuple(tensor.shape)}, the model expects "
                                f"{tuple(like.shape)}; config and weights disagree")
            self.cache[name] = tensor
            self.tensors += 1
            self.read_since += tensor_bytes(tensor)
        return self.cache[name]

    def make(self, key: str, offset: tuple) -> torch.Tensor:
        """The tensor of one write item (checkpoint key, global offset)."""
        name, factory, like = self.index[(key, offset)]
        first = name not in self.cache
        full = self.param(name, like)
        if factory is None:
            out = full
        else:  # megatron's own split, re-run on the real tensor: the chunk at this offset
            out = next(st.data for st in saved_tensors(dataclasses.replace(factory, data=full))
                       if st.key == key and tuple(st.global_offset) == offset)
            out = out.clone(memory_format=torch.contiguous_format)  # own memory: `full` can go
        self._done(name)
        nbytes = tensor_bytes(out)
        self.bytes += nbytes
        if self.progress is not None:
            self.progress.update(nbytes, int(first))
        return out

    def _done(self, name: str) -> None:
        self.left[name] -= 1
        if not self.left[name]:
            del self.cache[name]
            if self.read_since >= RELEASE_BYTES:
                self.source.release()
                self.read_since = 0


def streaming_planner(maker: TensorMaker):
    """MCoreSavePlanner whose tensor write items are made on demand (BytesIO items as megatron's)."""
    from torch.distributed.checkpoint.planner import WriteItemType

    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner

    class StreamingSavePlanner(MCoreSavePlanner):
        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            meta = super().resolve_data(write_item)  # the meta chunk: shape and dtype to produce
            index = write_item.index
            tensor = maker.make(index.fqn, tuple(index.offset))
            if tensor.dtype != meta.dtype:
                raise RuntimeError(f"{index.fqn}: made {tensor.dtype}, the checkpoint metadata says {meta.dtype}")
            return tensor.reshape(meta.shape)  # prepended axes (the expert index) are size-1 dims

    return StreamingSavePlanner(flatten_state_dict=False)


class BackgroundWriteStream(io.RawIOBase):
    """A write-only stream whose bytes a thread writes to `raw`: making the next tensor (reads, slicing,
    serialisation) overlaps the disk writes of the previous one. At most `max_pending` bytes wait in
    memory; tell() counts the bytes accepted; flush() does not wait (torch flushes after every item),
    finish() does. A failed write is raised by the next call."""

    def __init__(self, raw, max_pending: int = 128 * 1024**2):
        super().__init__()
        self.raw, self.max_pending = raw, max_pending
        self.pos, self.pending, self.error = raw.tell(), 0, None
        self.chunks: queue.Queue = queue.Queue()
        self.room = threading.Condition()
        self.thread = threading.Thread(target=self._drain, name="torch_dist-writer", daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        while (chunk := self.chunks.get()) is not None:
            try:
                if self.error is None:
                    self.raw.write(chunk)
            except BaseException as err:  # noqa: BLE001 - handed to the producer
                self.error = err
            with self.room:
                self.pending -= len(chunk)
                self.room.notify_all()

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def writable(self) -> bool:
        return True

    def _wait(self, limit: int) -> None:
        with self.room:
            self.room.wait_for(lambda: self.pending <= limit)

    def write(self, b) -> int:
        self._check()
        size = memoryview(b).nbytes
        if size > self.max_pending:  # too big to stage a copy of: write it here, in order, once drained
            self._wait(0)
            self._check()
            self.raw.write(b)
        else:
            chunk = bytes(b)  # the caller may reuse its buffer after write() returns
            self._wait(self.max_pending - size)
            with self.room:
                self.pending += size
            self.chunks.put(chunk)
        self.pos += size
        return size

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        self._check()

    def finish(self) -> None:
        self.chunks.put(None)
        self.thread.join()
        self._check()
        self.raw.flush()


def one_file_writer(path: Path):
    """torch's FileSystemWriter (planning, .metadata) writing one file, each item as soon as it is made
    and dropped once written: torch's own write loop keeps every tensor it wrote until the file is closed
    (a dict it only needs for its safetensors format), which would hold the whole model (or keep every
    input file mapped). Items are serialised by torch's `_write_item`, so the file reads as torch's.
    No fsync, like the torch-format writer (the output directory is renamed into place when complete)."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _write_item
    from torch.distributed.checkpoint.planner import WriteItemType
    from torch.futures import Future

    class OneFileWriter(FileSystemWriter):
        def write_data(self, plan, planner):
            name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
            results = []
            with self.fs.create_stream(self.fs.concat_path(self.path, name), "wb") as raw:
                stream = BackgroundWriteStream(raw)
                try:
                    for item in sorted(plan.items, key=lambda i: i.type != WriteItemType.BYTE_IO):  # bytes first
                        data = planner.resolve_data(item)
                        if torch.is_tensor(data) and data.untyped_storage().nbytes() != data.nbytes:
                            data = data.clone()  # torch.save writes a view's whole storage
                        results.append(_write_item(self.transforms, stream, data, item, name,
                                                   self.serialization_format))
                        del data
                finally:
                    stream.finish()
            done = Future()
            done.set_result(results)
            return done

    return OneFileWriter(path, sync_files=False)


# ---------------------------------------------------------------------------------------------------
# the save
# ---------------------------------------------------------------------------------------------------
def save(source, plan: ShardPlan, dtype: torch.dtype, ckpt_dir: Path, common: dict, progress=None,
         naming: Naming | None = None) -> dict:
    """Write `source` (HFSource or a Megatron PlanSource) as a torch_dist checkpoint into the empty
    directory ckpt_dir through `plan`, the family table at TP1 (tp1_plan: the vocab padded for the target TP),
    parameters in dtype; `common` (checkpoint_version,
    iteration, args) goes to common.pt. Returns {"tensors", "bytes"} written."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.serialization import (get_default_save_common_strategy,
                                                                get_default_save_sharded_strategy)
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
    from megatron.core.dist_checkpointing.strategies.torch import (_replace_state_dict_keys_with_sharded_keys,
                                                                   mcore_to_pyt_state_dict)

    with single_rank():
        model_sd = meta_model(source.hf_config, dtype, plan.ctx.padded_vocab_size).sharded_state_dict()
        if naming is not None and naming.is_te:  # the keys a TE-spec model asks for
            model_sd = te_sharded(model_sd)
        maker = TensorMaker(plan, source, model_sd, dtype, progress)
        # from here on as dist_checkpointing.save with the torch_dist strategy, synchronously
        sharded, common_sd = save_preprocess({"model": model_sd, **common})
        get_default_save_common_strategy().save_common(common_sd, ckpt_dir)
        grouped, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded, keep_only_main_replica=True)
        if hasattr(source, "expect"):  # a source that reads in groups (dist_reader): in the writer's order
            source.expect(maker.read_order(grouped))
        try:
            dcp.save(mcore_to_pyt_state_dict(grouped, is_loading=False), planner=streaming_planner(maker),
                     storage_writer=one_file_writer(ckpt_dir))
        except CheckpointException as err:  # DCP wraps whatever a step raised (a UserError, ^C): unwrap
            raise next(iter(err.failures.values()))[0] from None
        strategy = get_default_save_sharded_strategy()
        save_config(CheckpointingConfig(strategy.backend, strategy.version), str(ckpt_dir))  # last: "complete"
    source.release()
    return {"tensors": maker.tensors, "bytes": maker.bytes}
