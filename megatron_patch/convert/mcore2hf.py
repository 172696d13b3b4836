"""Megatron -> HF (`megatron-patch convert mcore2hf`), and the Megatron checkpoint readers.

    mcore2hf("/ckpt/dsv2", "/models/dsv2-hf")            # hf_config/ stored by hf2mcore
    mcore2hf("/megatron/run1", "/hf/out", hf_config_dir="/models/DeepSeek-V2-Lite")

torch format: the rank files of one pipeline stage at a time are memory-mapped, the TP/ETP shards of
each row merged back (engine.ShardPlan.hf_tensors) and written through ShardedSafetensorsWriter; the
mappings are dropped before the next stage, so the resident set is about one stage plus one output
shard. torch_dist: read in this process at TP1/PP1/EP1 (dist_reader), a group of parameters (about
256 MiB) at a time, so the resident set is about one group plus one output shard.

Either spec's names are read (key_map, detected per checkpoint): megatron-core's local or Transformer
Engine spec, SequentialMLP or grouped experts, Pai-Megatron-Patch's TP-split MLA down projections; a key in
neither set is refused before anything is written.

The HF config comes from the checkpoint's own hf_config/ (written by hf2mcore and reshard), else from
--hf-config; --hf-config also supplies the tokenizer files.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_patch.checkpoint import safe_load
from megatron_patch.checkpoint.output_check import (TensorCheck, check_rank_layers, check_stored_args, expected_shapes,
                                                    merge_error)
from megatron_patch.errors import UserError

from . import mcore_layout
from .atomic import atomic_output_dir
from .engine import EMBEDDING, KEEP_DTYPE_SUFFIXES, RankPosition, ShardPlan, cast
from .hf2mcore import (DTYPES, HF_CONFIG_DIR, META_NAME, RELEASE_BYTES, load_hf_config,
                       parse_dtype, refuse_existing, same_bits, tensor_bytes)
from .hf_writer import ShardedSafetensorsWriter, copy_tokenizer_files
from .key_map import check_known, down_projection_rows, read_local_rank
from .progress import ConversionProgress

DEFAULT_MAX_SHARD_BYTES = 1024**3


# ---------------------------------------------------------------------------------------------------
# opening a Megatron checkpoint
# ---------------------------------------------------------------------------------------------------
@dataclass
class McoreCheckpoint:
    root: Path
    fmt: str                  # "torch" or "torch_dist"
    iteration: object         # "release" / int (None for a bare dist_checkpointing directory)
    ckpt_dir: Path            # the iteration directory (torch: rank dirs; torch_dist: the dist checkpoint)
    hf_config: object
    family: object
    config_dir: Path          # where config.json came from
    tokenizer_dir: Path
    sizes: dict | None = None  # torch: tp, pp, ep, etp, vpp from the rank files and stored args
    meta: dict = field(default_factory=dict)

    def layout(self):
        from megatron_patch.models.builder import ParallelLayout

        s = self.sizes or {}
        return ParallelLayout(tp=s.get("tp", 1), pp=s.get("pp", 1), ep=s.get("ep", 1), etp=s.get("etp"),
                              vpp=s["vpp"] if s.get("vpp", 1) > 1 else None, **mcore_layout.split_of(s))

    def plan(self) -> ShardPlan:
        return ShardPlan(self.family, self.hf_config, self.layout())

    def common_args(self):
        try:
            return safe_load.load_common(self.ckpt_dir).get("args")
        except safe_load.UnsafeCheckpoint:
            raise
        except Exception:  # noqa: BLE001 - older checkpoints may not carry args
            return None

    def dtype(self) -> torch.dtype:
        """The stored parameter dtype."""
        if self.meta.get("dtype") in DTYPES:
            return DTYPES[self.meta["dtype"]]
        if self.fmt == "torch":
            s = self.sizes
            chunks = mcore_layout.read_rank(self.root, 0, 0, 0, s, self.iteration)
            for sd in chunks:
                if EMBEDDING in sd:
                    return sd[EMBEDDING].dtype
            return next(t.dtype for sd in chunks for t in sd.values() if torch.is_tensor(t) and t.is_floating_point())
        args = self.common_args()
        return getattr(args, "params_dtype", None) or torch.float32

    def padded_vocab(self) -> int | None:
        """torch_dist: the saved embedding's rows (the model to load into must have the same)."""
        from megatron_patch.models.families import model_args

        layout = self.meta.get("layout")
        if layout:
            return model_args(self.hf_config).padded_vocab_size(layout["tp"])
        return getattr(self.common_args(), "padded_vocab_size", None)


def _check_same_model(stored_config, stored: Path, given: Path) -> None:
    """--hf-config next to the checkpoint's own hf_config/ supplies the tokenizer; a config of another model
    there would pair these weights with another model's tokenizer, silently: refused."""
    if not (given / "config.json").is_file():
        raise UserError(f"no config.json in --hf-config {given} (point at the HF model directory)")
    ours, theirs = expected_shapes(stored_config), expected_shapes(load_hf_config(given))
    differ = next((k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)), None)
    if differ is not None:
        raise UserError(f"--hf-config {given / 'config.json'} is another model than the checkpoint's own "
                        f"{stored / 'config.json'} ({differ}: {list(theirs.get(differ) or [])} vs "
                        f"{list(ours.get(differ) or [])}); drop --hf-config or pass the model the checkpoint was made from")


def open_mcore(path, hf_config_dir=None) -> McoreCheckpoint:
    """Detect the format, read the stored metadata and the HF config; fail with one line otherwise."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"Megatron checkpoint directory not found: {root} (check --mcore-path)")
    meta_root = root
    if (root / "metadata.json").is_file():  # a bare dist_checkpointing directory
        fmt, iteration, ckpt_dir = "torch_dist", None, root
        if not (root / META_NAME).is_file() and (root.parent / META_NAME).is_file():
            meta_root = root.parent
    elif (root / mcore_layout.TRACKER_NAME).is_file():
        iteration = mcore_layout.read_iteration(root)
        ckpt_dir = root / mcore_layout.iteration_dir_name(iteration)
        fmt = "torch_dist" if (ckpt_dir / "metadata.json").is_file() else "torch"
    else:
        raise UserError(f"{root} is not a Megatron checkpoint: neither {mcore_layout.TRACKER_NAME} nor a "
                        "dist_checkpointing metadata.json (point --mcore-path at the checkpoint root)")
    if fmt == "torch_dist":
        safe_load.check_dist_checkpoint(ckpt_dir)  # a tampered pickle is refused before anything reads it
        safe_load.install()  # and megatron's / DCP's own loaders stay weights-only
    meta = {}
    if (meta_root / META_NAME).is_file():
        try:
            meta = json.loads((meta_root / META_NAME).read_text())
        except ValueError as err:
            raise UserError(f"{meta_root / META_NAME} is not valid JSON ({err}); fix or delete it") from None
    stored = meta_root / HF_CONFIG_DIR
    if (stored / "config.json").is_file():
        config_dir = stored
    elif hf_config_dir is not None:
        config_dir = Path(hf_config_dir)
        if not (config_dir / "config.json").is_file():
            raise UserError(f"no config.json in --hf-config {config_dir} (point at the HF model directory)")
    else:
        raise UserError(f"{root} holds no {HF_CONFIG_DIR}/config.json: pass --hf-config DIR (the HF model "
                        "directory the checkpoint was made from)")
    hf_config = load_hf_config(config_dir)
    if config_dir == stored and hf_config_dir is not None:
        _check_same_model(hf_config, stored, Path(hf_config_dir))
    from megatron_patch.models.families import family_for_config

    family = family_for_config(hf_config)
    tokenizer_dir = Path(hf_config_dir) if hf_config_dir is not None else config_dir
    sizes = None
    if fmt == "torch":
        iteration, sizes = mcore_layout.read_layout(root)
    ck = McoreCheckpoint(root, fmt, iteration, ckpt_dir, hf_config, family, config_dir, tokenizer_dir, sizes, meta)
    args = (mcore_layout.load_rank_checkpoint(root, 0, 0, 0, sizes, iteration).get("args") if fmt == "torch"
            else ck.common_args())
    check_stored_args(args, ck.plan(), ckpt_dir, config_dir / "config.json")
    expected_shapes(hf_config)  # a config transformers cannot build fails here, before anything is read
    return ck


# ---------------------------------------------------------------------------------------------------
# reading: a plan over rank-local tensors -> HF tensors
# ---------------------------------------------------------------------------------------------------
class PlanSource:
    """HF tensors made from a Megatron state (one row at a time): `read(name)`, `meta(name)`,
    `release()`, the same interface as hf2mcore.HFSource, so the writers take either."""

    def __init__(self, plan: ShardPlan, local, hf_config, family, config_dir=None, local_meta=None):
        self.plan, self.local = plan, local
        self.local_meta = local_meta or (lambda pos, c, n: self.local(pos, c, n).to("meta"))
        self.hf_config, self.family, self.config_dir = hf_config, family, config_dir
        self.check = TensorCheck(hf_config, Path(config_dir or ".") / "config.json", KEEP_DTYPE_SUFFIXES)
        self.local = lambda pos, chunk, name: self.check.local(name, local(pos, chunk, name))
        self._rows = plan.primary_rows()
        self._cached = None
        self._cache: dict[str, torch.Tensor] = {}

    def _row(self, name: str):
        try:
            return self._rows[name]
        except KeyError:
            raise UserError(f"tensor {name} is not made by the {self.family.name} table") from None

    def read(self, name: str) -> torch.Tensor:
        p = self._row(name)
        if p is not self._cached:  # GateUp / QKV rows make several HF tensors: merge once
            try:
                merged = self.plan.merge_row(p.row, p.place, self.local)
            except RuntimeError as err:
                raise merge_error(name, err, self.check.config_path) from None
            self._cache = {n: self.check.hf(n, t) for n, t in zip(p.row.hf, merged)}
            for copy in self.plan._copies_of.get(p.row.mcore, []):
                self._cache[copy] = merged[0]
            self._cached = p
        return self._cache[name]

    def meta(self, name: str) -> torch.Tensor:
        p = self._row(name)
        merged = self.plan.merge_row(p.row, p.place, self.local_meta)
        return merged[p.row.hf.index(name) if name in p.row.hf else 0]

    def keys(self) -> list[str]:
        return list(self._rows)

    def expect(self, hf_names) -> None:
        """A hint of the order the HF tensors will be read in (a source reading in groups plans them)."""

    def release(self) -> None:
        self._cached, self._cache = None, {}


class TorchSource(PlanSource):
    """A torch-format checkpoint; rank files are memory-mapped on first use and dropped by release()."""

    def __init__(self, ck: McoreCheckpoint):
        self.ck = ck
        self._files: dict[tuple, list] = {}
        self._present: set | None = None  # the rank files that exist (a run may have saved only some)
        super().__init__(ck.plan(), self._local, ck.hf_config, ck.family, ck.config_dir)

    def _local(self, pos, chunk: int, name: str) -> torch.Tensor:
        # An expert shard of ETP rank e lives in the file of TP rank e (etp = tp % ETP, ETP divides TP).
        tp = pos.etp if pos.etp else pos.tp
        if self._present is None:
            self._present = mcore_layout.present_ranks(self.ck.root, self.ck.iteration, self.ck.sizes)
        key = mcore_layout.rank_holding(self._present, self.ck.sizes, tp, pos.pp, pos.ep, experts=".mlp.experts." in name)
        if key not in self._files:  # local-spec names whatever spec wrote it (key_map); unknown keys refused
            self._files[key], self.naming = read_local_rank(self.ck.root, *key, self.ck.sizes, self.ck.iteration,
                                                            down_projection_rows(self.plan.mcore_config))
            where = mcore_layout.rank_dir_name(*key, self.ck.sizes["pp"], self.ck.sizes["ep"])
            check_rank_layers(self._files[key], self.plan, pos.pp, where)  # the clearer message first
            expected = self.plan.local_names(RankPosition(pp=key[1], ep=key[2]))
            for sd, names in zip(self._files[key], expected):
                check_known(sd, names, where)
        chunks = self._files[key]
        try:
            return chunks[chunk][name]
        except (KeyError, IndexError):
            where = mcore_layout.rank_dir_name(*key, self.ck.sizes["pp"], self.ck.sizes["ep"])
            raise UserError(f"{where}: no tensor {name} in model chunk {chunk}; the checkpoint does not match "
                            f"{self.ck.config_dir / 'config.json'} (wrong --hf-config?)") from None

    def release(self) -> None:
        super().release()
        self._files.clear()


@contextlib.contextmanager
def mcore_source(ck: McoreCheckpoint):
    """The checkpoint as a PlanSource for the block: TorchSource, or a streaming dist_reader.DistSource
    (in a 1-rank process group) for torch_dist."""
    if ck.fmt == "torch":
        source = TorchSource(ck)
        try:
            yield source
        finally:
            source.release()
        return
    from .dist_reader import open_dist

    with open_dist(ck) as source:
        yield source


def hf_stream(source: PlanSource, dtype=None):
    """(hf_name, tensor) for every HF tensor, one pipeline stage of the source at a time; what was read
    is dropped every RELEASE_BYTES (merged tensors own their memory; files are mapped again lazily)."""
    touched = 0
    for pp in range(source.plan.layout.pp):
        stream = source.plan.hf_tensors(source.local, pp=pp, dtype=dtype)
        while True:
            try:
                name, tensor = next(stream)
            except StopIteration:
                break
            except RuntimeError as err:
                raise merge_error("a tensor", err, source.check.config_path) from None
            source.check.hf(name, tensor)
            touched += tensor_bytes(tensor)
            if touched >= RELEASE_BYTES:
                source.release()
                touched = 0
            yield name, tensor
        source.release()


def hf_bytes(source: PlanSource, dtype=None) -> int:
    """What hf_stream yields, in bytes (from meta tensors)."""
    return sum(tensor_bytes(cast(p.row.mcore, source.meta(n), dtype)) for n, p in source.plan.primary_rows().items())


# ---------------------------------------------------------------------------------------------------
# writing / comparing HF tensor streams
# ---------------------------------------------------------------------------------------------------
def write_hf_stream(stream, out: Path, max_shard_bytes: int, progress) -> dict:
    writer = ShardedSafetensorsWriter(out, max_shard_bytes)
    tensors = nbytes = 0
    for name, tensor in stream:
        writer.add(name, tensor)
        tensors, nbytes = tensors + 1, nbytes + tensor_bytes(tensor)
        if progress is not None:
            progress.update(tensor_bytes(tensor))
        del tensor
    writer.close()
    return {"tensors": tensors, "bytes": nbytes}


def compare_stream(stream, hf_source, dtype, plan: ShardPlan) -> dict:
    """Compare (name, tensor) pairs with an HF checkpoint bit for bit (input cast to dtype if given)."""
    mcore_of = {n: p.row.mcore for n, p in plan.primary_rows().items()}
    wanted = set(hf_source.keys())
    seen, bad, nbytes, since = [], [], 0, 0
    for name, got in stream:
        if name not in wanted:  # an HF copy the input lacked (export adds it)
            continue
        mcore = mcore_of.get(name, name)
        expected = cast(mcore, hf_source.get(name), dtype)
        if mcore.endswith(KEEP_DTYPE_SUFFIXES) and got.dtype != expected.dtype:
            # megatron holds these in fp32 whatever the checkpoint had: exact if the values round trip
            got = got.to(expected.dtype) if torch.equal(got.to(expected.dtype).to(got.dtype), got) else got
        seen.append(name)
        nbytes += tensor_bytes(got)
        if not same_bits(got, expected):
            bad.append(name)
        del got, expected
        since += tensor_bytes(hf_source.meta(name))
        if since >= RELEASE_BYTES:  # unmap the input read so far
            hf_source.release()
            since = 0
    hf_source.release()
    return {"seen": len(seen), "bad": bad, "missing": sorted(wanted - set(seen)), "bytes": nbytes}


def write_hf_config(config_dir: Path, out: Path, dtype: torch.dtype | None) -> None:
    config = json.loads((Path(config_dir) / "config.json").read_text())
    if dtype is not None:
        name = str(dtype).replace("torch.", "")
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = name
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------
# mcore2hf
# ---------------------------------------------------------------------------------------------------
def mcore2hf(mcore_path, out, hf_config_dir=None, dtype: str | None = None, force: bool = False,
             max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, show_progress: bool = False) -> dict:
    target = parse_dtype(dtype)
    if max_shard_bytes <= 0:
        raise UserError("--max-shard-size must be positive")
    refuse_existing(out, force, inputs=[mcore_path, hf_config_dir])
    ck = open_mcore(mcore_path, hf_config_dir)
    with mcore_source(ck) as source, atomic_output_dir(out, force, inputs=[mcore_path, hf_config_dir]) as tmp:  # a mismatch fails before
        with ConversionProgress(hf_bytes(source, target), "mcore2hf", force=show_progress) as progress:
            write_hf_stream(hf_stream(source, target), tmp, max_shard_bytes, progress)
            stats, line = progress.summary()
        write_hf_config(ck.config_dir, tmp, target or ck.dtype())
        for src in dict.fromkeys((ck.config_dir, ck.tokenizer_dir)):
            copy_tokenizer_files(src, tmp)
    return {**stats, "line": line, "out": str(Path(out).absolute()), "format": ck.fmt}

