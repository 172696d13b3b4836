"""Two name sets, one table: megatron-core's local-spec names (what the family tables hold) and the
Transformer Engine (TE) spec's, plus SequentialMLP <-> TE grouped experts. The same idea as megatron's
own `sharded_state_dict_keys_map`: a few rename rules, applied on write and undone on read.

What the TE spec (megatron-core gpt_layer_specs, get_gpt_layer_with_transformer_engine_spec) changes:
  * a norm whose consumer is a TE LayerNormLinear is fused into it: `P.input_layernorm.weight` ->
    `P.self_attention.linear_qkv.layer_norm_weight` (GQA), MLA's `q_layernorm`/`kv_layernorm` ->
    `linear_q_up_proj`/`linear_kv_up_proj.layer_norm_weight`, a dense MLP's `pre_mlp_layernorm` ->
    `mlp.linear_fc1.layer_norm_weight`. The rule is structural: the norm fuses when that linear exists
    in the same layer (a MoE layer keeps `pre_mlp_layernorm`, Qwen3's q/k norms stay);
  * every TE module carries `_extra_state` (fp8 metadata): norms, linears (MLA's replicated down
    projections too), core attention (legacy state dicts only: megatron's TEDotProductAttention leaves
    it out of its sharded state dict);
  * grouped experts (`--moe-grouped-gemm`): `mlp.experts.local_experts.{e}.linear_fc1.weight` ->
    `mlp.experts.linear_fc1.weight{e}` with one `_extra_state` per grouped linear (legacy only: the
    torch_dist keys of TEGroupedMLP and SequentialMLP are the same).
`_extra_state` values are written as None (what Pai-Megatron-Patch writes; TE's set_extra_state skips it).
"""
from __future__ import annotations

import dataclasses
import re

from megatron_patch.errors import UserError
from megatron_patch.models.impl import IMPLS, LOCAL, TE  # the spec names (models/ builds them)

EXTRA = "._extra_state"

# (norm module, the linear it fuses into in the TE spec), relative to a transformer layer
FUSED_NORMS = (
    ("input_layernorm", "self_attention.linear_qkv"),
    ("self_attention.q_layernorm", "self_attention.linear_q_up_proj"),
    ("self_attention.kv_layernorm", "self_attention.linear_kv_up_proj"),
    ("pre_mlp_layernorm", "mlp.linear_fc1"),
)
_FUSE = [(re.compile(rf"(.*\.)?{re.escape(norm)}\.(weight|bias)"), linear) for norm, linear in FUSED_NORMS]
_UNFUSE = [(re.compile(rf"(.*\.)?{re.escape(linear)}\.layer_norm_(weight|bias)"), norm) for norm, linear in FUSED_NORMS]
_SEQUENTIAL = re.compile(r"(.*\.experts\.)local_experts\.(\d+)\.(linear_fc[12])\.(weight|bias)")
_GROUPED = re.compile(r"(.*\.experts\.)(linear_fc[12])\.(weight|bias)(\d+)")
_GROUPED_EXTRA = re.compile(r"(.*\.experts\.linear_fc[12])\._extra_state\d*")
# modules without _extra_state in either spec
NO_EXTRA_STATE = re.compile(r"(embedding\.word_embeddings|.*\.mlp\.router)")
# a transformer layer's prefix: decoder.layers.N. or mtp.layers.N.transformer_layer.
LAYER_PREFIX = re.compile(r"(.*layers\.\d+\.(?:transformer_layer\.)?)")
ATTENTION_PROBE = "self_attention.linear_proj.weight"
DSA_PROBE = "self_attention.core_attention.indexer.linear_wk.weight"  # DSA's core attention is not a TE module
DOWN_PROJECTIONS = ("self_attention.linear_q_down_proj.weight", "self_attention.linear_kv_down_proj.weight")


@dataclasses.dataclass(frozen=True)
class Naming:
    """Which names a checkpoint uses: the spec (TE or local) and the expert layout."""

    impl: str = TE
    grouped: bool = False

    def __post_init__(self):
        if self.impl not in IMPLS:
            raise UserError(f"unknown --transformer-impl {self.impl!r}; choose one of {', '.join(IMPLS)}")
        if self.grouped and self.impl == LOCAL:
            raise UserError("--moe-grouped-gemm with --transformer-impl local is megatron-core's legacy GroupedMLP "
                            "(fused weight1/weight2, needs the grouped_gemm package): not supported; use "
                            "--transformer-impl transformer_engine (TEGroupedMLP) or drop --moe-grouped-gemm")

    @property
    def is_te(self) -> bool:
        return self.impl == TE

    def describe(self) -> str:
        return self.impl + (" + grouped experts" if self.grouped else "")


# ---------------------------------------------------------------------------------------------------
# legacy (torch format) state dicts
# ---------------------------------------------------------------------------------------------------
def te_name(name: str, names, grouped: bool = False) -> str:
    """The TE-spec name of a local-spec parameter; `names` are the other parameters of its model chunk
    (a norm fuses only where its linear exists)."""
    for pattern, linear in _FUSE:
        m = pattern.fullmatch(name)
        if m and f"{m[1] or ''}{linear}.weight" in names:
            return f"{m[1] or ''}{linear}.layer_norm_{m[2]}"
    if grouped:
        m = _SEQUENTIAL.fullmatch(name)
        if m:
            return f"{m[1]}{m[3]}.{m[4]}{m[2]}"
    return name


def te_extra_state_keys(te_names, legacy: bool = True) -> list[str]:
    """The `_extra_state` keys a TE-spec chunk holding these (TE-named) parameters has. Core attention's
    is in legacy state dicts, and in torch_dist only inside MTP layers (megatron's MTP layer shards its
    transformer layer's modules by default, without TEDotProductAttention.sharded_state_dict)."""
    modules = {n.rsplit(".", 1)[0] for n in te_names if not n.endswith(EXTRA)}
    modules = {m for m in modules if not NO_EXTRA_STATE.fullmatch(m)}
    dsa = {n[: -len(DSA_PROBE)] for n in te_names if n.endswith(DSA_PROBE)}
    modules |= {n[: -len("linear_proj.weight")] + "core_attention" for n in te_names
                if n.endswith(ATTENTION_PROBE) and (legacy or ".transformer_layer." in n)
                and n[: -len(ATTENTION_PROBE)] not in dsa}
    return sorted(m + EXTRA for m in modules)


def to_te(sd: dict, grouped: bool, last_stage: bool) -> dict:
    """A local-spec chunk state dict (parameters only) with TE-spec names and `_extra_state` entries
    (None); the last stage's output_layer (a megatron ColumnParallelLinear in both specs) has one even
    when tied to the embedding (then without a weight)."""
    names = set(sd)
    out = {te_name(k, names, grouped): v for k, v in sd.items()}
    keys = set(te_extra_state_keys(out))
    if last_stage:
        keys.add("output_layer" + EXTRA)
    for key in sorted(keys):
        out[key] = None
    return out


def name_map(local_names, naming: Naming) -> dict[str, str]:
    """local parameter name -> its name in `naming`, for one chunk."""
    names = set(local_names)
    if not naming.is_te:
        return {n: n for n in names}
    return {n: te_name(n, names, naming.grouped) for n in names}


def to_local(sd: dict) -> tuple[dict, Naming]:
    """A chunk state dict in either naming -> local-spec names (parameters only, `_extra_state` dropped),
    and the naming detected (TE: a fused norm, grouped experts or a norm's/core attention's extra state)."""
    out, te, grouped = {}, False, False
    for key, value in sd.items():
        if key.endswith(EXTRA) or _GROUPED_EXTRA.fullmatch(key):
            te = te or key.endswith(("norm" + EXTRA, "core_attention" + EXTRA))
            continue
        name = key
        for pattern, norm in _UNFUSE:
            m = pattern.fullmatch(key)
            if m:
                name, te = f"{m[1] or ''}{norm}.{m[2]}", True
                break
        m = _GROUPED.fullmatch(key)
        if m:
            name, grouped = f"{m[1]}local_experts.{m[4]}.{m[2]}.{m[3]}", True
        out[name] = value
    return out, Naming(TE if te or grouped else LOCAL, grouped)


def check_known(names, expected, where: str) -> None:
    """Refuse a chunk with a key that is in neither name set (after to_local)."""
    unknown = [n for n in names if n not in expected]
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]}: neither megatron-core's local-spec nor its Transformer "
                        "Engine names for this model (a different model or config?); nothing was converted")


# ---------------------------------------------------------------------------------------------------
# torch_dist (sharded state dicts of a TP1 model)
# ---------------------------------------------------------------------------------------------------
def _layer(name: str):
    m = LAYER_PREFIX.match(name)
    return m.group(1) if m else None


PROBE_EXTRA = "self_attention.linear_proj" + EXTRA  # in every transformer layer of both specs


def te_sharded(model_sd: dict, extra_state: bool = True) -> dict:
    """A local-spec GPTModel's sharded state dict as the TE-spec model's asks for it: fused norms under
    their TE keys (megatron's local keys map, which renames pre_mlp_layernorm on MoE layers too, undone)
    and ShardedObjects for the TE-only `_extra_state`s (norms, replicated down projections). Keys of
    the same layer share the prefix (stacked `decoder.layers.` or per-layer) of its linear_proj's.
    extra_state=False: renames only (a local-spec model reading a TE checkpoint)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    names = {n for n in model_sd if not n.endswith(EXTRA)}
    out = {}
    for name, entry in model_sd.items():
        new = te_name(name, names, grouped=False)  # torch_dist expert keys do not depend on grouping
        prefix = _layer(name)
        if new != name or (isinstance(entry, ShardedTensor) and prefix and "experts" not in name
                           and not entry.key.endswith(name[len(prefix):])):
            key_prefix = model_sd[prefix + PROBE_EXTRA].key[: -len(PROBE_EXTRA)]
            entry = dataclasses.replace(entry, key=key_prefix + new[len(prefix):])
        out[name] = entry
    if not extra_state:
        return out
    te_names = {te_name(n, names) for n in names}
    have = {k for k in model_sd if k.endswith(EXTRA)}
    for key in te_extra_state_keys(te_names, legacy=False):
        if key in have or key.startswith("output_layer"):
            continue
        prefix = _layer(key)
        probe = model_sd.get(prefix + PROBE_EXTRA) if prefix else None
        if probe is not None:  # the layer's axis (stacked layers) or per-layer key, as its linear_proj's
            sharded_key = probe.key[: -len(PROBE_EXTRA)] + key[len(prefix):]
            shape, offset, replica = probe.global_shape, probe.global_offset, probe.replica_id
        else:  # outside a transformer layer (final_layernorm, MTP's enorm/hnorm): no layer axis
            sharded_key, shape, offset, replica = key, (1,), (0,), (0, 0, 0)
        out[key] = ShardedObject(sharded_key, None, tuple(shape), tuple(offset), replica)
    return out


# ---------------------------------------------------------------------------------------------------
# readers: either naming in, local-spec names out
# ---------------------------------------------------------------------------------------------------
def down_projection_rows(mcore_config) -> dict[str, int]:
    """The full first dimension of MLA's replicated down projections (Pai-Megatron-Patch splits them by
    TP rank; we and megatron-core's TE spec replicate them)."""
    if not getattr(mcore_config, "multi_latent_attention", False):
        return {}
    rows = {DOWN_PROJECTIONS[1]: mcore_config.kv_lora_rank + mcore_config.qk_pos_emb_head_dim}
    if mcore_config.q_lora_rank:
        rows[DOWN_PROJECTIONS[0]] = mcore_config.q_lora_rank
    return rows


def read_local_rank(root, tp: int, pp: int, ep: int, sizes: dict, iteration, full_rows: dict | None = None,
                    expected: list | None = None) -> tuple[list[dict], Naming]:
    """One rank's torch-format chunks with local-spec names, whatever spec wrote them: TE names and
    grouped experts renamed, `_extra_state` dropped, TP-split down projections gathered from the other
    TP ranks' files. `expected` (per chunk: the local names the rank should hold) refuses unknown keys."""
    import torch

    from megatron_patch.checkpoint import mcore_layout

    chunks, naming = [], Naming(LOCAL)
    others: dict[int, list[dict]] = {}
    present = None  # the rank files that exist, listed on first need
    for c, sd in enumerate(mcore_layout.read_rank(root, tp, pp, ep, sizes, iteration)):
        local, naming = to_local(sd)
        if expected is not None:
            check_known(local, expected[c], mcore_layout.rank_dir_name(tp, pp, ep, sizes["pp"], sizes["ep"]))
        for name, tensor in list(local.items()):
            suffix = next((d for d in (full_rows or {}) if name.endswith(d)), None)
            if suffix is None or sizes["tp"] == 1 or tensor.shape[0] == full_rows[suffix]:
                continue
            if tensor.shape[0] * sizes["tp"] != full_rows[suffix]:
                raise UserError(f"{name} has {tensor.shape[0]} rows; the config implies {full_rows[suffix]} (or a "
                                f"1/{sizes['tp']} TP split of them): the checkpoint does not match the config")
            if present is None:  # listed once: a stat per rank file of the whole checkpoint
                present = mcore_layout.present_ranks(root, iteration, sizes)
            for r in range(sizes["tp"]):
                if r not in others:
                    holder = mcore_layout.rank_holding(present, sizes, r, pp, ep, experts=False)
                    others[r] = [to_local(x)[0] for x in mcore_layout.read_rank(root, *holder, sizes, iteration)]
            local[name] = torch.cat([others[r][c][name] for r in range(sizes["tp"])], dim=0)
        chunks.append(local)
    return chunks, naming


def stored_keys(ckpt_dir) -> set[str]:
    """The keys of a torch_dist checkpoint (its DCP metadata, read through the restricted unpickler)."""
    from pathlib import Path

    from megatron_patch.checkpoint.safe_load import load_dcp_metadata

    path = Path(ckpt_dir) / ".metadata"
    with open(path, "rb") as stream:
        return set(load_dcp_metadata(stream, path).state_dict_metadata)


def _missing(model_sd: dict, stored: set[str]) -> list[str]:
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    keys = []  # (factories, e.g. SwiGLU fc1, keep their keys in both specs)
    for entry in model_sd.values():
        if isinstance(entry, ShardedObject):
            keys.append(entry.unique_key)
        elif isinstance(entry, ShardedTensor):
            keys.append(entry.key)
    return [k for k in keys if k not in stored]


# a TE-spec key's suffix -> the local spec's for the same tensor (megatron's local keys map puts a MoE layer's
# pre_mlp_layernorm under mlp.linear_fc1.layer_norm_weight)
_TE_TO_LOCAL_SUFFIXES = [(f"{linear}.layer_norm_{p}", f"{norm}.{p}") for norm, linear in FUSED_NORMS
                         for p in ("weight", "bias")] + [("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")]


def local_sharded(model_sd: dict, stored: set[str]) -> dict:
    """A TE-spec model's sharded state dict under a local-spec checkpoint's keys: each tensor key the
    checkpoint lacks takes the local name of the same tensor where the checkpoint has that one; TE's
    `_extra_state` objects it lacks are not requested (the loader sets them to None, as TE accepts)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    out = {}
    for name, entry in model_sd.items():
        if isinstance(entry, ShardedObject) and entry.unique_key not in stored and name.endswith(EXTRA):
            continue
        if isinstance(entry, ShardedTensor) and entry.key not in stored:
            for te_suffix, local_suffix in _TE_TO_LOCAL_SUFFIXES:
                key = entry.key[: -len(te_suffix)] + local_suffix
                if entry.key.endswith(te_suffix) and key in stored:
                    entry = dataclasses.replace(entry, key=key)
                    break
        out[name] = entry
    return out


def match_sharded(model_sd: dict, stored: set[str], where: str, extra_state: bool = True) -> tuple[dict, Naming]:
    """A model's sharded state dict under the keys a torch_dist checkpoint holds: its own, the TE spec's
    for a local-spec model, or the local spec's for a TE-spec model (detected; the Naming returned is the
    checkpoint's). None: a one-line UserError naming the first key the checkpoint lacks."""
    missing = _missing(model_sd, stored)
    if not missing:
        return model_sd, Naming(LOCAL)
    te = te_sharded(model_sd, extra_state)
    te_missing = _missing(te, stored)
    if not te_missing:
        return te, Naming(TE)
    if not extra_state:  # a loader: a TE-spec model may read a local-spec checkpoint
        local = local_sharded(model_sd, stored)
        if not _missing(local, stored):
            return local, Naming(LOCAL)
    first = (missing if len(missing) <= len(te_missing) else te_missing)[0]
    raise UserError(f"{where}: the checkpoint has no {first}, which the model asks for in megatron-core's local "
                    "and Transformer Engine names alike: it does not match this config (wrong --hf-config?)")
