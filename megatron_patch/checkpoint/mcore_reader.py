"""Opening a Megatron checkpoint for conversion: format (locate), stored metadata, the HF config (its own
hf_config/ or --hf-config), the stored args checked against that config; then its tensors as a PlanSource:
a torch-format checkpoint from its memory-mapped rank files (`TorchSource`), a torch_dist one a group of
parameters at a time (dist_reader). Either spec's names are read (key_map); a key in neither set is
refused before anything is written."""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_patch.errors import UserError

from . import mcore_layout, safe_load
from .dist_reader import open_dist
from .engine import EMBEDDING, RankPosition, ShardPlan
from .hf_config import load_hf_config
from .key_map import check_known, down_projection_rows, read_local_rank
from .locate import locate
from .mcore_layout import HF_CONFIG_DIR, META_NAME
from .output_check import check_rank_layers, check_stored_args, expected_shapes
from .plan_source import PlanSource
from .tensors import DTYPES


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
        return mcore_layout.layout_of(self.sizes or {"tp": 1})

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


def open_mcore(path, hf_config_dir=None) -> McoreCheckpoint:
    """Detect the format, read the stored metadata and the HF config; fail with one line otherwise."""
    found = locate(path)
    root, fmt, iteration, ckpt_dir = found.root, found.fmt, found.iteration, found.ckpt_dir
    meta_root = root
    if iteration is None and not (root / META_NAME).is_file() and (root.parent / META_NAME).is_file():
        meta_root = root.parent  # a bare dist_checkpointing directory inside a converted checkpoint
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
    with open_dist(ck) as source:
        yield source
