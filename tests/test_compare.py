"""megatron-patch compare: Megatron activations against HF, hook point by hook point, at several layouts.

The mini models of all four families must PASS at fp32 (logits within 1e-5) at TP1 and at a multi-rank
layout; deliberately broken conversions must FAIL with the first FAIL row at the broken place. To keep the
suite fast on a small CPU box, the comparisons share rank start-up: one 1-rank group runs every TP1 case
(and the broken ones), one 4-rank group runs the multi-rank layouts (data parallel fills the world).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_patch.models.builder import ParallelLayout, minimal_world_size
from megatron_patch.runtime.multirank import run_ranks
from megatron_patch.verify.compare import CompareSpec, run_specs_in_group

FAMILIES = ("deepseek_v2", "deepseek_v3", "qwen2", "qwen3_moe")
ENV = {"TORCHDYNAMO_DISABLE": "1"}
LOGITS_BAR = 1e-5


@pytest.fixture(scope="module")
def minis(tmp_path_factory):
    from megatron_patch.convert.mini import make_mini

    root = tmp_path_factory.mktemp("compare-minis")
    minis = {f: str(make_mini(f, root / f, seed=3)) for f in FAMILIES}
    minis[GROUPED] = str(make_mini("deepseek_v2", root / GROUPED, seed=3, overrides=GROUPED_V2))
    return minis


# ---------------------------------------------------------------------------------------------------
# broken conversions, applied on the rank after loading (CompareSpec.mutate)
# ---------------------------------------------------------------------------------------------------
def _swap_halves(weight):
    with torch.no_grad():
        gate, up = weight.chunk(2, dim=0)
        weight.copy_(torch.cat([up, gate], dim=0))


def swap_gate_up_dense_layer2(chunks, config, layout):
    """fc1 built as [up; gate] instead of [gate; up] in layer 2's dense MLP."""
    _swap_halves(chunks[0].decoder.layers[2].mlp.linear_fc1.weight)


def swap_gate_up_shared_experts_layer2(chunks, config, layout):
    _swap_halves(chunks[0].decoder.layers[2].mlp.shared_experts.linear_fc1.weight)


def wrong_rope_interleave(chunks, config, layout):
    """RoPE applied to interleaved pairs instead of the halves HF rotates (every attention layer)."""
    config.rotary_interleaved = not config.rotary_interleaved


def wrong_yarn_scaling(chunks, config, layout):
    """MLA YaRN with twice the scaling factor (a mis-mapped rope_parameters.factor): the interpolated
    frequencies are inv_freq / factor, fixed when the rotary embedding is built."""
    for layer in chunks[0].decoder.layers:
        rope = layer.self_attention.rotary_pos_emb
        rope.scaling_factor = rope.scaling_factor * 2
        rope.inv_freq_inter = rope.inv_freq_inter / 2
        rope.forward.cache_clear()


def zero_expert_bias(chunks, config, layout):
    """DeepSeek-V3's e_score_correction_bias dropped (left at megatron's zeros)."""
    for layer in chunks[0].decoder.layers:
        router = getattr(layer.mlp, "router", None)
        if router is not None:
            with torch.no_grad():
                router.expert_bias.zero_()


def swap_norms_layer1(chunks, config, layout):
    """Layer 1's input norm and pre-MLP norm weights exchanged (make-mini randomises norm weights)."""
    layer = chunks[0].decoder.layers[1]
    with torch.no_grad():
        a, b = layer.input_layernorm.weight, layer.pre_mlp_layernorm.weight
        saved = a.clone()
        a.copy_(b)
        b.copy_(saved)


def megatron_group_score(chunks, config, layout):
    """Groups scored by megatron's own rule (top-(topk // group_topk) sum) instead of DeepSeek-V2's max."""
    config.moe_router_group_score_topk = None


# DeepSeek-V2's group_limited_greedy in 4 groups of 2, one group kept, top-2 experts: HF scores a group by
# its best expert, megatron by default by the sum of its top 2 // 1 = 2 experts.
GROUPED = "deepseek_v2_grouped"
GROUPED_V2 = dict(topk_method="group_limited_greedy", n_group=4, topk_group=1)

BROKEN = [
    # (model, mutation, expected first FAIL row)
    ("qwen2", swap_gate_up_dense_layer2, ("mlp", 2)),
    ("deepseek_v3", swap_gate_up_shared_experts_layer2, ("shared_experts", 2)),
    ("qwen3_moe", wrong_rope_interleave, ("attention", 0)),
    ("deepseek_v3", wrong_yarn_scaling, ("attention", 0)),
    ("deepseek_v3", zero_expert_bias, ("router", 1)),
    (GROUPED, megatron_group_score, ("router", 1)),
    ("qwen3_moe", swap_norms_layer1, ("input_layernorm", 1)),
]


def _torch_format_checkpoint(hf_path: str, root) -> str:
    """The mini model written in Megatron-LM's torch per-rank layout at TP1 (via the engine's table), with
    the Transformer Engine spec's names and grouped experts: compare reads them into its local-spec model."""
    from transformers import AutoConfig

    from megatron_patch.checkpoint.engine import RankPosition, ShardPlan
    from megatron_patch.checkpoint.hf_reader import HFCheckpoint
    from megatron_patch.checkpoint.key_map import TE, Naming
    from megatron_patch.checkpoint.mcore_layout import write_latest, write_rank
    from megatron_patch.models.families import family_for_config

    hf = AutoConfig.from_pretrained(hf_path)
    plan = ShardPlan(family_for_config(hf), hf, ParallelLayout(), naming=Naming(TE, grouped=True))
    with HFCheckpoint(hf_path) as ckpt:
        state_dicts = plan.rank_state_dicts(ckpt.get_slice, RankPosition(), extra_state=True)
    assert "decoder.layers.1.mlp.experts.linear_fc1.weight0" in state_dicts[0]
    write_rank(root, "release", 0, 0, 0, {"tp": 1, "pp": 1, "ep": 1}, state_dicts, args={})
    write_latest(root, "release")
    return str(root)


@pytest.fixture(scope="module")
def single_rank_reports(minis, tmp_path_factory):
    mcore = _torch_format_checkpoint(minis["deepseek_v3"], tmp_path_factory.mktemp("mcore") / "ds3")
    specs = [CompareSpec(hf_path=minis[f]) for f in FAMILIES]
    specs.append(CompareSpec(hf_path=minis["deepseek_v3"], mcore_path=mcore))
    specs += [CompareSpec(hf_path=minis[f], mutate=fn) for f, fn, _ in BROKEN]
    specs.append(CompareSpec(hf_path=minis[GROUPED]))
    reports = run_ranks(run_specs_in_group, 1, timeout=300, args=(specs,), env=ENV)[0]
    return reports


# every family at TP2, PP2 and EP2 (MoE only), plus combinations; 4 ranks, the rest is data parallel
MULTI = [(f, ParallelLayout(tp=2)) for f in FAMILIES] + [(f, ParallelLayout(pp=2)) for f in FAMILIES] + [
    (f, ParallelLayout(ep=2, etp=1)) for f in FAMILIES if f != "qwen2"] + [
    ("deepseek_v3", ParallelLayout(tp=2, pp=2, ep=2, etp=1)),
    ("qwen3_moe", ParallelLayout(tp=2, ep=2, etp=2)),
    ("qwen2", ParallelLayout(pp=2, vpp=2)),
]


@pytest.fixture(scope="module")
def multi_rank_reports(minis):
    specs = [CompareSpec(hf_path=minis[f], layout=layout) for f, layout in MULTI]
    return run_ranks(run_specs_in_group, 4, timeout=600, args=(specs,), env=ENV)[0]


# ---------------------------------------------------------------------------------------------------
# random small configs (seeded, so a failure names a reproducible config)
# ---------------------------------------------------------------------------------------------------
def _random_moe_routing(rng, family):
    experts = rng.choice([4, 8])
    topk = rng.randint(1, 3)
    out = dict(num_experts_per_tok=topk, moe_intermediate_size=rng.choice([16, 32]))
    if family == "qwen3_moe":
        return dict(out, num_experts=experts, norm_topk_prob=rng.random() < 0.5)
    out.update(n_routed_experts=experts, n_shared_experts=rng.choice([1, 2]), routed_scaling_factor=rng.choice([1.0, 2.5]),
               first_k_dense_replace=rng.choice([0, 1]))
    min_group = 2 if family == "deepseek_v3" else 1
    groups = [g for g in (2, 4) if experts // g >= min_group]
    n_group = rng.choice(groups)
    topk_group = rng.randint(1, n_group - 1)
    out.update(n_group=n_group, topk_group=topk_group,
               num_experts_per_tok=min(topk, topk_group * (experts // n_group)))
    if family == "deepseek_v2":
        out["topk_method"] = rng.choice(["greedy", "group_limited_greedy"])
    else:
        out.update(norm_topk_prob=out["num_experts_per_tok"] > 1, num_nextn_predict_layers=rng.choice([0, 1]))
    return out


def random_config(family, seed):
    """HF config overrides for make-mini: layer count, widths, heads, experts, routing drawn at random."""
    import random

    rng = random.Random(seed)
    layers = rng.randint(2, 3)
    if family.startswith("deepseek"):
        heads = rng.choice([2, 4])
        out = dict(num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                   hidden_size=rng.choice([32, 64]), intermediate_size=rng.choice([48, 96]),
                   q_lora_rank=rng.choice([None, 16]), kv_lora_rank=rng.choice([16, 32]),
                   qk_nope_head_dim=rng.choice([8, 16]), qk_rope_head_dim=rng.choice([4, 8]),
                   v_head_dim=rng.choice([8, 16]))
        return dict(out, **_random_moe_routing(rng, family))
    heads = rng.choice([2, 4, 8])
    kv = rng.choice([d for d in (1, 2, 4) if heads % d == 0])
    head_dim = rng.choice([8, 16])
    out = dict(num_hidden_layers=layers, max_window_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
               hidden_size=heads * head_dim, intermediate_size=rng.choice([48, 96]),
               tie_word_embeddings=rng.random() < 0.5)
    if family == "qwen3_moe":
        out.update(head_dim=head_dim, **_random_moe_routing(rng, family))
    return out


RANDOM = [(f, seed) for f in FAMILIES for seed in (11, 12, 13)]


@pytest.fixture(scope="module")
def random_reports(tmp_path_factory):
    from megatron_patch.convert.mini import make_mini

    root = tmp_path_factory.mktemp("random-minis")
    specs = [CompareSpec(hf_path=str(make_mini(f, root / f"{f}-{seed}", seed=seed, overrides=random_config(f, seed))))
             for f, seed in RANDOM]
    return run_ranks(run_specs_in_group, 1, timeout=400, args=(specs,), env=ENV)[0]


@pytest.mark.parametrize("case", range(len(RANDOM)), ids=[f"{f}-seed{s}" for f, s in RANDOM])
def test_random_small_config_tp1_passes(random_reports, case):
    family, seed = RANDOM[case]
    _check_pass(random_reports[case], family)


def _check_pass(report, family):
    assert report["family"] == family
    failed = [(r["component"], r["layer"], r["max_abs"]) for r in report["rows"] if not r["passed"]]
    assert report["result"] == "PASS", failed
    assert report["logits"]["max_abs"] <= LOGITS_BAR, report["logits"]
    assert report["logits"]["top1_agreement"] == 1.0
    components = {r["component"] for r in report["rows"]}
    assert {"embedding", "attention", "mlp", "final_norm", "logits"} <= components
    if family != "qwen2":
        assert "router" in components
        routers = [r for r in report["rows"] if r["component"] == "router"]
        assert all(r["selection_mismatch"] == 0 for r in routers)
    if family.startswith("deepseek"):
        assert "shared_experts" in components
    layers = {r["layer"] for r in report["rows"] if r["component"] == "attention"}
    assert layers == set(range(report["model"]["num_layers"]))


@pytest.mark.parametrize("family", FAMILIES)
def test_tp1_fp32_passes(single_rank_reports, family):
    _check_pass(single_rank_reports[FAMILIES.index(family)], family)


def test_torch_format_mcore_path_passes(single_rank_reports):
    report = single_rank_reports[len(FAMILIES)]
    _check_pass(report, "deepseek_v3")
    assert "(torch)" in report["weights"]


def test_deepseek_v2_group_limited_greedy_passes(single_rank_reports, minis):
    hf = json.loads((Path(minis[GROUPED]) / "config.json").read_text())
    assert {k: hf[k] for k in GROUPED_V2} == GROUPED_V2 and hf["num_experts_per_tok"] == 2
    _check_pass(single_rank_reports[-1], "deepseek_v2")


@pytest.mark.parametrize("case", range(len(MULTI)), ids=[f"{f}-{lay.describe()}" for f, lay in MULTI])
def test_multi_rank_fp32_passes(multi_rank_reports, case):
    family, lay = MULTI[case]
    report = multi_rank_reports[case]
    _check_pass(report, family)
    got = report["layout"]
    assert (got["tp"], got["pp"], got["ep"], got["etp"], got["vpp"]) == (lay.tp, lay.pp, lay.ep, lay.expert_tp, lay.vpp)


@pytest.mark.parametrize("case", range(len(BROKEN)), ids=[fn.__name__ for _, fn, _ in BROKEN])
def test_broken_conversion_fails_at_the_first_wrong_row(single_rank_reports, case):
    family, _, (component, layer) = BROKEN[case]
    report = single_rank_reports[len(FAMILIES) + 1 + case]
    assert report["result"] == "FAIL"
    first = next(i for i, r in enumerate(report["rows"]) if not r["passed"])
    assert (report["rows"][first]["component"], report["rows"][first]["layer"]) == (component, layer)
    assert report["first_failure"]["component"] == component and report["first_failure"]["layer"] == layer
    assert all(r["passed"] for r in report["rows"][:first])
    if component == "router":  # other experts chosen (weights are compared on the tokens that agree)
        assert report["rows"][first]["selection_mismatch"] > 0
    else:
        assert report["rows"][first]["max_abs"] > 1e-3  # a real difference, not a tolerance hair


# ---------------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------------
def test_cli_pass_writes_json_and_plot(minis, tmp_path, capsys, monkeypatch):
    from megatron_patch.cli import main

    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    out_json, out_png = tmp_path / "r" / "report.json", tmp_path / "r" / "diff.png"
    code = main(["compare", "--hf-path", minis["qwen3_moe"], "--tp", "2", "--pp", "1", "--ep", "2", "--etp", "1",
                 "--json", str(out_json), "--plot", str(out_png)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "Testing Results" in text and "Overall Result" in text and text.rstrip().endswith("PASS")
    assert "router" in text and "TP2xPP1xEP2xETP1xSP on 2 rank(s)" in text
    report = json.loads(out_json.read_text())
    assert report["result"] == "PASS"
    assert report["layout"] == {"tp": 2, "pp": 1, "ep": 2, "etp": 1, "vpp": None, "sp": True, "world_size": 2,
                                "name": "TP2xPP1xEP2xETP1xSP"}
    assert report["dtype"] == "fp32" and report["dtypes"]["hf"] == "float32"
    assert report["tolerances"]["atol"] == 1e-5
    assert set(report["logits"]) >= {"max_abs", "mean_abs", "top1_agreement"}
    for row in report["rows"]:
        assert {"component", "layer", "max_abs", "mean_abs", "cos", "pass"} <= set(row)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_fail_exit_code(minis, capsys, monkeypatch):
    from megatron_patch.cli import main

    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    # fp32 differences are ~1e-7..1e-6 (SDPA's fused kernel against HF's eager attention, summation order in
    # the MoE): a 1e-9 bar must fail at the first of them
    code = main(["compare", "--hf-path", minis["deepseek_v3"], "--atol", "1e-9"])
    text = capsys.readouterr().out
    assert code == 1, text
    assert text.rstrip().endswith("FAIL") and "First mismatch: layer 0 attention" in text
    assert "1e-09" in text  # the tolerance is printed


@pytest.mark.parametrize("args, match", [
    (["--hf-path", "/nonexistent/model"], "directory not found"),
    (["--ep", "3"], "EP=3 does not divide"),
    (["--tp", "2", "--seq-length", "7"], "divisible by TP=2"),
    (["--mcore-path", "/nonexistent/ckpt"], "--mcore-path"),
    (["--vpp", "0"], "--vpp 0: must be >= 1"),
])
def test_cli_bad_input_exits_2(minis, capsys, args, match):
    from megatron_patch.cli import main

    if "--hf-path" not in args:
        args = ["--hf-path", minis["qwen3_moe"]] + args
    assert main(["compare"] + args) == 2
    assert match in capsys.readouterr().err


def test_minimal_world_size():
    assert minimal_world_size(ParallelLayout()) == 1
    assert minimal_world_size(ParallelLayout(tp=2, pp=2, ep=2, etp=1)) == 4
    assert minimal_world_size(ParallelLayout(ep=2, etp=1)) == 2
    assert minimal_world_size(ParallelLayout(tp=2, ep=2)) == 4  # ETP defaults to TP
    assert minimal_world_size(ParallelLayout(tp=2, pp=2, vpp=2)) == 4
