"""Megatron-LM's legacy `--ckpt-format torch` checkpoint layout, as megatron/training/checkpointing.py
writes and reads it:

    ROOT/latest_checkpointed_iteration.txt      "<iteration>" or "release"
    ROOT/iter_0000100/ (or ROOT/release/)
        mp_rank_{tp:02d}                         PP == 1, EP == 1
        mp_rank_{tp:02d}_{pp:03d}                PP  > 1, EP == 1
        mp_rank_{tp:02d}_{ep:03d}                PP == 1, EP  > 1
        mp_rank_{tp:02d}_{pp:03d}_{ep:03d}       PP  > 1, EP  > 1
            model_optim_rng.pt                   {"model": sd} or {"model0": sd0, "model1": ...} (VPP),
                                                 "checkpoint_version": 3.0, "iteration", "args"

`sizes` is a dict with keys tp, pp, ep and optionally etp (expert tensor parallel, defaults to tp),
vpp (virtual pipeline chunks per stage, 1 = none) and the uneven pipeline split under Megatron-LM's
arg names (decoder_first_pipeline_num_layers, ..., builder.SPLIT_FIELDS). An uneven checkpoint's
rank directories are named as any other (the split lives in the stored args).
"""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import torch

from megatron_patch.checkpoint.safe_load import torch_load
from megatron_patch.errors import UserError

TRACKER_NAME = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"
# what our converters add to a checkpoint root: the HF config + tokenizer, and how it was made
META_NAME = "convert_meta.json"
HF_CONFIG_DIR = "hf_config"
CHECKPOINT_VERSION = 3.0  # Megatron-LM's; training checkpoints store it too
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")


def iteration_dir_name(iteration: int | str) -> str:
    if iteration == "release":
        return "release"
    return f"iter_{int(iteration):07d}"


def rank_dir_name(tp: int, pp: int, ep: int, pp_size: int, ep_size: int) -> str:
    # Megatron adds the PP rank only when PP > 1 and the EP rank only when EP > 1.
    name = f"mp_rank_{tp:02d}" if pp_size == 1 else f"mp_rank_{tp:02d}_{pp:03d}"
    if ep_size > 1:
        name += f"_{ep:03d}"
    return name


def checkpoint_rank_dir(root, iteration, tp: int, pp: int, ep: int, pp_size: int, ep_size: int) -> Path:
    return Path(root) / iteration_dir_name(iteration) / rank_dir_name(tp, pp, ep, pp_size, ep_size)


def layout_of(sizes: dict):
    """The ParallelLayout of a sizes dict (keys as layout_dict writes them; etp defaults to tp, vpp to none):
    validated and normalised by ParallelLayout itself."""
    from megatron_patch.models.builder import ParallelLayout

    return ParallelLayout(tp=int(sizes["tp"]), pp=int(sizes.get("pp", 1)), ep=int(sizes.get("ep", 1)),
                          etp=int(sizes["etp"]) if sizes.get("etp") else None,
                          vpp=int(sizes["vpp"]) if sizes.get("vpp") else None, **split_of(sizes))


def _normalise_sizes(sizes: dict) -> dict:
    lay = layout_of(sizes)
    return {"tp": lay.tp, "pp": lay.pp, "ep": lay.ep, "etp": lay.expert_tp, "vpp": lay.vpp or 1}


def split_of(source) -> dict:
    """The uneven pipeline split of a sizes dict or a stored args Namespace (defaults: the even split).
    A layout Megatron-LM stored as a parsed PipelineParallelLayerLayout is turned back into its string."""
    from megatron_patch.models.builder import SPLIT_FIELDS

    get = source.get if isinstance(source, dict) else lambda k, d=None: getattr(source, k, d)
    out = {}
    for name in SPLIT_FIELDS:
        value = get(name, None)
        if name == "pipeline_model_parallel_layout" and value is not None and not isinstance(value, str):
            value = getattr(value, "input_data", None) if isinstance(getattr(value, "input_data", None), str) \
                else str(value)
        out[name] = bool(value) if name.startswith("account_for") else (value or None)
    return out


def layout_dict(layout) -> dict:
    """The sizes and pipeline split a checkpoint depends on (convert_meta.json; this module's `sizes`)."""
    sizes = {"tp": layout.tp, "pp": layout.pp, "ep": layout.ep, "etp": layout.expert_tp, "vpp": layout.vpp or 1}
    return {**sizes, **{k: v for k, v in layout.split_fields().items() if v}}  # an even split adds nothing


def describe_layout(layout) -> str:
    """TP2xPP1xEP4xETP2 (+VPPn, + the uneven split): what a checkpoint depends on (not sequence parallel)."""
    text = f"TP{layout.tp}xPP{layout.pp}xEP{layout.ep}xETP{layout.expert_tp}"
    text += f"xVPP{layout.vpp}" if layout.vpp and layout.vpp > 1 else ""
    split = layout.describe_split()
    return text + (f" ({split})" if split else "")


def layout_key(sizes: dict) -> dict:
    """Sizes and split with every default filled in: two checkpoints (or a checkpoint and a run) load into
    the same model chunks exactly when their keys are equal."""
    return {**_normalise_sizes(sizes), **split_of(sizes)}


def build_args(sizes: dict, args: dict) -> argparse.Namespace:
    """The `args` Namespace Megatron-LM's loader reads (check_checkpoint_args, load_args_from_checkpoint)."""
    split = split_of(sizes)
    sizes = _normalise_sizes(sizes)
    merged = dict(args)
    merged.update(split)
    merged.update(
        tensor_model_parallel_size=sizes["tp"],
        pipeline_model_parallel_size=sizes["pp"],
        expert_model_parallel_size=sizes["ep"],
        expert_tensor_parallel_size=sizes["etp"],
        # Megatron uses None (not 1) for "no virtual pipeline".
        virtual_pipeline_model_parallel_size=sizes["vpp"] if sizes["vpp"] > 1 else None,
    )
    merged.setdefault("ckpt_format", "torch")
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size"):
        if key in args and args[key] is not None and int(args[key]) != merged[key]:
            raise ValueError(f"args[{key!r}]={args[key]} disagrees with sizes {sizes}")
    return argparse.Namespace(**merged)


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".partial")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_rank(root, iteration, tp: int, pp: int, ep: int, sizes: dict, state_dicts: list, args: dict) -> Path:
    """Write one (tp, pp, ep) rank's model_optim_rng.pt; state_dicts holds one dict per VPP chunk."""
    norm = _normalise_sizes(sizes)
    if not (0 <= tp < norm["tp"] and 0 <= pp < norm["pp"] and 0 <= ep < norm["ep"]):
        raise ValueError(f"rank (tp={tp}, pp={pp}, ep={ep}) outside sizes {norm}")
    if len(state_dicts) != norm["vpp"]:
        raise ValueError(f"got {len(state_dicts)} state dicts for vpp={norm['vpp']}")
    checkpoint = {
        "args": build_args(sizes, args),
        "checkpoint_version": CHECKPOINT_VERSION,
        # Megatron ignores the stored iteration of a release checkpoint and uses 0.
        "iteration": 0 if iteration == "release" else int(iteration),
    }
    if len(state_dicts) == 1:
        checkpoint["model"] = state_dicts[0]
    else:
        for i, sd in enumerate(state_dicts):
            checkpoint[f"model{i}"] = sd
    rank_dir = checkpoint_rank_dir(root, iteration, tp, pp, ep, norm["pp"], norm["ep"])
    rank_dir.mkdir(parents=True, exist_ok=True)
    path = rank_dir / MODEL_FILE
    _atomic_torch_save(checkpoint, path)
    return path


def write_latest(root, iteration) -> None:
    """The tracker, replaced atomically (temp file, fsync, rename): a process killed at any point leaves
    the previous one (training publishes a save by it)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / (TRACKER_NAME + ".tmp")
    with open(tmp, "w") as f:
        f.write("release" if iteration == "release" else str(int(iteration)))  # Megatron's: the bare value
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / TRACKER_NAME)


def read_tracker(root) -> int | str | None:
    """The iteration the tracker names ("release" or a number), or None when `root` holds no tracker."""
    tracker = Path(root) / TRACKER_NAME
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if text == "release":
        return "release"
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{tracker} contains {text!r}, expected an iteration number or 'release' (fix the file)") from None


def read_iteration(root) -> int | str:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"Megatron checkpoint directory not found: {root} (check the path)")
    iteration = read_tracker(root)
    if iteration is None:
        raise UserError(f"no {TRACKER_NAME} in {root}: not a Megatron torch checkpoint (point at the folder that holds it)")
    return iteration


def _load(path: Path) -> dict:
    # weights_only with Megatron's allowlist (the stored args are an argparse.Namespace): a checkpoint runs
    # no code. mmap=True: tensors are not read until used.
    checkpoint = torch_load(path, mmap=True)
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path} holds a {type(checkpoint).__name__}, not a Megatron checkpoint dict (re-copy it)")
    return checkpoint


def read_layout(root) -> tuple[int | str, dict]:
    """Return (iteration, sizes) deduced from the rank directory names and the stored args."""
    iteration = read_iteration(root)
    iter_dir = Path(root) / iteration_dir_name(iteration)
    if not iter_dir.is_dir():
        raise UserError(f"{TRACKER_NAME} points at {iter_dir.name}, which does not exist in {root} (fix the tracker file)")
    ranks: dict[str, tuple] = {}  # directory name -> its numbers (2 to 3 of them are optional)
    for entry in iter_dir.iterdir():
        m = _RANK_DIR.match(entry.name)
        if m and (entry / MODEL_FILE).is_file():
            ranks[entry.name] = tuple(int(g) for g in m.groups() if g is not None)
    if not ranks:
        raise UserError(f"no mp_rank_*/{MODEL_FILE} in {iter_dir}: not a torch-format checkpoint (dist checkpoints are not supported here)")
    parts = {len(r) for r in ranks.values()}
    if len(parts) != 1:
        raise UserError(f"{iter_dir} mixes mp_rank_* naming schemes (remove stale rank directories)")
    parts = parts.pop()

    first = _load(iter_dir / min(ranks) / MODEL_FILE)  # min(): the all-zero rank
    args = first.get("args")
    tp_size = max(r[0] for r in ranks.values()) + 1
    if parts == 1:
        pp_size = ep_size = 1
    elif parts == 3:
        pp_size = max(r[1] for r in ranks.values()) + 1
        ep_size = max(r[2] for r in ranks.values()) + 1
    else:
        # mp_rank_TT_XXX is ambiguous (XXX = PP rank or EP rank): the stored args decide.
        second = max(r[1] for r in ranks.values()) + 1
        if (getattr(args, "pipeline_model_parallel_size", None) or 1) > 1:
            pp_size, ep_size = second, 1
        elif (getattr(args, "expert_model_parallel_size", None) or 1) > 1:
            pp_size, ep_size = 1, second
        else:
            raise UserError(f"cannot tell whether the mp_rank_XX_YYY directories in {iter_dir} are PP or EP ranks: the stored args give no parallel sizes (re-save with args)")
    vpp = getattr(args, "virtual_pipeline_model_parallel_size", None) or len(model_chunks(first))
    etp = getattr(args, "expert_tensor_parallel_size", None) or tp_size
    split = split_of(args or {})
    if pp_size > 1 and not hasattr(args, "decoder_first_pipeline_num_layers"):  # args from before uneven PP
        split.update(_detect_split(iter_dir, pp_size, ep_size))
    sizes = {"tp": tp_size, "pp": pp_size, "ep": ep_size, "etp": etp, "vpp": vpp}
    sizes.update({k: v for k, v in split.items() if v})  # an even split adds nothing

    for key, arg_name in (("tp", "tensor_model_parallel_size"), ("pp", "pipeline_model_parallel_size"), ("ep", "expert_model_parallel_size")):
        stored = getattr(args, arg_name, None)
        if stored is not None and stored != sizes[key]:
            raise UserError(f"{iter_dir}: rank directories give {key.upper()}={sizes[key]} but the stored args say {arg_name}={stored} (rank directories are missing; re-copy the checkpoint)")
    check_complete(root, iteration, sizes)
    return iteration, sizes


def present_ranks(root, iteration, sizes: dict) -> set[tuple[int, int, int]]:
    """The (tp, pp, ep) positions whose rank file exists."""
    norm = _normalise_sizes(sizes)
    return {(t, p, e) for t in range(norm["tp"]) for p in range(norm["pp"]) for e in range(norm["ep"])
            if (checkpoint_rank_dir(root, iteration, t, p, e, norm["pp"], norm["ep"]) / MODEL_FILE).is_file()}


def rank_holding(present: set, sizes: dict, tp: int, pp: int, ep: int, experts: bool) -> tuple[int, int, int]:
    """The rank file that holds what position (tp, pp, ep) needs: its own file when it exists, else (Megatron-LM
    and Pai-Megatron-Patch save only the ranks a run had: TP2 x EP2 x ETP1 on 2 GPUs writes mp_rank_00_000 and
    mp_rank_01_001) one that holds the same thing: for dense weights any EP rank of the same TP rank (they are
    replicated over EP); for experts any TP rank with the same expert-TP rank (etp = tp % ETP) of the same EP rank."""
    if (tp, pp, ep) in present:
        return tp, pp, ep
    etp = _normalise_sizes(sizes)["etp"]
    for t, p, e in sorted(present):
        if p == pp and ((e == ep and t % etp == tp % etp) if experts else t == tp):
            return t, p, e
    kind = f"the experts of EP rank {ep}" if experts else f"the weights of TP rank {tp}"
    raise UserError(f"no rank file holds {kind} at PP rank {pp} (missing {rank_dir_name(tp, pp, ep, sizes['pp'], sizes['ep'])}/"
                    f"{MODEL_FILE}; re-copy the checkpoint)")


def check_complete(root, iteration, sizes: dict) -> None:
    """Every TP rank's dense weights and every (EP rank, expert-TP rank)'s experts are in some rank file."""
    norm = _normalise_sizes(sizes)
    present = present_ranks(root, iteration, sizes)
    for p in range(norm["pp"]):
        for t in range(norm["tp"]):
            rank_holding(present, sizes, t, p, 0, experts=False)
        for e in range(norm["ep"]):
            for k in range(norm["etp"]):
                rank_holding(present, sizes, k, p, e, experts=True)


def _detect_split(iter_dir: Path, pp_size: int, ep_size: int) -> dict:
    """The first/last stage sizes from the decoder layers in each stage's rank file, for stored args that
    do not name a split (written before Megatron-LM had one): {} when the stages are even."""
    counts = []
    for pp in range(pp_size):
        chunks = model_chunks(_load(iter_dir / rank_dir_name(0, pp, 0, pp_size, ep_size) / MODEL_FILE))
        counts.append(sum(len({k.split(".")[2] for k in sd if k.startswith("decoder.layers.")}) for sd in chunks))
    middle = counts[1:-1] or [None]
    if len(set(counts)) == 1:
        return {}
    if len(set(middle)) > 1:
        raise UserError(f"{iter_dir}: the stages hold {counts} decoder layers, which no first/last split gives and "
                        "the stored args name no --pipeline-model-parallel-layout (re-save with args)")
    out = {"decoder_first_pipeline_num_layers": counts[0] if counts[0] != middle[0] else None}
    if pp_size > 2 and counts[-1] != middle[0]:
        out["decoder_last_pipeline_num_layers"] = counts[-1]
    return out


def load_rank_checkpoint(root, tp: int, pp: int, ep: int, sizes: dict | None = None, iteration=None) -> dict:
    """The whole saved dict of one rank (model chunks, args, iteration, ...)."""
    if sizes is None or iteration is None:
        found_iteration, found_sizes = read_layout(root)
        iteration = found_iteration if iteration is None else iteration
        sizes = found_sizes if sizes is None else sizes
    norm = _normalise_sizes(sizes)
    path = checkpoint_rank_dir(root, iteration, tp, pp, ep, norm["pp"], norm["ep"]) / MODEL_FILE
    if not path.is_file():
        raise UserError(f"missing {path} (re-copy the checkpoint)")
    return _load(path)


def model_chunks(checkpoint: dict) -> list[dict]:
    """The model state dicts of a loaded rank checkpoint, one per VPP chunk, in order."""
    if "model" in checkpoint:
        return [checkpoint["model"]]
    keys = sorted((k for k in checkpoint if re.fullmatch(r"model\d+", k)), key=lambda k: int(k[5:]))
    if not keys:
        raise UserError("checkpoint holds no 'model' or 'model0' entry: not a Megatron model checkpoint")
    return [checkpoint[k] for k in keys]


def read_rank(root, tp: int, pp: int, ep: int, sizes: dict | None = None, iteration=None) -> list[dict]:
    """One rank's model state dicts, one per VPP chunk. Pass sizes/iteration from read_layout to
    avoid re-deducing the layout for every rank."""
    return model_chunks(load_rank_checkpoint(root, tp, pp, ep, sizes, iteration))
