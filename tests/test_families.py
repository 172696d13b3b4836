"""Family tables: HF config -> megatron config (field by field, on the published configs), refusal of
unknown / unsupported fields, the name table against saved mini models and a real megatron GPTModel,
TP shard/merge round trips, and make-mini."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from megatron_patch.errors import UserError
from megatron_patch.models.families import (FAMILIES, expand_rows, family_for_config, get_family, hf_copies,
                                            model_args, moe_layers, shard_context)
from megatron_patch.convert.mini import build_hf_config, build_model, config_dict, make_mini, parse_sets
from megatron_patch.models.families.base import strip_vocab_padding

DATA = Path(__file__).parent / "data" / "real_configs"
# published config.json -> family; PRESET_OF: the family whose "real-config" preset copies it
PRESET_OF = {"deepseek-v2-lite": "deepseek_v2", "deepseek-v3": "deepseek_v3", "deepseek-v3.2-exp": "deepseek_v32",
             "qwen2.5-32b": "qwen2", "qwen3-30b-a3b": "qwen3_moe"}
REAL = dict(PRESET_OF, **{"deepseek-v2": "deepseek_v2"})


def real_config(name):
    return AutoConfig.from_pretrained(DATA / name)


def num_experts(hf):
    return getattr(hf, "n_routed_experts", None) or getattr(hf, "num_experts", None) or 0


# ---------------------------------------------------------------------------------------------------
# HF config -> megatron config, on the published configs
# ---------------------------------------------------------------------------------------------------
_MLA_COMMON = dict(normalization="RMSNorm", gated_linear_unit=True, add_bias_linear=False, add_qkv_bias=False,
                   qk_layernorm=True, multi_latent_attention=True, rope_type="yarn", rotary_base=10000.0,
                   rotary_scaling_factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
                   moe_router_dtype="fp32", moe_token_dispatcher_type="alltoall", moe_grouped_gemm=False,
                   moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=0.001, hidden_dropout=0.0,
                   attention_dropout=0.0, layernorm_epsilon=1e-6, init_method_std=0.02)

_V2_LITE = dict(
        _MLA_COMMON, num_layers=27, hidden_size=2048, ffn_hidden_size=10944, num_attention_heads=16,
        num_query_groups=16, kv_channels=128, q_lora_rank=None, kv_lora_rank=512, qk_head_dim=128,
        qk_pos_emb_head_dim=64, v_head_dim=128, mscale=0.707, mscale_all_dim=0.707, num_moe_experts=64,
        moe_router_topk=6, moe_ffn_hidden_size=1408, moe_shared_expert_intermediate_size=2 * 1408,
        moe_layer_freq=[0] + [1] * 26, moe_router_score_function="softmax", moe_router_pre_softmax=True,
        moe_router_enable_expert_bias=False, moe_router_topk_scaling_factor=None, moe_router_num_groups=None,
        moe_router_group_topk=None, moe_router_group_score_topk=None, mtp_num_layers=None)

_DEEPSEEK_V3 = dict(
    _MLA_COMMON, num_layers=61, hidden_size=7168, ffn_hidden_size=18432, num_attention_heads=128,
    num_query_groups=128, kv_channels=128, q_lora_rank=1536, kv_lora_rank=512, qk_head_dim=128,
    qk_pos_emb_head_dim=64, v_head_dim=128, mscale=1.0, mscale_all_dim=1.0, num_moe_experts=256,
    moe_router_topk=8, moe_ffn_hidden_size=2048, moe_shared_expert_intermediate_size=2048,
    moe_layer_freq=[0] * 3 + [1] * 58, moe_router_score_function="sigmoid", moe_router_pre_softmax=False,
    moe_router_enable_expert_bias=True, moe_router_topk_scaling_factor=2.5, moe_router_num_groups=8,
    moe_router_group_topk=4, moe_router_group_score_topk=2, mtp_num_layers=1)
# V3.2-Exp is V3 plus DSA's indexer
_DEEPSEEK_V32 = dict(
    _DEEPSEEK_V3, experimental_attention_variant="dsa", dsa_indexer_n_heads=64, dsa_indexer_head_dim=128,
    dsa_indexer_topk=2048, dsa_indexer_loss_coeff=0.0)

EXPECTED = {
    "deepseek-v2-lite": _V2_LITE,
    "deepseek-v2": dict(  # 236B: q_lora, group_limited_greedy (a group scored by its best expert)
        _V2_LITE, num_layers=60, hidden_size=5120, ffn_hidden_size=12288, num_attention_heads=128,
        num_query_groups=128, q_lora_rank=1536, num_moe_experts=160, moe_ffn_hidden_size=1536,
        moe_shared_expert_intermediate_size=2 * 1536, moe_layer_freq=[0] + [1] * 59,
        moe_router_topk_scaling_factor=16.0, moe_router_num_groups=8, moe_router_group_topk=3,
        moe_router_group_score_topk=1),
    "deepseek-v3": _DEEPSEEK_V3,
    "deepseek-v3.2-exp": _DEEPSEEK_V32,
    "qwen2.5-32b": dict(
        num_layers=64, hidden_size=5120, ffn_hidden_size=27648, num_attention_heads=40, num_query_groups=8,
        kv_channels=128, normalization="RMSNorm", layernorm_epsilon=1e-5, gated_linear_unit=True,
        add_bias_linear=False, add_qkv_bias=True, qk_layernorm=False, multi_latent_attention=False,
        num_moe_experts=None, hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.02, mtp_num_layers=None),
    "qwen3-30b-a3b": dict(
        num_layers=48, hidden_size=2048, ffn_hidden_size=6144, num_attention_heads=32, num_query_groups=4,
        kv_channels=128, normalization="RMSNorm", layernorm_epsilon=1e-6, gated_linear_unit=True,
        add_bias_linear=False, add_qkv_bias=False, qk_layernorm=True, multi_latent_attention=False,
        num_moe_experts=128, moe_router_topk=8, moe_ffn_hidden_size=768, moe_shared_expert_intermediate_size=None,
        moe_layer_freq=[1] * 48, moe_router_score_function="softmax", moe_router_pre_softmax=False,
        moe_router_enable_expert_bias=False, moe_router_topk_scaling_factor=None, moe_router_num_groups=None,
        moe_router_dtype="fp32", moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.001,
        moe_grouped_gemm=False, hidden_dropout=0.0, attention_dropout=0.0, mtp_num_layers=None),
}

EXPECTED_ARGS = {
    "deepseek-v2-lite": dict(vocab_size=102400, max_position_embeddings=163840, rotary_base=10000.0),
    "deepseek-v2": dict(vocab_size=102400, max_position_embeddings=163840, rotary_base=10000.0),
    "deepseek-v3": dict(vocab_size=129280, max_position_embeddings=163840, rotary_base=10000.0),
    "deepseek-v3.2-exp": dict(vocab_size=129280, max_position_embeddings=163840, rotary_base=10000.0),
    "qwen2.5-32b": dict(vocab_size=152064, max_position_embeddings=131072, rotary_base=1000000.0),
    "qwen3-30b-a3b": dict(vocab_size=151936, max_position_embeddings=40960, rotary_base=1000000.0),
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_config_maps_field_by_field(name):
    import torch.nn.functional as F

    hf = real_config(name)
    fam = family_for_config(hf)
    assert fam.name == REAL[name]
    cfg = fam.to_mcore_config(hf)
    for key, want in EXPECTED[name].items():
        assert getattr(cfg, key) == want, f"{name}: {key} = {getattr(cfg, key)!r}, expected {want!r}"
    assert cfg.activation_func is F.silu
    args = model_args(hf)
    for key, want in EXPECTED_ARGS[name].items():
        assert getattr(args, key) == want, (name, key)
    assert args.untie_embeddings_and_output_weights is True
    kw = args.gpt_model_kwargs(tensor_model_parallel_size=8)
    assert kw["vocab_size"] % (128 * 8) == 0 and kw["vocab_size"] >= args.vocab_size
    assert kw["share_embeddings_and_output_weights"] is False


def test_real_config_presets_match_published_configs():
    for name, family in PRESET_OF.items():
        published = json.loads((DATA / name / "config.json").read_text())
        preset = get_family(family).presets["real-config"]
        for key, value in preset.items():
            if key == "rope_parameters":
                continue
            if key in published:
                assert published[key] == value, (name, key)
        if name == "qwen3-30b-a3b":
            assert preset["num_experts"] == published["num_experts"]


def test_overrides_pass_through_and_contradictions_refused():
    hf = real_config("deepseek-v3")
    cfg = get_family("deepseek_v3").to_mcore_config(
        hf, tensor_model_parallel_size=2, expert_model_parallel_size=4, sequence_parallel=True,
        params_dtype=torch.bfloat16, moe_token_dispatcher_type="allgather")
    assert (cfg.tensor_model_parallel_size, cfg.expert_model_parallel_size, cfg.params_dtype,
            cfg.moe_token_dispatcher_type) == (2, 4, torch.bfloat16, "allgather")
    with pytest.raises(UserError, match="not_a_field"):
        get_family("deepseek_v3").to_mcore_config(hf, not_a_field=1)
    with pytest.raises(UserError, match="hidden_size"):
        get_family("deepseek_v3").to_mcore_config(hf, hidden_size=1024)


# ---------------------------------------------------------------------------------------------------
# refusals: unknown fields, unsupported values, unsupported architectures
# ---------------------------------------------------------------------------------------------------
def _with(name, **changes):
    data = json.loads((DATA / name / "config.json").read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    config_cls = type(real_config(name))
    data.pop("model_type", None)
    return config_cls(**data)


@pytest.mark.parametrize("name,changes,match", [
    ("deepseek-v3", dict(some_new_knob=3), "some_new_knob"),
    ("qwen2.5-32b", dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
     "rope_type"),
    ("deepseek-v3", dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_type"),
    ("deepseek-v3", dict(norm_topk_prob=False), "norm_topk_prob"),
    ("deepseek-v3", dict(n_group=64, topk_group=1), "exceeds"),  # 8 experts wanted from one group of 4
    ("deepseek-v3", dict(n_group=3, topk_group=2), "n_group=3"),
    ("deepseek-v3", dict(rope_interleave=False), "rope_interleave"),
    ("deepseek-v3", dict(topk_method="greedy"), "topk_method"),
    ("deepseek-v3", dict(attention_bias=True), "attention_bias"),
    ("deepseek-v2-lite", dict(topk_method="noaux_tc"), "topk_method"),
    ("deepseek-v2-lite", dict(norm_topk_prob=True), "norm_topk_prob"),
    ("deepseek-v2-lite", dict(moe_layer_freq=2), "moe_layer_freq"),
    ("deepseek-v2-lite", dict(scoring_func="sigmoid"), "scoring_func"),
    ("deepseek-v2-lite", dict(num_key_value_heads=8), "num_key_value_heads"),
    ("deepseek-v2-lite", dict(hidden_act="gelu"), "hidden_act"),
    ("qwen2.5-32b", dict(use_sliding_window=True), "use_sliding_window"),
    ("qwen3-30b-a3b", dict(attention_bias=True), "attention_bias"),
    ("qwen3-30b-a3b", dict(rope_scaling={"rope_type": "default", "rope_theta": 1e6, "mystery": 1}), "mystery"),
])
def test_unsupported_fields_are_refused_by_name(name, changes, match):
    hf = _with(name, **changes)
    with pytest.raises(UserError, match=match):
        family_for_config(hf).to_mcore_config(hf)


@pytest.mark.parametrize("name,changes,groups", [
    ("deepseek-v2-lite", dict(topk_method="group_limited_greedy", n_group=8, topk_group=6), (8, 6, 1)),
    ("deepseek-v2-lite", dict(topk_method="greedy", n_group=8, topk_group=3), (None, None, None)),
    ("deepseek-v2-lite", dict(topk_method="group_limited_greedy", n_group=8, topk_group=8), (None, None, None)),
    ("deepseek-v3", dict(topk_group=2), (8, 2, 2)),  # megatron alone would sum each group's top 8 // 2 = 4
    ("deepseek-v3", dict(n_group=1, topk_group=1), (None, None, None)),
])
def test_group_limited_routing_maps_with_the_hf_group_score(name, changes, groups):
    hf = _with(name, **changes)
    cfg = family_for_config(hf).to_mcore_config(hf)
    assert (cfg.moe_router_num_groups, cfg.moe_router_group_topk, cfg.moe_router_group_score_topk) == groups


def test_group_score_survives_layout_copies():
    import copy

    from megatron_patch.models.builder import ParallelLayout, apply_layout

    cfg = family_for_config(real_config("deepseek-v2")).to_mcore_config(real_config("deepseek-v2"))
    laid_out = apply_layout(cfg, ParallelLayout(tp=2, ep=8))
    assert laid_out.moe_router_group_score_topk == 1 and laid_out.tensor_model_parallel_size == 2
    assert copy.deepcopy(laid_out).moe_router_group_score_topk == 1


def test_unsupported_architecture_names_it_and_lists_supported():
    hf = AutoConfig.for_model("llama")
    hf.architectures = ["LlamaForCausalLM"]
    with pytest.raises(UserError) as err:
        family_for_config(hf)
    msg = str(err.value)
    assert "LlamaForCausalLM" in msg and "DeepseekV3ForCausalLM" in msg and "\n" not in msg
    with pytest.raises(UserError, match="supported"):
        get_family("gpt2")


# ---------------------------------------------------------------------------------------------------
# mini models: make-mini, the name table, TP shard/merge
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minis(tmp_path_factory):
    root = tmp_path_factory.mktemp("minis")
    return {f: make_mini(f, root / f, seed=3) for f in FAMILIES}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_make_mini_loads_with_identical_logits_and_tokenizer(minis, family):
    path = minis[family]
    hf = AutoConfig.from_pretrained(path)
    assert family_for_config(hf).name == family
    in_memory = build_model(build_hf_config(family, config_dict(family)), seed=3)
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, hf.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(in_memory(ids).logits, loaded(ids).logits)
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == hf.vocab_size
    text = "Experts route tokens; 42 layers."
    assert tok.decode(tok(text)["input_ids"]) == text
    if family == "deepseek_v3":
        bias = loaded.model.layers[1].mlp.gate.e_score_correction_bias
        assert bias.abs().sum() > 0  # randomised, not transformers' zeros
        assert hf.first_k_dense_replace == 1 and hf.n_group > 1 and hf.topk_group >= 1
        assert hf.rope_parameters["rope_type"] == "yarn"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_params_cover_every_saved_tensor_once(minis, family):
    from safetensors import safe_open

    hf = AutoConfig.from_pretrained(minis[family])
    rows = expand_rows(get_family(family).params(hf), hf.num_hidden_layers, num_experts(hf))
    with safe_open(str(minis[family] / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    hf_names = [h for r in rows for h in r.hf]
    assert len(hf_names) == len(set(hf_names)), "an HF tensor is used twice"
    assert len({r.mcore for r in rows}) == len(rows), "a Megatron name appears twice"
    copies = set(hf_copies(hf))
    assert set(hf_names) | copies == keys
    assert not set(hf_names) & copies
    if family in ("deepseek_v2", "deepseek_v3", "qwen3_moe"):
        assert any(".mlp.experts.7.gate_proj.weight" in h for h in hf_names)  # per-expert on-disk names
    if family == "deepseek_v3":
        assert "mtp.layers.0.eh_proj.weight" in {r.mcore for r in rows}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tp_shard_then_merge_gives_back_the_bytes(minis, family):
    from safetensors import safe_open

    path = minis[family]
    hf = AutoConfig.from_pretrained(path)
    fam = get_family(family)
    cfg = fam.to_mcore_config(hf)
    args = model_args(hf)
    rows = expand_rows(fam.params(hf), hf.num_hidden_layers, num_experts(hf))
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for tp in (2, 4):
            ctx = shard_context(cfg, args, tp)
            for r in rows:
                tensors = [f.get_tensor(h) for h in r.hf]
                shards = [r.row.split.shard(tensors, rank, tp, ctx) for rank in range(tp)]
                assert len({tuple(s.shape) for s in shards}) == 1, r.mcore
                merged = r.row.split.merge(shards, ctx)
                if r.row.split.name == "Vocab":
                    merged = [strip_vocab_padding(merged[0], hf.vocab_size)]
                assert len(merged) == len(tensors), r.mcore
                for a, b in zip(merged, tensors):
                    assert torch.equal(a, b), (r.mcore, tp)
        # vocab padding that does not divide evenly into the real rows
        emb = f.get_tensor("model.embed_tokens.weight")
    from megatron_patch.models.families.base import ShardContext, Vocab

    ctx = ShardContext(padded_vocab_size=600)
    shards = [Vocab.shard([emb], rank, 2, ctx) for rank in range(2)]
    assert shards[1][-88:].abs().sum() == 0
    assert torch.equal(strip_vocab_padding(Vocab.merge(shards, ctx)[0], emb.shape[0]), emb)


def test_moe_layer_helpers_agree_with_moe_layer_freq(minis):
    for family in FAMILIES:
        hf = AutoConfig.from_pretrained(minis[family])
        cfg = get_family(family).to_mcore_config(hf)
        freq = cfg.moe_layer_freq if isinstance(cfg.moe_layer_freq, list) else None
        if cfg.num_moe_experts:
            assert [i for i, f in enumerate(freq) if f] == moe_layers(hf)
        else:
            assert moe_layers(hf) == []


def test_real_config_tables_expand():
    hf = real_config("deepseek-v3")
    rows = expand_rows(get_family("deepseek_v3").params(hf), hf.num_hidden_layers, num_experts(hf))
    experts = 2 * 256
    # embedding, final norm, output; per layer 9 attention/norm rows; dense MLP 2; MoE router weight and
    # bias + shared fc1/fc2 + 2 per expert; MTP: enorm, hnorm, eh_proj, final norm + one MoE layer
    assert len(rows) == 3 + 61 * 9 + 3 * 2 + 58 * (4 + experts) + (4 + 9 + 4 + experts)
    assert "model.layers.61.embed_tokens.weight" in hf_copies(hf)


# ---------------------------------------------------------------------------------------------------
# against a real megatron-core GPTModel (two gloo ranks, TP=2 with SP, runtime shim)
# ---------------------------------------------------------------------------------------------------
def _megatron_check(rank, world, paths, tp, ep):
    """Build each family's GPTModel with its layer spec (+ MTP block) at TP=tp/EP=ep, fill every
    parameter from the mini checkpoint through the table's split kinds (shapes must match exactly, every
    parameter filled once), check the hook paths, and compare the logits (this rank's vocab slice) with
    the HF model's."""
    import dataclasses

    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from safetensors import safe_open

    from megatron_patch.models.families import mtp_block_spec

    out = {}
    for family, path in paths.items():
        hf = AutoConfig.from_pretrained(path)
        fam = get_family(family)
        experts = num_experts(hf)
        e = ep if experts else 1
        t = world // e if experts else world
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=t, expert_model_parallel_size=e)
        tensor_parallel.model_parallel_cuda_manual_seed(1)
        cfg = fam.to_mcore_config(hf, use_cpu_initialization=True, params_dtype=torch.float32,
                                  tensor_model_parallel_size=t, expert_model_parallel_size=e,
                                  sequence_parallel=t > 1)
        args = model_args(hf)
        spec = fam.layer_spec(cfg)
        model = GPTModel(cfg, spec, mtp_block_spec=mtp_block_spec(cfg, spec), **args.gpt_model_kwargs(t))
        state = {k: v for k, v in model.state_dict().items()
                 if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
        ctx = shard_context(cfg, args, t)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        etp_rank = parallel_state.get_expert_tensor_parallel_rank()
        etp = parallel_state.get_expert_tensor_parallel_world_size()
        ep_rank = parallel_state.get_expert_model_parallel_rank()
        local = experts // e if experts else 0
        res = {"problems": []}
        filled = []
        with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
            for r in expand_rows(fam.params(hf), hf.num_hidden_layers, experts):
                if r.expert is not None:
                    if r.expert // local != ep_rank:
                        continue
                    fmt = {"expert": r.expert % local} | ({} if r.layer is None else {"layer": r.layer})
                    name = r.row.mcore.format(**fmt)
                    shard = r.row.split.shard([f.get_tensor(h) for h in r.hf], etp_rank, etp, ctx)
                else:
                    name = r.mcore
                    shard = r.row.split.shard([f.get_tensor(h) for h in r.hf], tp_rank, t, ctx)
                if name not in state:
                    res["problems"].append(("not in model", name))
                elif shard.shape != state[name].shape:
                    res["problems"].append((name, tuple(shard.shape), tuple(state[name].shape)))
                else:
                    state[name].copy_(shard)
                    filled.append(name)
        res["problems"] += [("filled twice", n) for n in {n for n in filled if filled.count(n) > 1}]
        res["problems"] += [("not filled", n) for n in sorted(set(state) - set(filled))]
        res["mtp"] = any(n.startswith("mtp.layers.0.transformer_layer.mlp.router") for n in state)
        modules = {n for n, _ in model.named_modules()}
        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        hf_modules = {n for n, _ in hf_model.named_modules()}
        res["missing_hooks"] = [
            (h.mcore, h.hf) for h in fam.hooks(hf)
            if not any(h.mcore.format(layer=i) in modules and h.hf.format(layer=i) in hf_modules
                       for i in range(hf.num_hidden_layers))]
        if cfg.mtp_num_layers:  # megatron's forward needs labels with MTP: compare logits without it
            cfg = dataclasses.replace(cfg, mtp_num_layers=None)
            plain = GPTModel(cfg, fam.layer_spec(cfg), **args.gpt_model_kwargs(t))
            plain.load_state_dict(model.state_dict(), strict=False)
            model = plain
        model.eval()
        ids = torch.randint(0, hf.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            logits = model(ids, torch.arange(10).expand(2, -1), attention_mask=None)
            ref = hf_model(ids).logits
        lo = tp_rank * logits.shape[-1]
        hi = min(lo + logits.shape[-1], hf.vocab_size)
        res["logits_diff"] = (logits[..., :hi - lo] - ref[..., lo:hi]).abs().max().item()
        res["logits_scale"] = ref.abs().max().item()
        out[family] = res
    return out


def test_table_matches_megatron_gpt_model_at_tp2_and_hf_logits(minis):
    """Verified against megatron-core itself: names, TP=2 shard shapes (split kinds), MTP names, hooks,
    and the logits of the converted model (fp32) against the HF model's."""
    from megatron_patch.runtime.multirank import run_ranks

    results = run_ranks(_megatron_check, 2, timeout=240, args=({f: str(p) for f, p in minis.items()}, 2, 1),
                        env={"TORCHDYNAMO_DISABLE": "1"})
    for rank, result in enumerate(results):
        for family, res in result.items():
            assert res["problems"] == [], (rank, family, res["problems"][:5])
            assert res["missing_hooks"] == [], (family, res["missing_hooks"])
            assert res["mtp"] == (family == "deepseek_v3")
            # fp32; every layer moves the residual stream (initializer_range 0.1)
            assert res["logits_diff"] <= 1e-5 * max(1.0, res["logits_scale"]), (rank, family, res)


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------
def test_cli_make_mini_real_config_and_errors(tmp_path, capsys):
    from megatron_patch.cli import main

    out = tmp_path / "v3-real"
    assert main(["make-mini", "--family", "deepseek_v3", "--preset", "real-config", "--out", str(out),
                 "--set", "rope_parameters.factor=20", "--set", "num_nextn_predict_layers=0"]) == 0
    written = json.loads((out / "config.json").read_text())
    assert written["hidden_size"] == 7168 and written["num_hidden_layers"] == 4
    assert written["rope_parameters"]["factor"] == 20 and written["num_nextn_predict_layers"] == 0
    assert not list(out.glob("*.safetensors"))
    assert main(["make-mini", "--family", "deepseek_v3", "--preset", "real-config", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["make-mini", "--family", "qwen2", "--preset", "real-config", "--out", str(out), "--force",
                 "--layers", "3"]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2"
    assert main(["make-mini", "--family", "qwen2", "--out", str(tmp_path / "x"), "--experts", "4"]) == 2
    # refused before anything is written
    assert main(["make-mini", "--family", "deepseek_v3", "--out", str(tmp_path / "bad"),
                 "--set", "norm_topk_prob=false"]) == 2
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))


def test_parse_sets():
    assert parse_sets(["a=3", "b=0.5", "c=true", "d=null", "e=[1,2]", "f=hello", "g=False"]) == dict(
        a=3, b=0.5, c=True, d=None, e=[1, 2], f="hello", g=False)
    with pytest.raises(UserError):
        parse_sets(["novalue"])


def test_cli_family_choices_match_registry():
    import argparse

    from megatron_patch.convert import mini

    parser = argparse.ArgumentParser()
    mini.register(parser.add_subparsers())
    action = next(a for a in parser._subparsers._group_actions[0].choices["make-mini"]._actions
                  if a.dest == "family")
    assert set(action.choices) == set(FAMILIES)
