"""`make-mini`: write a tiny random HF model of a family (config, safetensors weights, tokenizer) with
transformers itself, so tests and examples never download anything; or cut a real checkpoint to a few of
its layers (`--from`).

    megatron-patch make-mini --family deepseek_v3 --out /tmp/ds3-mini [--layers 4] [--hidden 64]
        [--experts 8] [--seed 0] [--set key=value ...] [--preset mini|real-config] [--force]
    megatron-patch make-mini --from /models/DeepSeek-V3 --layers 0,1,2,61 --out /models/v3-cut [--keep-mtp]

--from: the kept layers are renumbered 0..n-1 and keep their kind (dense stays dense, MoE stays MoE:
first_k_dense_replace / mlp_only_layers are rewritten, per-layer lists such as layer_types cut alike);
embedding, final norm and head are kept; DeepSeek-V3's MTP modules only with --keep-mtp. The tensors are
copied as they are (dtype, FP8 scales), one source shard at a time; other files (tokenizer, code) are copied.

Presets (per family, in megatron_patch/models/families/<family>.py):
  mini         shaped like the real model (DeepSeek-V2-Lite, DeepSeek-V3, Qwen2.5-32B, Qwen3-30B-A3B),
               scaled down: hidden 64-128, 4 layers, 8 experts, vocab 512, dims divisible for TP 1/2/4 and
               EP 1/2/4/8. Weights are written (fp32) with a byte-level BPE tokenizer trained in-process
               on megatron_patch/convert/mini_corpus.txt. initializer_range is 0.1 (not 0.02) so that
               every layer visibly moves the residual stream and a comparison with megatron is sensitive.
  real-config  the published config values except the layer count; config.json only (shape tests).

DeepSeek-V3.2 (deepseek_v32): the V3 mini plus the DSA indexer (8 heads of 32, index_topk 16, below compare's
32-token default so the selection matters), no MTP unless --set num_nextn_predict_layers=1.

DeepSeek-V3 specifics: the router's e_score_correction_bias is set to random values (transformers
initialises it to zeros, which would hide a missing bias), and with num_nextn_predict_layers > 0 random
MTP weights are appended at model.layers.{num_hidden_layers + i}.* as in the real checkpoint
(transformers 5.23 does not build them and ignores them on load).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from megatron_patch.checkpoint.atomic import atomic_output_dir
from megatron_patch.errors import UserError

CORPUS = Path(__file__).with_name("mini_corpus.txt")
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"]  # ids 0, 1, 2 (bos, eos, pad)
PRESETS = ("mini", "real-config")
_EXPERT_KEY = {"deepseek_v2": "n_routed_experts", "deepseek_v3": "n_routed_experts", "deepseek_v32": "n_routed_experts",
               "qwen3_moe": "num_experts"}


def parse_value(text: str) -> Any:
    """--set values: JSON (ints, floats, true/false/null, lists, dicts), else True/False/None, else str."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    return text


def parse_sets(items: list[str] | None) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        if not key.strip():
            raise UserError(f"--set {item!r}: empty key")
        out[key.strip()] = parse_value(value)
    return out


def _apply(cfg: dict, key: str, value: Any) -> None:
    """key or dotted key (rope_parameters.factor=32) into the config dict."""
    parts = key.split(".")
    target = cfg
    for p in parts[:-1]:
        if not isinstance(target.get(p), dict):
            target[p] = dict(target.get(p) or {})
        target = target[p]
    target[parts[-1]] = value


def config_dict(family: str, preset: str = "mini", layers: int | None = None, hidden: int | None = None,
                experts: int | None = None, overrides: dict | None = None) -> dict:
    """The HF config values make-mini would write (before the config class adds its defaults)."""
    from megatron_patch.models.families import get_family

    fam = get_family(family)
    if preset not in fam.presets:
        raise UserError(f"unknown preset {preset!r} for {family}; choose one of {', '.join(fam.presets)}")
    cfg = json.loads(json.dumps(fam.presets[preset]))  # deep copy
    if layers is None and preset == "real-config":
        layers = max(2, (cfg.get("first_k_dense_replace") or 0) + 1)  # keep at least one MoE layer
    if layers is not None:
        if layers < 1:
            raise UserError(f"--layers {layers}: must be >= 1")
        cfg["num_hidden_layers"] = layers
        if "max_window_layers" in cfg:
            cfg["max_window_layers"] = layers
    if hidden is not None:
        cfg["hidden_size"] = hidden
    if experts is not None:
        if family not in _EXPERT_KEY:
            raise UserError(f"--experts: {family} is a dense family")
        cfg[_EXPERT_KEY[family]] = experts
    for key, value in (overrides or {}).items():
        _apply(cfg, key, value)
    return cfg


def build_hf_config(family: str, cfg: dict):
    from transformers import CONFIG_MAPPING

    from megatron_patch.models.families import get_family

    fam = get_family(family)
    try:
        config = CONFIG_MAPPING[fam.hf_model_type](**cfg)
    except Exception as err:  # noqa: BLE001 - transformers' validators raise assorted types (StrictDataclassError...)
        raise UserError(f"{family}: transformers rejects the config: {' '.join(str(err).split())}") from None
    config.architectures = [fam.hf_architectures[0]]
    fam.to_mcore_config(config)  # refuse configs the megatron mapping cannot represent
    return config


def train_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer with exactly vocab_size entries (specials first, then bytes, merges,
    then reserved filler tokens if the corpus runs out of merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise UserError(f"vocab_size={vocab_size} is too small for a byte-level tokenizer "
                        f"(needs >= {len(alphabet) + len(SPECIAL_TOKENS)})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(CORPUS.read_text(encoding="utf-8").splitlines(), trainer=trainer)
    missing = vocab_size - tok.get_vocab_size()
    if missing > 0:
        tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    if tok.get_vocab_size() != vocab_size:
        raise UserError(f"tokenizer has {tok.get_vocab_size()} entries, wanted {vocab_size}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL_TOKENS[0], eos_token=SPECIAL_TOKENS[1],
                                   pad_token=SPECIAL_TOKENS[2], unk_token=SPECIAL_TOKENS[1])
    # unk_token set explicitly: AutoTokenizer picks e.g. Qwen2Tokenizer for a qwen2 config, which would
    # otherwise add its own "<|endoftext|>" (one entry past vocab_size).


def _randomise_expert_bias(model, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=gen, dtype=torch.float32).to(buf.dtype) * 0.05)


def _randomise_norms(model, seed: int) -> None:
    """RMSNorm weights around 1 instead of transformers' exact ones: with all-ones norms a norm weight
    mapped to the wrong place (or a pre- vs post-norm mix-up) would go unnoticed in the comparisons."""
    import torch

    gen = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and "norm" in name.rsplit(".", 2)[-2]:
                noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
                param.copy_((1.0 + 0.1 * noise).to(param.dtype))


def build_model(config, seed: int = 0):
    """The random fp32 HF model make-mini saves (deterministic for a config and seed)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomise_expert_bias(model, seed)
    _randomise_norms(model, seed)
    return model.eval()


def _append_mtp_weights(out: Path, config, seed: int) -> list[str]:
    """Random DeepSeek-V3 MTP modules at model.layers.{L + i}.*, as in the real checkpoint: a transformer
    layer shaped like the last decoder layer plus enorm, hnorm, eh_proj, shared_head.norm, and copies of
    embed_tokens / lm_head (embed_tokens, shared_head.head)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    n = getattr(config, "num_nextn_predict_layers", 0) or 0
    files = sorted(out.glob("*.safetensors"))
    if not n or len(files) != 1:
        return []
    path = files[0]
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    gen = torch.Generator().manual_seed(seed + 2)
    L, h, std = config.num_hidden_layers, config.hidden_size, config.initializer_range
    last = f"model.layers.{L - 1}."
    added = []

    def rand(shape, norm=False):
        x = torch.randn(shape, generator=gen, dtype=torch.float32)
        return (1.0 + 0.1 * x) if norm else x * std

    for i in range(n):
        p = f"model.layers.{L + i}."
        new = {}
        for k, t in tensors.items():
            if k.startswith(last):
                rest = k[len(last):]
                norm = rest.endswith("layernorm.weight") or rest.endswith("_layernorm.weight")
                new[p + rest] = rand(t.shape, norm=norm).to(t.dtype)
        emb = tensors["model.embed_tokens.weight"]
        new[p + "embed_tokens.weight"] = emb.clone()
        new[p + "shared_head.head.weight"] = tensors.get("lm_head.weight", emb).clone()
        new[p + "enorm.weight"] = rand((h,), norm=True).to(emb.dtype)
        new[p + "hnorm.weight"] = rand((h,), norm=True).to(emb.dtype)
        new[p + "shared_head.norm.weight"] = rand((h,), norm=True).to(emb.dtype)
        new[p + "eh_proj.weight"] = rand((h, 2 * h)).to(emb.dtype)
        tensors.update(new)
        added += sorted(new)
    save_file(tensors, str(path), metadata=metadata)
    return added


def make_mini(family: str, out_dir: str | os.PathLike, layers: int | None = None, hidden: int | None = None,
              experts: int | None = None, seed: int = 0, overrides: dict | None = None, preset: str = "mini",
              force: bool = False) -> Path:
    """Write the model to out_dir atomically (a temp dir next to it, then rename). Returns out_dir."""
    out = Path(out_dir)
    cfg = config_dict(family, preset, layers, hidden, experts, overrides)
    config = build_hf_config(family, cfg)

    with atomic_output_dir(out, force=force) as tmp:
        info = {"family": family, "preset": preset, "seed": seed, "layers": layers, "hidden": hidden,
                "experts": experts, "overrides": overrides or {}}
        if preset == "real-config":
            config.save_pretrained(tmp)
            info["weights"] = False
        else:
            model = build_model(config, seed)
            model.save_pretrained(tmp, safe_serialization=True)
            info["weights"] = True
            info["mtp_tensors"] = _append_mtp_weights(tmp, config, seed)
            train_tokenizer(config.vocab_size).save_pretrained(tmp)
        (tmp / "make_mini.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


# ---------------------------------------------------------------------------------------------------
# make-mini --from: a real checkpoint cut to some of its layers
# ---------------------------------------------------------------------------------------------------
_LAYER_NAME = re.compile(r"^(model\.layers\.)(\d+)(\..+)$")
_WEIGHT_FILES = ("model.safetensors.index.json", "config.json", "make_mini.json")


def parse_layer_list(text: str) -> list[int]:
    """--layers 0,1,2,61 (ranges a-b allowed): sorted, unique."""
    out: set[int] = set()
    try:
        for part in str(text).split(","):
            lo, _, hi = part.strip().partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise UserError(f"--layers {text!r}: expected layer indices like 0,1,2,61 (or ranges 0-2)") from None
    return sorted(out)


def layer_kinds(cfg: dict) -> list[int]:
    """1 for a MoE layer, 0 for a dense one, as transformers builds the decoder (DeepSeek: MoE from
    first_k_dense_replace on; Qwen3-MoE: the family's moe_pattern; dense families: all 0)."""
    num_layers = cfg["num_hidden_layers"]
    if cfg.get("n_routed_experts"):
        k = cfg.get("first_k_dense_replace") or 0
        return [int(i >= k) for i in range(num_layers)]
    experts = cfg.get("num_local_experts") or cfg.get("num_experts")  # transformers 5 / 4 name (Qwen3-MoE)
    if experts and "decoder_sparse_step" in cfg:
        from megatron_patch.models.families.qwen3_moe import moe_pattern

        return moe_pattern(num_layers, experts, cfg.get("decoder_sparse_step"), cfg.get("mlp_only_layers"))
    return [0] * num_layers


def cut_config(cfg: dict, layers: list[int], keep_mtp: bool) -> dict:
    """The config of the cut model: every kept layer keeps its kind (dense / MoE), per-layer lists cut alike."""
    num_layers = cfg.get("num_hidden_layers")
    if not isinstance(num_layers, int):
        raise UserError("config.json has no num_hidden_layers: not a decoder model this cutter knows")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or not layers:
        raise UserError(f"--layers {bad or layers}: the model has layers 0..{num_layers - 1}")
    kinds = [layer_kinds(cfg)[i] for i in layers]
    new = dict(cfg, num_hidden_layers=len(layers))
    for key, value in cfg.items():  # e.g. layer_types: one entry per layer
        if isinstance(value, list) and len(value) == num_layers and key != "mlp_only_layers":
            new[key] = [value[i] for i in layers]
    if "max_window_layers" in cfg:
        new["max_window_layers"] = sum(i < (cfg["max_window_layers"] or 0) for i in layers)
    if cfg.get("n_routed_experts"):
        k = kinds.count(0)
        if kinds != [0] * k + [1] * (len(kinds) - k):
            raise UserError(f"--layers {layers}: DeepSeek configs put the dense layers first")
        new["first_k_dense_replace"] = k
    elif "decoder_sparse_step" in cfg:
        new["decoder_sparse_step"] = 1
        new["mlp_only_layers"] = [j for j, kind in enumerate(kinds) if not kind]
    if cfg.get("num_nextn_predict_layers") and not keep_mtp:
        new["num_nextn_predict_layers"] = 0
    if layer_kinds(new) != kinds:  # the rules above must keep every layer's kind
        raise UserError(f"--layers {layers}: cannot express the kept layers' dense/MoE pattern in the config")
    return new


def _renamer(layers: list[int], num_layers: int, mtp_layers: int):
    """HF tensor name -> name in the cut model (None: dropped). MTP modules sit after the last decoder layer
    (model.layers.{num_layers + i}); kept ones move to after the last kept layer."""
    new_index = {old: new for new, old in enumerate(layers)}
    new_index.update({num_layers + i: len(layers) + i for i in range(mtp_layers)})

    def rename(name: str) -> str | None:
        m = _LAYER_NAME.match(name)
        if not m:
            return name
        j = new_index.get(int(m.group(2)))
        return None if j is None else f"{m.group(1)}{j}{m.group(3)}"

    return rename


def cut_checkpoint(src: str | os.PathLike, out_dir: str | os.PathLike, layers: list[int], keep_mtp: bool = False,
                   force: bool = False) -> dict:
    """Write the checkpoint at `src` cut to `layers` into out_dir (atomically), reading it shard by shard
    (only one shard's kept tensors in memory; tensors are copied as they are: dtype, FP8 scales and all).
    Other files (tokenizer, generation config, code) are copied. Returns a summary."""
    import shutil

    from safetensors.torch import save_file

    from megatron_patch.checkpoint.hf_reader import HFCheckpoint

    src = Path(src)
    if not (src / "config.json").is_file():
        raise UserError(f"--from {src}: no config.json (point at an HF model directory)")
    cfg = json.loads((src / "config.json").read_text())
    new_cfg = cut_config(cfg, layers, keep_mtp)
    mtp = new_cfg.get("num_nextn_predict_layers") or 0
    rename = _renamer(layers, cfg["num_hidden_layers"], mtp)
    summary = {"from": str(src), "layers": layers, "keep_mtp": bool(mtp), "tensors": 0, "bytes": 0}
    with HFCheckpoint(src) as ckpt, atomic_output_dir(out_dir, force=force) as tmp:
        plan = [(shard, [(n, rename(n)) for n in names if rename(n) is not None])
                for shard, names in sorted(ckpt.shards().items())]
        plan = [(shard, kept) for shard, kept in plan if kept]
        single = len(plan) == 1
        weight_map = {}
        for k, (shard, kept) in enumerate(plan, 1):
            fname = "model.safetensors" if single else f"model-{k:05d}-of-{len(plan):05d}.safetensors"
            tensors = {new: ckpt.get(old) for old, new in kept}
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            summary["tensors"] += len(tensors)
            summary["bytes"] += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map.update({new: fname for new in tensors})
            del tensors
        if not single:
            index = {"metadata": {"total_size": summary["bytes"]}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        for f in sorted(src.iterdir()):
            if f.is_file() and f.suffix != ".safetensors" and f.name not in _WEIGHT_FILES:
                shutil.copy2(f, tmp / f.name)
        (tmp / "config.json").write_text(json.dumps(new_cfg, indent=2) + "\n")
        (tmp / "make_mini.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def run(args) -> int:
    if args.source:
        if args.family or args.hidden or args.experts or args.set or args.preset != "mini":
            raise UserError("--from cuts a real checkpoint: give only --layers, --out, --keep-mtp, --force "
                            "(--family/--hidden/--experts/--set/--preset make random models)")
        if not args.layers:
            raise UserError("--from needs --layers, e.g. --layers 0,1,2,61")
        s = cut_checkpoint(args.source, args.out, parse_layer_list(args.layers), keep_mtp=args.keep_mtp,
                           force=args.force)
        print(f"wrote {args.out}: layers {s['layers']} of {args.source}{' + MTP' if s['keep_mtp'] else ''}, "
              f"{s['tensors']} tensors, {s['bytes'] / 2**20:.1f} MiB")
        return 0
    if not args.family:
        raise UserError("give --family FAMILY (a random mini model) or --from DIR (cut a real checkpoint)")
    if args.keep_mtp:
        raise UserError("--keep-mtp applies to --from")
    try:
        layers = None if args.layers is None else int(args.layers)
    except ValueError:
        raise UserError(f"--layers {args.layers!r}: with --family it is the number of layers") from None
    out = make_mini(args.family, args.out, layers=layers, hidden=args.hidden, experts=args.experts,
                    seed=args.seed, overrides=parse_sets(args.set), preset=args.preset, force=args.force)
    print(f"wrote {args.preset} {args.family} model to {out}")
    return 0


def register(subparsers) -> None:
    families = ("deepseek_v2", "deepseek_v3", "deepseek_v32", "qwen2", "qwen3_moe")
    p = subparsers.add_parser("make-mini", help="write a tiny random HF model + tokenizer (no download), or cut "
                              "a real checkpoint to some layers (--from)", description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=families, help="make a random model of this family")
    p.add_argument("--from", dest="source", metavar="DIR",
                   help="cut this HF checkpoint to --layers instead (streaming, shard by shard)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--layers", default=None, help="num_hidden_layers; with --from: the layers to keep (0,1,2,61)")
    p.add_argument("--keep-mtp", action="store_true", help="with --from: keep the MTP modules (DeepSeek-V3)")
    p.add_argument("--hidden", type=int, default=None, help="hidden_size")
    p.add_argument("--experts", type=int, default=None, help="number of routed experts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="HF config override (repeatable; JSON values; dotted keys for nested dicts)")
    p.add_argument("--preset", choices=PRESETS, default="mini")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=run)
