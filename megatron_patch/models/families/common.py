"""Shared pieces of the family tables: the HF-config -> megatron-config mapping machinery, the layer
spec, the GPTModel arguments and the expansion of `{layer}` / `{expert}` rows.

A family's config mapping is a list of small entries, one line per field:

    field("num_layers", "num_hidden_layers")                        # copy
    field("moe_layer_freq", ("first_k_dense_replace", "num_hidden_layers"), dense_then_moe)
    const("normalization", "RMSNorm")                               # fixed by the architecture
    check("attention_bias", is_false, "megatron has no bias on ...") # read, must hold
    model("vocab_size", "vocab_size")                               # a GPTModel argument, not config
    ignored("use_cache", "inference only")                          # read, irrelevant to training

`convert_config` walks EVERY key of the HF config (`to_dict()`): each must be read by an entry or be
listed as ignored; anything else is a UserError naming the keys. A mapping function may raise
UserError for values megatron-core cannot express.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch.nn.functional as F

from megatron_patch.errors import UserError
from megatron_patch.models.families.base import ParamRow, ShardContext


# ---------------------------------------------------------------------------------------------------
# mapping entries
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """Reads HF fields `hf`, writes megatron fields `targets` (config field names; names starting with
    'model.' are GPTModel arguments collected in ModelArgs). `fn(*values)` returns one value per target
    (a tuple when several targets; a dict when `targets` is a dict-returning group)."""

    targets: tuple[str, ...]
    hf: tuple[str, ...]
    fn: Callable[..., Any] | None = None
    why: str = ""  # for checks / ignored entries

    @property
    def kind(self) -> str:
        if not self.targets:
            return "check" if self.fn is not None else "ignored"
        return "map"


def _tuple(x) -> tuple[str, ...]:
    if x is None:
        return ()
    return (x,) if isinstance(x, str) else tuple(x)


def field(target: str | Sequence[str], hf: str | Sequence[str] | None = None,
          fn: Callable[..., Any] | None = None) -> Entry:
    """Map HF field(s) to megatron field(s). Without fn the (single) HF value is copied.
    `hf` defaults to the target name. With several targets fn returns a tuple or a dict."""
    targets = _tuple(target)
    return Entry(targets, _tuple(hf) if hf is not None else targets[:1], fn)


def model(target: str, hf: str | Sequence[str] | None = None, fn=None) -> Entry:
    """A GPTModel argument (vocab size, max positions, tied embeddings), collected in ModelArgs."""
    return field("model." + target, hf if hf is not None else target, fn)


def const(target: str, value: Any) -> Entry:
    """A megatron field fixed by the architecture (not read from the HF config)."""
    return Entry((target,), (), lambda: value)


def check(hf: str | Sequence[str], ok: Callable[..., bool], why: str) -> Entry:
    """Read HF field(s) and refuse values megatron-core cannot express (UserError naming the field)."""
    return Entry((), _tuple(hf), ok, why)


def ignored(hf: str | Sequence[str], why: str) -> Entry:
    """HF field(s) known to be irrelevant to the megatron model (tokens ids, inference flags...)."""
    return Entry((), _tuple(hf), None, why)


# Generic PretrainedConfig keys that never change the network.
GENERIC_IGNORED = [
    ignored(("_name_or_path", "transformers_version", "auto_map"), "provenance"),
    ignored(("architectures", "model_type"), "used to pick the family"),
    ignored(("bos_token_id", "eos_token_id", "pad_token_id", "tokenizer_class"), "tokenizer ids"),
    ignored(("dtype", "torch_dtype"), "checkpoint dtype; megatron params_dtype is an override"),
    ignored(("use_cache", "output_attentions", "output_hidden_states", "return_dict", "output_router_logits",
             "id2label", "label2id", "problem_type", "chunk_size_feed_forward"), "HF inference / head options"),
    ignored("pretraining_tp", "HF matmul slicing hint; transformers 5 ignores it"),
    ignored("quantization_config", "weight storage format (e.g. DeepSeek-V3 FP8 blocks): the converter "
            "dequantizes, the network is the same"),
    check("is_encoder_decoder", lambda v: not v, "encoder-decoder models are not GPT models"),
    field("init_method_std", "initializer_range"),
]

# Megatron fields set from the HF config that an override may still change: training-time knobs that do
# not change the function the converted weights compute.
TUNABLE = {
    "attention_dropout", "hidden_dropout", "init_method_std", "moe_aux_loss_coeff",
    "moe_router_load_balancing_type", "moe_router_dtype", "moe_token_dispatcher_type",
    "moe_router_bias_update_rate", "moe_z_loss_coeff", "mtp_num_layers", "moe_grouped_gemm",
    "dsa_indexer_loss_coeff", "dsa_indexer_use_sparse_loss",
}


# ---------------------------------------------------------------------------------------------------
# value helpers used by the family files
# ---------------------------------------------------------------------------------------------------
def silu_only(act: str):
    if act != "silu":
        raise UserError(f"hidden_act={act!r} is not supported (SwiGLU with silu only)")
    return F.silu


def is_false(v) -> bool:
    return not v


def dense_then_moe(first_k_dense: int | None, num_layers: int) -> list[int]:
    k = first_k_dense or 0
    return [0 if i < k else 1 for i in range(num_layers)]


def none_if_zero(v):
    return v if v else None


def scaling_or_none(v):
    """megatron multiplies by moe_router_topk_scaling_factor when it is truthy; 1.0 is the same as None."""
    return None if v is None or float(v) == 1.0 else float(v)


def plain_rope(rope: dict | None, what: str = "rope_parameters") -> dict:
    """Non-MLA families: only HF 'default' RoPE maps exactly (GPTModel 'rope')."""
    rope = dict(rope or {})
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    rope.pop("type", None)
    theta = rope.pop("rope_theta", None)
    partial = rope.pop("partial_rotary_factor", 1.0)
    if rope_type != "default":
        raise UserError(f"{what}.rope_type={rope_type!r} is not supported for this family (only 'default'; "
                        "megatron-core 0.16 GPTModel's yarn drops the attention factor)")
    if partial not in (None, 1, 1.0):
        raise UserError(f"{what}.partial_rotary_factor={partial} is not supported (HF ignores it for this "
                        "family, so the intent is unclear)")
    if rope:
        raise UserError(f"unknown {what} keys for rope_type 'default': {sorted(rope)}")
    if theta is None:
        raise UserError(f"{what} has no rope_theta")
    return {"model.rotary_base": float(theta), "model.rotary_percent": 1.0, "model.position_embedding_type": "rope"}


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def mla_rope(rope: dict | None, max_position_embeddings: int, what: str = "rope_parameters") -> dict:
    """HF rope_parameters (DeepSeek) -> MLATransformerConfig rope fields.

    HF (modeling_rope_utils._compute_yarn_parameters + deepseek yarn_apply_mscale):
      cos/sin *= get_mscale(f, mscale)/get_mscale(f, mscale_all_dim) if mscale and mscale_all_dim
                 else get_mscale(f)
      softmax scale *= get_mscale(f, mscale_all_dim)**2 if mscale_all_dim else 1
    megatron (YarnRotaryEmbedding + MLASelfAttention):
      cos/sin *= get_mscale(f, mscale)/get_mscale(f, mscale_all_dim)    (always)
      softmax scale *= get_mscale(rotary_scaling_factor, mscale_all_dim)**2 (even for rope_type 'rope')
    """
    rope = dict(rope or {})
    rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    rope.pop("type", None)
    theta = rope.pop("rope_theta", None)
    if theta is None:
        raise UserError(f"{what} has no rope_theta")
    out = {"rotary_base": float(theta), "model.rotary_base": float(theta), "rotary_percent": 1.0,
           "model.rotary_percent": 1.0, "model.position_embedding_type": "rope"}
    partial = rope.pop("partial_rotary_factor", 1.0)
    if partial not in (None, 1, 1.0):
        raise UserError(f"{what}.partial_rotary_factor={partial} is not supported with MLA")
    if rope_type == "default":
        if rope:
            raise UserError(f"unknown {what} keys for rope_type 'default': {sorted(rope)}")
        # rotary_scaling_factor=1 makes megatron's softmax mscale 1 (it applies it for 'rope' too).
        out.update(rope_type="rope", rotary_scaling_factor=1.0, mscale=1.0, mscale_all_dim=0.0)
        return out
    if rope_type != "yarn":
        raise UserError(f"{what}.rope_type={rope_type!r} is not supported with MLA (megatron has 'rope' and "
                        "'yarn')")
    orig = rope.pop("original_max_position_embeddings", None)
    factor = rope.pop("factor", None)
    if orig is None:
        raise UserError(f"{what}.original_max_position_embeddings is required for yarn")
    if factor is None:  # HF: factor = max_position_embeddings / original_max_position_embeddings
        factor = max_position_embeddings / orig
    mscale = rope.pop("mscale", None)
    mscale_all_dim = rope.pop("mscale_all_dim", None)
    beta_fast = rope.pop("beta_fast", None) or 32
    beta_slow = rope.pop("beta_slow", None) or 1
    truncate = rope.pop("truncate", True)
    attention_factor = rope.pop("attention_factor", None)
    if rope:
        raise UserError(f"unknown {what} keys for yarn: {sorted(rope)}")
    if not truncate:
        raise UserError(f"{what}.truncate=False is not supported (megatron MLA yarn always rounds the "
                        "correction range)")
    if mscale and mscale_all_dim:
        m, m_all = float(mscale), float(mscale_all_dim)
    elif mscale_all_dim:
        # HF: cos/sin factor get_mscale(f) (mscale ignored), softmax uses mscale_all_dim: megatron ties the
        # cos/sin factor to mscale/mscale_all_dim and cannot express this combination.
        raise UserError(f"{what}: mscale_all_dim={mscale_all_dim} with mscale={mscale!r} is not supported "
                        "(megatron divides the rope factor by get_mscale(mscale_all_dim))")
    else:
        # HF uses get_mscale(factor) on cos/sin and no softmax mscale: megatron mscale=1, mscale_all_dim=0.
        m, m_all = 1.0, 0.0
    if attention_factor is not None:
        expected = _yarn_mscale(factor, m) / _yarn_mscale(factor, m_all)
        if not math.isclose(float(attention_factor), expected, rel_tol=1e-9):
            raise UserError(f"{what}.attention_factor={attention_factor} is not supported (megatron derives "
                            f"it from factor/mscale: {expected})")
    out.update(rope_type="yarn", rotary_scaling_factor=float(factor), original_max_position_embeddings=int(orig),
               beta_fast=float(beta_fast), beta_slow=float(beta_slow), mscale=m, mscale_all_dim=m_all)
    return out


# ---------------------------------------------------------------------------------------------------
# the conversion
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelArgs:
    """What GPTModel needs besides the TransformerConfig (see megatron_patch.models.builder)."""

    vocab_size: int  # HF vocab size (un-padded)
    max_position_embeddings: int
    untie_embeddings_and_output_weights: bool
    position_embedding_type: str = "rope"
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0
    make_vocab_size_divisible_by: int = 128

    def padded_vocab_size(self, tensor_model_parallel_size: int = 1) -> int:
        """Megatron-LM's rule: pad to a multiple of make_vocab_size_divisible_by * TP."""
        multiple = self.make_vocab_size_divisible_by * tensor_model_parallel_size
        return -(-self.vocab_size // multiple) * multiple

    def gpt_model_kwargs(self, tensor_model_parallel_size: int = 1) -> dict:
        return dict(
            vocab_size=self.padded_vocab_size(tensor_model_parallel_size),
            max_sequence_length=self.max_position_embeddings,
            share_embeddings_and_output_weights=not self.untie_embeddings_and_output_weights,
            position_embedding_type=self.position_embedding_type,
            rotary_base=self.rotary_base,
            rotary_percent=self.rotary_percent,
        )


def hf_fields(hf_config) -> dict:
    """Every key of the HF config, as transformers serialises it (extra config.json keys included)."""
    d = hf_config.to_dict()
    # attribute_map aliases (e.g. DeepseekV3 num_mtp_layers -> num_nextn_predict_layers) appear under
    # their canonical name in to_dict; keep the canonical one only.
    for alias, canonical in getattr(hf_config, "attribute_map", {}).items():
        if alias in d and canonical in d:
            d.pop(alias)
    return d


def convert_config(hf_config, mapping: Sequence[Entry], config_cls, overrides: dict, family: str,
                   make_vocab_size_divisible_by: int = 128):
    """Apply a mapping list -> (megatron config, ModelArgs). Raises UserError on unknown HF fields,
    unsupported values and bad overrides."""
    values = hf_fields(hf_config)
    entries = list(GENERIC_IGNORED) + list(mapping)
    known = {name for e in entries for name in e.hf}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"{family}: HF config field(s) {', '.join(unknown)} are not known to the {family} "
                        "mapping; add them to megatron_patch/models/families (mapped, checked or ignored)")

    def get(name):
        if name in values:
            return values[name]
        return getattr(hf_config, name, None)

    out: dict[str, Any] = {}
    for e in entries:
        if e.kind == "ignored":
            continue
        args = [get(n) for n in e.hf]
        try:
            value = e.fn(*args) if e.fn is not None else args[0]
        except UserError as err:
            msg = str(err)
            raise UserError(msg if msg.startswith(f"{family}:") else f"{family}: {msg}") from None
        if e.kind == "check":
            if not value:
                shown = ", ".join(f"{n}={a!r}" for n, a in zip(e.hf, args))
                raise UserError(f"{family}: unsupported {shown}: {e.why}")
            continue
        if isinstance(value, dict):
            out.update(value)
        elif len(e.targets) == 1:
            out[e.targets[0]] = value
        else:
            out.update(zip(e.targets, value))

    model_kw = {k[len("model."):]: v for k, v in out.items() if k.startswith("model.")}
    cfg_kw = {k: v for k, v in out.items() if not k.startswith("model.")}

    names = {f.name for f in dataclasses.fields(config_cls)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise UserError(f"{family}: override(s) {', '.join(bad)} are not {config_cls.__name__} fields")
    clash = sorted(k for k in overrides if k in cfg_kw and k not in TUNABLE and overrides[k] != cfg_kw[k])
    if clash:
        raise UserError(f"{family}: override(s) {', '.join(clash)} contradict the HF config (they are read from "
                        "it); change the HF config instead")
    cfg_kw.update(overrides)
    # megatron-core's default is transformer_engine; what we build unless told otherwise is the local spec
    if "transformer_impl" in names:
        cfg_kw.setdefault("transformer_impl", "local")
    try:
        config = config_cls(**cfg_kw)
    except (ValueError, AssertionError, TypeError) as err:
        raise UserError(f"{family}: megatron-core rejects the mapped config: {err}") from err
    args = ModelArgs(make_vocab_size_divisible_by=make_vocab_size_divisible_by, **model_kw)
    return config, args


# ---------------------------------------------------------------------------------------------------
# layer spec (one for all families: megatron-core local modules; the runtime swaps kernels)
# ---------------------------------------------------------------------------------------------------
def layer_spec(mcore_config, vp_stage: int | None = None):
    """The TE spec when config.transformer_impl is transformer_engine (models/impl.py), else
    megatron_patch.models.spec.local_block_spec: get_gpt_decoder_block_spec(config,
    use_transformer_engine=False, normalization="RMSNorm") with MLA's q/kv down-projections replicated
    (DuplicatedLinear, as TE's 'duplicated' mode) instead of ColumnParallelLinear."""
    from megatron_patch.models.spec import local_block_spec, te_block_spec, uses_te

    if uses_te(mcore_config):  # --transformer-impl transformer_engine (models/impl.py)
        return te_block_spec(mcore_config, vp_stage=vp_stage)
    return local_block_spec(mcore_config, vp_stage=vp_stage)


def mtp_block_spec(mcore_config, spec=None, vp_stage: int | None = None):
    """The MTP block spec (None when the config has no MTP layers or this stage builds none). Its
    transformer layer is the block spec's last layer spec (megatron-core's rule)."""
    if not getattr(mcore_config, "mtp_num_layers", None):
        return None
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

    if spec is None:
        spec = layer_spec(mcore_config, vp_stage=vp_stage)
    if hasattr(spec, "layer_specs") and not spec.layer_specs:
        # A stage with MTP and no decoder layer (a layout string's "...|mL"): Megatron-LM's gpt_builders then
        # takes the model's own decoder layer spec; the last layer's of the unpipelined block is that.
        import dataclasses

        from megatron_patch.models.builder import ParallelLayout

        whole = dataclasses.replace(mcore_config, **ParallelLayout().pipeline_overrides())
        spec = layer_spec(whole)
    from megatron_patch.models.spec import uses_te

    return get_gpt_mtp_block_spec(mcore_config, spec, use_transformer_engine=uses_te(mcore_config),
                                  vp_stage=vp_stage)


# ---------------------------------------------------------------------------------------------------
# table helpers
# ---------------------------------------------------------------------------------------------------
def shard_context(mcore_config, args: ModelArgs, tensor_model_parallel_size: int = 1) -> ShardContext:
    return ShardContext(
        num_attention_heads=mcore_config.num_attention_heads,
        num_query_groups=mcore_config.num_query_groups or mcore_config.num_attention_heads,
        kv_channels=mcore_config.kv_channels,
        padded_vocab_size=args.padded_vocab_size(tensor_model_parallel_size),
    )


@dataclass(frozen=True)
class ConcreteRow:
    """One ParamRow with `{layer}` / `{expert}` filled in (global indices on both sides)."""

    mcore: str
    hf: tuple[str, ...]
    row: ParamRow
    layer: int | None = None
    expert: int | None = None


def expand_rows(rows: Iterable[ParamRow], num_layers: int, num_experts: int = 0) -> list[ConcreteRow]:
    """Fill `{layer}` over row.layers (or every decoder layer) and `{expert}` over all experts."""
    out = []
    for r in rows:
        layers = [None]
        if "{layer}" in r.mcore or any("{layer}" in h for h in r.hf):
            layers = list(r.layers) if r.layers is not None else list(range(num_layers))
        experts = list(range(num_experts)) if r.is_expert else [None]
        for layer in layers:
            for expert in experts:
                fmt = {}
                if layer is not None:
                    fmt["layer"] = layer
                if expert is not None:
                    fmt["expert"] = expert
                out.append(ConcreteRow(r.mcore.format(**fmt), tuple(h.format(**fmt) for h in r.hf), r,
                                       layer, expert))
    return out


class ConfigMapper:
    """A family's `to_mcore_config`: callable as `mapper(hf_config, **overrides) -> config`; also gives
    the GPTModel arguments (`model_args`) and both at once (`convert`). `mapping` is the readable list."""

    def __init__(self, family: str, mapping: Sequence[Entry], config_cls: str):
        self.family = family
        self.mapping = list(mapping)
        self._config_cls = config_cls  # "TransformerConfig" or "MLATransformerConfig" (imported lazily)

    @property
    def config_cls(self):
        from megatron_patch.models import configs

        return getattr(configs, self._config_cls)

    def convert(self, hf_config, make_vocab_size_divisible_by: int = 128, **overrides):
        return convert_config(hf_config, self.mapping, self.config_cls, overrides, self.family,
                              make_vocab_size_divisible_by=make_vocab_size_divisible_by)

    def __call__(self, hf_config, **overrides):
        return self.convert(hf_config, **overrides)[0]

    def model_args(self, hf_config, make_vocab_size_divisible_by: int = 128) -> ModelArgs:
        return self.convert(hf_config, make_vocab_size_divisible_by)[1]

    def describe(self) -> str:
        """The mapping as a table: one line per entry (generic PretrainedConfig entries included)."""
        lines = []
        for e in list(GENERIC_IGNORED) + self.mapping:
            hf = ", ".join(e.hf) or "-"
            what = {"map": ", ".join(e.targets), "check": f"check: {e.why}", "ignored": f"ignored: {e.why}"}[e.kind]
            if e.kind == "map" and not e.hf:
                what = f"{e.targets[0]} = {e.fn()!r}"
            lines.append(f"{hf:60s} -> {what}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"ConfigMapper({self.family}, {len(self.mapping)} entries)"


def standard_hooks(has_moe: bool, has_shared: bool = False) -> list:
    """Hook points shared by the GPT-style families (module paths; `{layer}` expands over layers where
    both modules exist). Megatron outputs are [s, b, h] (attention/MLP return (out, bias) tuples: take
    [0]); HF's are [b, s, h]. Router: megatron returns (probs[tokens, E], routing_map), HF's gate returns
    (router_logits, top-k weights, top-k indices)."""
    from megatron_patch.models.families.base import HookPoint

    hooks = [
        HookPoint("embedding", "embedding", "model.embed_tokens"),
        HookPoint("input_layernorm", "decoder.layers.{layer}.input_layernorm", "model.layers.{layer}.input_layernorm"),
        HookPoint("attention", "decoder.layers.{layer}.self_attention", "model.layers.{layer}.self_attn"),
        HookPoint("pre_mlp_layernorm", "decoder.layers.{layer}.pre_mlp_layernorm",
                  "model.layers.{layer}.post_attention_layernorm"),
    ]
    # Listed in execution order (router and shared experts run inside the MLP): the comparison reports
    # rows in table order, so its first FAIL row is the first place the two models diverge.
    if has_moe:
        hooks.append(HookPoint("router", "decoder.layers.{layer}.mlp.router", "model.layers.{layer}.mlp.gate",
                               kind="router"))
    if has_shared:
        hooks.append(HookPoint("shared_experts", "decoder.layers.{layer}.mlp.shared_experts",
                               "model.layers.{layer}.mlp.shared_experts"))
    hooks += [
        HookPoint("mlp", "decoder.layers.{layer}.mlp", "model.layers.{layer}.mlp"),
        HookPoint("layer", "decoder.layers.{layer}", "model.layers.{layer}"),
        HookPoint("final_norm", "decoder.final_layernorm", "model.norm"),
        HookPoint("logits", "output_layer", "lm_head", kind="logits"),
    ]
    return hooks
