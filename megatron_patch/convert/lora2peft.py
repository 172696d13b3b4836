"""`convert lora2peft`: the adapters of a `train --lora-rank` checkpoint -> a peft adapter directory
(adapter_config.json + adapter_model.safetensors, HF module names, loadable by PeftModel.from_pretrained),
or with --merge a full HF model with W + alpha/r * B A (computed in fp32, stored in W's dtype).

The checkpoint stores each adapted linear's A and B with the layers stacked on a first axis, in TP1's layout
(see models/lora.py). A fused linear's B is split back per HF module by the family row's split kind, exactly
as its base weight is.

Routed experts (`--lora-target experts`) are exported as peft adapts transformers 5's fused 3-D expert parameters
(`target_parameters` mlp.experts.gate_up_proj / down_proj, peft's ParamWrapper): A [E*r, in] with row e*r+j, B
[out, r*E] with column j*E+e; the wrappers nest, gate_up_proj's adapter under `mlp.experts.base_layer`, down_proj's
under `mlp.experts`. --merge writes them into the per-expert gate_proj / up_proj / down_proj weights on disk.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from megatron_patch.errors import UserError

PEFT_PREFIX = "base_model.model."


def _checkpoint_dir(path: str) -> Path:
    from megatron_patch.checkpoint.locate import is_dist_checkpoint, train_checkpoint_dir
    from megatron_patch.checkpoint.mcore_layout import read_tracker

    p = Path(path)
    if not p.is_dir():
        raise UserError(f"--mcore-path {path}: not a directory")
    found = p if is_dist_checkpoint(p) else train_checkpoint_dir(p)
    if found is not None:
        return found
    iteration = read_tracker(p)
    if iteration is None:
        raise UserError(f"--mcore-path {path}: no training checkpoint (latest_checkpointed_iteration.txt) there")
    if iteration == "release":  # a converted model: the tracker exists, the adapters do not
        raise UserError(f"--mcore-path {path}: a converted (release) checkpoint holds no LoRA adapters; give the "
                        "--save directory of a `train --lora-rank` run")
    raise UserError(f"--mcore-path {path}: iteration {iteration} is not a torch_dist training checkpoint; give the "
                    "--save directory of a `train --lora-rank` run")


def read_adapters(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(saved training args, {checkpoint key: full tensor}) of the LoRA entries of a torch_dist checkpoint."""
    import torch.distributed.checkpoint as dcp

    from megatron_patch.checkpoint import safe_load

    ck = _checkpoint_dir(path)
    args = safe_load.load_common(ck).get("args") or {}  # installs the safe DCP metadata reader too
    if not args.get("lora_rank"):
        raise UserError(f"--mcore-path {path}: {ck.name} was not trained with --lora-rank (no adapters)")
    reader = dcp.FileSystemReader(str(ck))
    meta = reader.read_metadata().state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
             if ".lora_" in k and hasattr(m, "size")}
    if not state:
        raise UserError(f"--mcore-path {path}: {ck.name} holds no lora_A/lora_B tensors")
    dcp.load(state, storage_reader=reader, no_dist=True)
    return args, state


def peft_tensors(hf_config, args: dict, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{HF module path: (A [r, in], B [out, r])} for every adapted HF module of every layer."""
    from megatron_patch.models.families import family_for_config, model_args
    from megatron_patch.models.families.base import Row
    from megatron_patch.models.families.common import shard_context
    from megatron_patch.models.lora import EXPERTS, lora_targets

    family = family_for_config(hf_config)
    config = family.to_mcore_config(hf_config)
    margs = model_args(hf_config)
    ctx = shard_context(config, margs, 1)  # the stored layout is TP1's (models/lora.py)
    r = int(args["lora_rank"])
    out = {}
    for t in lora_targets(family, hf_config, args["lora_target"].split(",")):
        if t.split == EXPERTS:  # one 3-D entry per layer: A [E, r, in], B [E, out, r]
            out.update({t.hf[0].format(layer=layer): (a, b)
                        for layer, a, b in _layer_adapters(t, stored, hf_config.num_hidden_layers)})
            continue
        for layer, a, b in _layer_adapters(t, stored, hf_config.num_hidden_layers):
            parts = [b] if t.split is Row else t.split.merge([b], ctx)
            for j, p in enumerate(t.parts):
                name = t.hf[p].format(layer=layer)
                b_part = parts[0] if t.split is Row else parts[p]
                out[name] = (a[j * r:(j + 1) * r].contiguous(), b_part[:, j * r:(j + 1) * r].contiguous())
    return out


def _layer_adapters(t, stored: dict, num_layers: int):
    """(layer, A, B) of a target: megatron stores a block of identical layers stacked on a first axis
    (`decoder.layers.<linear>`), and per layer (`decoder.layers.<i>.<linear>`) where layers differ (DeepSeek's
    dense first layers, MoE)."""
    key = f"decoder.layers.{t.rel}"
    if key + ".lora_A" in stored and key + ".lora_B" in stored:
        a_all, b_all = stored[key + ".lora_A"], stored[key + ".lora_B"]
        return [(layer, a_all[layer], b_all[layer]) for layer in range(a_all.shape[0])]
    found = []
    for layer in t.layers if t.layers is not None else range(num_layers):
        a, b = (stored.get(f"decoder.layers.{layer}.{t.rel}.lora_{x}") for x in "AB")
        if a is None or b is None:
            raise UserError(f"checkpoint has no {key}.lora_A/lora_B for layer {layer} "
                            "(saved with other --lora-target?)")
        found.append((layer, a, b))
    return found


def _hf_config(hf_dir: str):
    from megatron_patch.checkpoint.hf_config import load_hf_config

    if not (Path(hf_dir) / "config.json").is_file():
        raise UserError(f"--hf-config {hf_dir}: no config.json there (give the base HF model directory)")
    return load_hf_config(hf_dir)


EXPERT_PEFT_MODULE = {"gate_up_proj": "base_layer", "down_proj": None}  # where peft nests each wrapper


def _peft_entry(name: str, a: torch.Tensor, b: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(peft module path, lora_A, lora_B) of an adapted module, or of a fused expert parameter (3-D A, B)."""
    if a.dim() == 2:
        return name, a, b
    experts, param = name.rsplit(".", 1)
    nest = EXPERT_PEFT_MODULE[param]
    e, r, fan_in = a.shape
    return (f"{experts}.{nest}" if nest else experts, a.reshape(e * r, fan_in),
            b.permute(1, 2, 0).reshape(b.shape[1], r * e))


def per_expert(adapters: dict) -> dict:
    """The fused expert entries split into the per-expert HF modules the safetensors hold (for --merge)."""
    out = {}
    for name, (a, b) in adapters.items():
        if a.dim() == 2:
            out[name] = (a, b)
            continue
        experts, param = name.rsplit(".", 1)
        for e in range(a.shape[0]):
            if param == "down_proj":
                out[f"{experts}.{e}.down_proj"] = (a[e], b[e])
            else:  # gate_up_proj rows are [gate; up], as megatron's fc1
                gate, up = b[e].chunk(2)
                out[f"{experts}.{e}.gate_proj"], out[f"{experts}.{e}.up_proj"] = (a[e], gate), (a[e], up)
    return out


def write_adapter(out: Path, hf_dir: str, args: dict, adapters: dict) -> None:
    from safetensors.torch import save_file

    names = sorted({n.rsplit(".", 1)[-1] for n, (a, _) in adapters.items() if a.dim() == 2})
    fused = sorted({"mlp.experts." + n.rsplit(".", 1)[-1] for n, (a, _) in adapters.items() if a.dim() == 3})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(Path(hf_dir).resolve()),
              "r": int(args["lora_rank"]), "lora_alpha": float(args.get("lora_alpha") or args["lora_rank"]),
              "lora_dropout": float(args.get("lora_dropout") or 0.0), "target_modules": names, "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False, "use_dora": False,
              "modules_to_save": None, "init_lora_weights": True}
    if fused:
        config.update(target_parameters=fused, target_modules=names or None)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {}
    for name, (a, b) in adapters.items():
        name, a, b = _peft_entry(name, a, b)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


def write_merged(out: Path, hf_dir: str, args: dict, adapters: dict) -> None:
    """Every file of the HF directory, with W += alpha/r * B A on the adapted weights (fp32 math)."""
    from safetensors.torch import load_file, save_file

    scaling = float(args.get("lora_alpha") or args["lora_rank"]) / int(args["lora_rank"])
    adapters = per_expert(adapters)
    src = Path(hf_dir)
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise UserError(f"--hf-config {hf_dir}: no *.safetensors weights to merge into (--merge needs the base model)")
    left = set(adapters)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, out / f.name)
    for shard in shards:
        tensors = load_file(str(shard))
        for name in list(tensors):
            module = name[:-len(".weight")] if name.endswith(".weight") else None
            if module in adapters:
                a, b = adapters[module]
                w = tensors[name]
                tensors[name] = (w.float() + scaling * (b.float() @ a.float())).to(w.dtype)
                left.discard(module)
        save_file(tensors, str(out / shard.name), metadata={"format": "pt"})
    if left:
        raise UserError(f"--hf-config {hf_dir}: weights of {sorted(left)[:3]} not found in its safetensors")


def run(args) -> int:
    from megatron_patch.checkpoint.atomic import atomic_output_dir

    hf_config = _hf_config(args.hf_config)
    saved, stored = read_adapters(args.mcore_path)
    adapters = peft_tensors(hf_config, saved, stored)
    with atomic_output_dir(args.out, force=args.force, inputs=[args.mcore_path, args.hf_config]) as tmp:
        if args.merge:
            write_merged(tmp, args.hf_config, saved, adapters)
        else:
            write_adapter(tmp, args.hf_config, saved, adapters)
    what = "merged HF model" if args.merge else "peft adapter"
    print(f"wrote {what} {args.out}: {len(adapters)} adapted modules, r {saved['lora_rank']}, "
          f"alpha {saved.get('lora_alpha') or saved['lora_rank']}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("lora2peft", help="LoRA adapters of a training checkpoint -> peft adapter (or --merge: HF model)")
    p.add_argument("--mcore-path", required=True, help="the --save directory of a `train --lora-rank` run")
    p.add_argument("--hf-config", required=True, help="the base HF model directory")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--merge", action="store_true", help="write the full HF model with the adapters merged in")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=run)
