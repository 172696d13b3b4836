"""Where a Megatron checkpoint is and which format it has: decided here for convert, compare and training.

    ROOT/latest_checkpointed_iteration.txt   the tracker Megatron-LM's --save writes: "<iteration>" or "release"
    ROOT/iter_0000100/ (or ROOT/release/)    metadata.json: torch_dist (dist_checkpointing);
                                             mp_rank_*/model_optim_rng.pt: Megatron-LM's legacy torch layout
    DIR/metadata.json                        a bare dist_checkpointing directory (an iter_* directory itself)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_patch.errors import UserError

from .mcore_layout import TRACKER_NAME, iteration_dir_name, read_tracker

TORCH, TORCH_DIST = "torch", "torch_dist"
DIST_METADATA = "metadata.json"  # what megatron's dist_checkpointing writes last (its "complete" mark)


def is_dist_checkpoint(path) -> bool:
    return (Path(path) / DIST_METADATA).is_file()


@dataclass(frozen=True)
class Located:
    fmt: str                  # TORCH or TORCH_DIST
    root: Path                # the path given
    iteration: int | str | None  # None: a bare dist_checkpointing directory
    ckpt_dir: Path            # torch_dist: the dist_checkpointing directory; torch: the iteration directory


def locate(path, flag: str = "--mcore-path") -> Located:
    """The format and directories of the Megatron checkpoint at `path` (a root with the tracker, or a
    dist_checkpointing directory); anything else is one UserError naming `flag`."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"{flag} {path}: Megatron checkpoint directory not found (check the path)")
    if is_dist_checkpoint(root):
        return Located(TORCH_DIST, root, None, root)
    iteration = read_tracker(root)
    if iteration is None:
        raise UserError(f"{flag} {path}: neither {TRACKER_NAME} (a checkpoint root) nor {DIST_METADATA} (a "
                        "dist_checkpointing directory): not a Megatron checkpoint (point at the checkpoint root)")
    ckpt_dir = root / iteration_dir_name(iteration)
    if not ckpt_dir.is_dir():
        raise UserError(f"{root / TRACKER_NAME} names {ckpt_dir.name}, which does not exist in {root} (fix the tracker file)")
    return Located(TORCH_DIST if is_dist_checkpoint(ckpt_dir) else TORCH, root, iteration, ckpt_dir)


def train_checkpoint_dir(root) -> Path | None:
    """The directory of the latest complete training checkpoint under `root` (None if there is none or it
    is a model-only checkpoint, e.g. converted from HF): what `train` resumes from."""
    from . import safe_load

    iteration = read_tracker(root)
    if iteration is None or iteration == "release":
        return None
    path = Path(root) / iteration_dir_name(iteration)
    if not path.is_dir():
        raise UserError(f"{Path(root) / TRACKER_NAME} names {path.name}, which does not exist (fix the tracker)")
    if not is_dist_checkpoint(path):
        return None
    return path if "opt_param_scheduler" in safe_load.load_common(path) else None
