"""An HF model's config.json as transformers reads it, and the tensor shapes that config implies."""
from __future__ import annotations

import copy
import json
import types
from pathlib import Path

import torch

from megatron_patch.errors import UserError


def load_hf_config(config_dir):
    """The transformers config of config.json in config_dir; unsupported architectures fail by name first."""
    from megatron_patch.models.families import family_for_config

    path = Path(config_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except OSError:
        raise UserError(f"no config.json in {config_dir} (point at the HF model directory)") from None
    except ValueError as err:
        raise UserError(f"{path} is not valid JSON ({err}); fix or re-download it") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} holds a JSON {type(raw).__name__}, not an object of config fields; fix or re-download it")
    family_for_config(types.SimpleNamespace(architectures=raw.get("architectures"), model_type=raw.get("model_type")))
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(config_dir))
    except Exception as err:  # noqa: BLE001 - transformers' validators raise assorted types (StrictDataclassError...)
        raise UserError(f"transformers cannot read {path}: {' '.join(str(err).split())[:300]} (fix the config)") from None
    if absent_mtp_layers(config_dir, config):
        _note_once(f"note: {path} declares num_nextn_predict_layers={config.num_nextn_predict_layers} but its weights "
                   f"hold no MTP layer (model.layers.{config.num_hidden_layers}.*; transformers saves none): read as "
                   "a model without MTP")
        config.num_nextn_predict_layers = 0
    return config


def absent_mtp_layers(config_dir, config) -> bool:
    """The config declares DeepSeek MTP layers that the safetensors weights beside it do not hold. transformers
    builds and saves no MTP modules while DeepseekV3Config defaults num_nextn_predict_layers (num_mtp_layers) to 1,
    so every model saved by transformers is such a one; it is read as the model transformers runs: without MTP.
    False for a config-only directory and when any MTP tensor is present (a partial MTP is left to the checks)."""
    from .hf_reader import INDEX_NAME, SINGLE_NAME, read_safetensors_header

    mtp = getattr(config, "num_nextn_predict_layers", 0) or 0
    if not mtp:
        return False
    root = Path(config_dir)
    try:
        if (root / INDEX_NAME).is_file():
            names = list(json.loads((root / INDEX_NAME).read_text())["weight_map"])
        elif (root / SINGLE_NAME).is_file():
            names = list(read_safetensors_header(root / SINGLE_NAME))
        else:
            return False
    except (UserError, OSError, ValueError, KeyError, TypeError):
        return False  # a damaged index or shard: the checkpoint reader names the problem
    mtp_prefixes = tuple(f"model.layers.{config.num_hidden_layers + i}." for i in range(mtp))
    return not any(name.startswith(mtp_prefixes) for name in names)


def config_json_text(config_dir) -> str:
    """config.json of config_dir as load_hf_config reads it: num_nextn_predict_layers 0 when the weights beside it
    hold no MTP layer (what a converted checkpoint's hf_config/ records: its model has no MTP)."""
    text = (Path(config_dir) / "config.json").read_text()
    raw = json.loads(text)
    declared = raw.get("num_nextn_predict_layers", raw.get("num_mtp_layers"))
    if getattr(load_hf_config(config_dir), "num_nextn_predict_layers", None) != 0 or declared == 0:
        return text
    raw.pop("num_mtp_layers", None)
    raw["num_nextn_predict_layers"] = 0
    return json.dumps(raw, indent=2) + "\n"


def _note_once(line: str) -> None:
    """A note on stderr once per job: rank 0 only under torchrun (RANK), and not again in the ranks a command
    spawns after printing it (they inherit the environment mark)."""
    import hashlib
    import os
    import sys

    mark = "MP_NOTED_" + hashlib.sha1(line.encode()).hexdigest()[:12]
    if mark not in os.environ and os.environ.get("RANK", "0") == "0":
        os.environ[mark] = "1"
        print(line, file=sys.stderr, flush=True)


def expected_hf_shapes(hf_config) -> dict[str, tuple]:
    """The on-disk tensor shapes transformers would build from the config (a meta-device model, saved
    names via transformers' own weight-conversion revert: per-expert names for fused experts). DeepSeek
    MTP layers (model.layers.{L + i}) are shaped as decoder layers; their extra tensors are unchecked."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(hf_config)
    mtp = getattr(cfg, "num_nextn_predict_layers", 0) or 0
    if mtp:
        # per-layer lists (DeepSeek-V3.2's mlp_layer_types, layer_types) grow with the layers: an MTP layer is
        # shaped like the last decoder layer
        for key, value in list(vars(cfg).items()):
            if isinstance(value, list) and len(value) == cfg.num_hidden_layers and value:
                setattr(cfg, key, value + value[-1:] * mtp)
        cfg.num_hidden_layers += mtp
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        state = model.state_dict()
    except Exception as err:  # noqa: BLE001 - a config transformers cannot build is no model at all
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"transformers cannot build a model from this config.json ({type(err).__name__}: {first}); "
                        "fix the config (it decides every tensor's shape)") from None
    try:
        from transformers.core_model_loading import revert_weight_conversion

        state = revert_weight_conversion(model, state)
    except Exception:  # noqa: BLE001 - older/newer transformers: the model's own names
        pass
    return {k: tuple(v.shape) for k, v in state.items()}
