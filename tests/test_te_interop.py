"""What we write loads into megatron-core's Transformer Engine spec, and what it writes we read.

Over the TE test double (tests/te_double, tests/te_harness.py): our `convert hf2mcore` outputs (default
--transformer-impl transformer_engine; torch_dist, torch, torch --moe-grouped-gemm) load into a TE-spec
GPTModel the way Megatron-LM 0.16 loads them (torch_dist: dist_checkpointing at its default strictness
assume_ok_unexpected, then load_state_dict(strict=True); torch: load_state_dict(strict=True)), every
parameter NaN before and set after, logits equal to transformers' at a bound of a few ulps of their
magnitude. The loaded models are then saved as Pai-Megatron-Patch saves them (TE names, `_extra_state`
None, grouped experts, TP-split MLA down projections) and `convert mcore2hf` gives the HF tensors back
byte for byte. Two rank spawns in all (TP1; TP2xEP2 and PP2 at two ranks); one conversion per case.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_patch.checkpoint import mcore_layout
from megatron_patch.convert.hf2mcore import hf2mcore
from megatron_patch.convert.mcore2hf import mcore2hf
from megatron_patch.errors import UserError
from megatron_patch.models.builder import ParallelLayout

from te_harness import hf_logits, make_minis, run_te_ranks
from test_convert_roundtrip import assert_identical, read_all

FAMILIES = ("deepseek_v3", "deepseek_v2", "qwen2", "qwen3_moe")
MOE = ("deepseek_v3", "deepseek_v2", "qwen3_moe")
TOKENS = torch.tensor([[3, 17, 92, 5, 44, 101, 7, 250]])
TP1 = ParallelLayout()
TP2EP2 = ParallelLayout(tp=2, ep=2, etp=1)
PP2 = ParallelLayout(pp=2)


@dataclasses.dataclass(frozen=True)
class Case:
    family: str
    fmt: str           # torch_dist or torch
    grouped: bool      # --moe-grouped-gemm (the TE model's experts are TEGroupedMLP)
    layout: ParallelLayout
    pai_out: str | None = None  # save the loaded model Pai-style here (then mcore2hf must give HF back)

    @property
    def name(self) -> str:
        lay = f"tp{self.layout.tp}pp{self.layout.pp}ep{self.layout.ep}"
        return f"{self.family}-{self.fmt}-{'grouped' if self.grouped else 'seq'}-{lay}"


def _cases(work: Path) -> dict[int, list[Case]]:
    one = []
    for f in FAMILIES:
        one.append(Case(f, "torch_dist", f in MOE, TP1))
        one.append(Case(f, "torch", False, TP1))
        if f in MOE:
            one.append(Case(f, "torch", True, TP1))
    two = [
        Case("deepseek_v3", "torch", True, TP2EP2),
        Case("qwen3_moe", "torch_dist", True, TP2EP2),
        Case("deepseek_v3", "torch", True, ParallelLayout(tp=2), str(work / "pai-dsv3")),  # Pai splits MLA's
        Case("qwen3_moe", "torch_dist", True, ParallelLayout(ep=2), str(work / "pai-q3")),  # down projections
        Case("qwen2", "torch", False, ParallelLayout(tp=2)),
        Case("deepseek_v3", "torch_dist", False, PP2),                        # MTP on the last stage
        Case("deepseek_v2", "torch", True, PP2),
        Case("qwen3_moe", "torch", False, PP2),
    ]
    return {1: one, 2: two}


def _convert_root(work: Path, case: Case) -> Path:
    # torch_dist holds global tensors: one conversion per family loads at every layout
    if case.fmt == "torch_dist":
        return work / f"{case.family}-torch_dist"
    return work / case.name


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("te")


@pytest.fixture(scope="module")
def minis(work, te_minis):
    """The session's TE minis (DeepSeek-V3 with MTP, Qwen3-MoE) plus DeepSeek-V2-Lite-like and Qwen2."""
    return {**te_minis, **make_minis(work / "minis", tuple(f for f in FAMILIES if f not in te_minis))}


@pytest.fixture(scope="module")
def converted(minis, work):
    """Every case's checkpoint, converted once with the default --transformer-impl."""
    cases = _cases(work)
    for case in cases[1] + cases[2]:
        root = _convert_root(work, case)
        if not root.exists():
            hf2mcore(minis[case.family], root, case.layout, fmt=case.fmt, moe_grouped_gemm=case.grouped)
    return cases


def _load_and_run(rank, world, cases, roots, minis, references):
    """In each rank: build the TE-spec model, NaN it, load as Megatron-LM does, compare logits with HF;
    save Pai-style where asked. Returns (case, parameters loaded, max |logits - HF|, bound) per case
    (diff None on ranks without the output layer)."""
    from te_harness import (assert_no_nan, build_te_chunks, fill_nan, forward_logits, load_legacy,
                            load_torch_dist, pai_args, save_pai_legacy)

    from megatron_patch.checkpoint.mcore_reader import open_mcore

    results = []
    for case, root in zip(cases, roots):
        padded = open_mcore(root).padded_vocab() if case.fmt == "torch_dist" else None
        chunks, config, args = build_te_chunks(minis[case.family], case.layout, grouped_gemm=case.grouped,
                                               vocab_size=padded)
        fill_nan(chunks)
        if case.fmt == "torch_dist":
            load_torch_dist(chunks, root)
        else:
            load_legacy(chunks, root)
        assert_no_nan(chunks)
        logits = forward_logits(chunks, TOKENS)
        diff = bound = None
        if logits is not None:
            want = references[case.family]
            diff = (logits[..., : want.shape[-1]] - want).abs().max().item()
            bound = 16 * torch.finfo(torch.float32).eps * want.abs().max().item()  # a few ulps of the magnitude
        results.append((case.name, sum(p.numel() for c in chunks for p in c.parameters()), diff, bound))
        if case.pai_out:
            save_pai_legacy(chunks, case.pai_out, case.layout, pai_args(config, args, case.layout))
    return results


@pytest.fixture(scope="module")
def loaded(converted, minis, work):
    references = {f: hf_logits(minis[f], TOKENS) for f in FAMILIES}
    counts = {}
    for world, cases in converted.items():
        roots = [str(_convert_root(work, c)) for c in cases]
        counts[world] = run_te_ranks(_load_and_run, world, timeout=600,
                                     args=(cases, roots, {k: str(v) for k, v in minis.items()}, references))
    return counts


# ---------------------------------------------------------------------------------------------------
def test_te_spec_models_load_our_checkpoints(loaded, converted):
    """Every case loaded (no NaN left: asserted in the ranks) with logits equal to HF's."""
    for world, per_rank in loaded.items():
        assert [r[0] for r in per_rank[0]] == [c.name for c in converted[world]]
        for name, params, diff, bound in (r for results in per_rank for r in results):
            assert params > 0, name
            if diff is not None:
                print(f"{name}: max |logits - HF| {diff:.3g} (bound {bound:.3g})")
                assert diff <= bound, f"{name}: logits differ from HF by {diff:.3g} (bound {bound:.3g})"
        # every case's logits were checked on some rank (the last pipeline stage)
        assert {r[0] for results in per_rank for r in results if r[2] is not None} == {c.name for c in converted[world]}


def test_pai_style_te_checkpoints_convert_to_hf_byte_identical(loaded, minis, work):
    sd = mcore_layout.read_rank(work / "pai-dsv3", 1, 0, 0)[0]
    assert "decoder.layers.1.mlp.experts.linear_fc1.weight3" in sd  # TE grouped names, local expert index
    assert "decoder.layers.1.self_attention.linear_q_up_proj.layer_norm_weight" in sd
    assert sd["decoder.layers.1.input_layernorm._extra_state"] is None
    assert sd["decoder.layers.1.self_attention.linear_q_down_proj.weight"].shape[0] == 16  # split by TP rank
    for family, pai in (("deepseek_v3", "pai-dsv3"), ("qwen3_moe", "pai-q3")):
        out = work / f"{pai}-hf"
        mcore2hf(work / pai, out, hf_config_dir=minis[family])
        assert_identical(read_all(minis[family]), out)


def test_written_names_are_the_te_specs(converted, work):
    """The default is Megatron-LM's: transformer_engine names, and convert_meta.json / args say so."""
    root = work / "deepseek_v3-torch-grouped-tp1pp1ep1"
    sd = mcore_layout.read_rank(root, 0, 0, 0)[0]
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in sd  # dense layer: fused pre-MLP norm
    assert "decoder.layers.1.pre_mlp_layernorm.weight" in sd          # MoE layer keeps it
    assert "decoder.layers.1.mlp.experts.linear_fc2.weight7" in sd
    assert "mtp.layers.0.enorm._extra_state" in sd and "decoder.final_layernorm._extra_state" in sd
    meta = json.loads((root / "convert_meta.json").read_text())
    assert (meta["transformer_impl"], meta["moe_grouped_gemm"]) == ("transformer_engine", True)
    args = torch.load(root / "release" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)["args"]
    assert (args.transformer_impl, args.moe_grouped_gemm) == ("transformer_engine", True)


def _config_from_args(args: argparse.Namespace, config_cls):
    """Megatron-LM core_v0.16.1 core_transformer_config_from_args: every config field found in args by
    name, then its renames (num_experts, swiglu, group_query_attention, rope_type None)."""
    import torch.nn.functional as F

    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls) if hasattr(args, f.name)}
    kw["num_moe_experts"] = args.num_experts
    kw["pipeline_dtype"] = args.params_dtype
    kw["rotary_interleaved"] = args.rotary_interleaved
    if args.swiglu:
        kw["activation_func"], kw["gated_linear_unit"] = F.silu, True
    kw["num_query_groups"] = args.num_query_groups if args.group_query_attention else None
    return config_cls(**kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_args_rebuild_the_family_config(converted, work, minis, family):
    """Megatron-LM's --use-checkpoint-args path rebuilds every TransformerConfig field of our mapping."""
    from megatron_patch.checkpoint.hf_config import load_hf_config
    from megatron_patch.models.builder import apply_layout
    from megatron_patch.models.families import family_for_config

    hf_config = load_hf_config(minis[family])
    root = work / f"{family}-torch-seq-tp1pp1ep1"
    args = torch.load(root / "release" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)["args"]
    want = family_for_config(hf_config).to_mcore_config(hf_config)
    got = _config_from_args(args, type(want))
    # functions are made from plain fields (init_method_std; activation: swiglu, compared below);
    # pipeline_dtype is Megatron-LM's params_dtype (ours is set by the builder when PP > 1);
    # transformer_impl is the spec the checkpoint was written for, not a mapped field (checked below)
    for f in dataclasses.fields(want):
        if callable(getattr(want, f.name)) or f.name in ("pipeline_dtype", "transformer_impl"):
            continue
        assert getattr(got, f.name) == getattr(want, f.name), f.name
    assert args.transformer_impl == "transformer_engine"  # hf2mcore's default, Megatron-LM's
    assert got.activation_func is want.activation_func
    for name in ("moe_router_score_function", "moe_router_enable_expert_bias", "moe_router_topk_scaling_factor",
                 "moe_router_pre_softmax", "moe_layer_freq", "padded_vocab_size", "untie_embeddings_and_output_weights"):
        assert hasattr(args, name), name


def test_unknown_keys_are_refused(converted, work, minis):
    """A key that is in neither name set stops mcore2hf before anything is written."""
    root = work / "qwen2-bad"
    shutil.copytree(work / "qwen2-torch-seq-tp1pp1ep1", root)
    path = root / "release" / "mp_rank_00" / "model_optim_rng.pt"
    ckpt = torch.load(path, weights_only=False)
    sd = ckpt["model"]
    sd["decoder.layers.0.self_attention.linear_qkv.layer_norm_weightx"] = sd.pop(
        "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight")
    torch.save(ckpt, path)
    with pytest.raises(UserError, match="unknown key decoder.layers.0.self_attention.linear_qkv.layer_norm_weightx"):
        mcore2hf(root, work / "qwen2-bad-hf")
    assert not (work / "qwen2-bad-hf").exists()


def test_torch_dist_matching_neither_name_set_is_refused(converted, work, minis):
    """A torch_dist checkpoint read against another model's config: refused naming the first key the model
    asks for (in either spec's names) that the checkpoint lacks; nothing written."""
    root = work / "q3-dist-no-config"
    shutil.copytree(work / "qwen3_moe-torch_dist", root, ignore=shutil.ignore_patterns("hf_config"))
    common = root / "release" / "common.pt"  # without stored args: the names alone must give it away
    state = torch.load(common, weights_only=False)
    state.pop("args", None)
    torch.save(state, common)
    with pytest.raises(UserError, match=r"the checkpoint has no \S+.* local and Transformer Engine names alike"):
        mcore2hf(root, work / "q3-as-qwen2-hf", hf_config_dir=minis["qwen2"])
    assert not (work / "q3-as-qwen2-hf").exists()
