"""DeepSeek-V3.2 (DSA): megatron-core's DSAttention/DSAIndexer against transformers' DeepseekV32ForCausalLM.

One module-scoped mini (index_topk 16 < the 32-token sequence, so the selection matters; one MTP layer). The comparisons
share one 2-rank group: TP1, TP2, PP2, EP2, TP2xEP2, CP2 (64 tokens; and 24 tokens, where top-k exceeds a
rank's 12 local keys), and two broken indexers that must FAIL at the first indexer row. Conversion: HF ->
mcore (TP2 EP2, torch and torch_dist, TE and local names) -> HF byte-identical; fp8-to-bf16 on a V3.2
checkpoint quantised here, every tensor checked.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from megatron_patch.models.builder import ParallelLayout
from megatron_patch.models.families.base import IndexerRope
from megatron_patch.runtime.multirank import run_ranks
from megatron_patch.verify.compare import CompareSpec, run_specs_in_group

ENV = {"TORCHDYNAMO_DISABLE": "1"}
LOGITS_BAR = 1e-5


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    from megatron_patch.convert.mini import make_mini

    # with one MTP layer (DSA too), as the real model: make-mini appends its weights at model.layers.4
    return str(make_mini("deepseek_v32", tmp_path_factory.mktemp("v32") / "mini", seed=5,
                         overrides={"num_nextn_predict_layers": 1}))


# ---------------------------------------------------------------------------------------------------
# config and table
# ---------------------------------------------------------------------------------------------------
def test_config_maps_to_megatron_dsa_and_refuses_what_it_cannot_express(mini):
    from transformers import AutoConfig

    from megatron_patch.errors import UserError
    from megatron_patch.models.families import family_for_config

    hf = AutoConfig.from_pretrained(mini)
    fam = family_for_config(hf)
    cfg = fam.to_mcore_config(hf)
    assert fam.name == "deepseek_v32" and type(cfg).__name__ == "DSATransformerConfig"
    assert (cfg.experimental_attention_variant, cfg.dsa_indexer_n_heads, cfg.dsa_indexer_head_dim,
            cfg.dsa_indexer_topk) == ("dsa", 8, 32, 16)
    assert hf.index_topk < CompareSpec(hf_path=mini).seq_length  # sparse at compare's default length
    # megatron asserts CP 1 for its DSA; our modules gather the keys over CP
    assert fam.to_mcore_config(hf, context_parallel_size=2).context_parallel_size == 2
    for key, value, match in [("rms_norm_eps", 1e-5, "rms_norm_eps"), ("index_head_dim", 48, "power of two"),
                              ("index_topk", 0, "index_topk")]:
        bad = AutoConfig.from_pretrained(mini)
        setattr(bad, key, value)
        with pytest.raises(UserError, match=match):
            fam.to_mcore_config(bad)


def test_indexer_rope_rows_keep_every_indexer_score():
    """HF's indexer layout (rope dims first, half-split) -> megatron's ([no-rope, rope interleaved], de-
    interleaved before rotating): the rows are a permutation, and the scores are the same numbers."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import apply_rotary_pos_emb

    d, r, heads, s = 16, 8, 2, 5
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(s, heads * d, generator=g), torch.randn(s, d, generator=g)
    rope = IndexerRope(d, r)
    mq, mk = rope.shard([q.T], 0, 2, None).T, rope.shard([k.T], 0, 2, None).T  # rows = output features
    assert torch.equal(rope.merge([rope.shard([q.T], 1, 2, None)], None)[0], q.T)
    freqs = torch.outer(torch.arange(s, dtype=torch.float32), 1.0 / 10000 ** (torch.arange(0, r, 2) / r))
    emb = torch.cat([freqs, freqs], dim=-1)

    def hf_scores(q, k):
        qh, kh = q.view(s, heads, d), k.view(s, 1, d)
        qr, kr = apply_rotary_pos_emb(qh[..., :r], kh[..., :r], emb.cos(), emb.sin(), unsqueeze_dim=1)
        return torch.einsum("shd,td->sht", torch.cat([qr, qh[..., r:]], -1), torch.cat([kr, kh[..., r:]], -1)[:, 0])

    def mcore_scores(q, k):
        def rot(x):  # megatron's indexer: [no-rope, rope], rope de-interleaved and rotated (MLA mode)
            nope, pe = x.split([d - r, r], dim=-1)
            pe = _apply_rotary_pos_emb_bshd(pe.unsqueeze(1), emb[:, None, None, :], multi_latent_attention=True)
            return torch.cat([nope, pe.squeeze(1)], dim=-1)
        return torch.einsum("shd,td->sht", rot(q.view(s, heads, d)), rot(k.view(s, 1, d))[:, 0])

    want = hf_scores(q, k)
    torch.testing.assert_close(mcore_scores(mq, mk), want, rtol=0, atol=8 * torch.finfo(torch.float32).eps * want.abs().max())
    assert not torch.allclose(mcore_scores(q, k), want, atol=1e-3)  # without the permutation: other scores


# ---------------------------------------------------------------------------------------------------
# compare against HF (one 2-rank group: every layout here fits 2 ranks)
# ---------------------------------------------------------------------------------------------------
def _indexer_params(chunks):
    for layer in chunks[0].decoder.layers:
        yield layer.self_attention.core_attention.indexer


def indexer_in_hf_row_order(chunks, config, layout):
    """The indexer weights loaded without the rope-layout permutation (HF's row order)."""
    rope = IndexerRope(config.dsa_indexer_head_dim, config.qk_pos_emb_head_dim)
    with torch.no_grad():
        for ix in _indexer_params(chunks):
            for p in (ix.linear_wq_b.weight, ix.linear_wk.weight, ix.k_norm.weight, ix.k_norm.bias):
                p.copy_(rope.merge([p.detach().clone()], None)[0])


def indexer_selects_everything(chunks, config, layout):
    """Dense attention: the indexer keeps every key (a sparse model compared as a dense one)."""
    for ix in _indexer_params(chunks):
        ix.index_topk = 10**6


LAYOUTS = [ParallelLayout(), ParallelLayout(tp=2), ParallelLayout(pp=2), ParallelLayout(ep=2, etp=1),
           ParallelLayout(tp=2, ep=2, etp=1), ParallelLayout(cp=2)]
BROKEN = [indexer_in_hf_row_order, indexer_selects_everything]


WARMUP = 4  # DSA training: dense warm-up steps, then one sparse step


def _compare_then_train(rank, world, specs, train_argv):
    """The comparisons, then a DSA training run (warm-up + one sparse step) on the same two ranks."""
    reports = run_specs_in_group(rank, world, specs)
    from megatron_patch.training.pretrain import main

    return reports, main(train_argv)


@pytest.fixture(scope="module")
def group(mini, tmp_path_factory):
    from megatron_patch.convert.mini import CORPUS
    from megatron_patch.data.preprocess import preprocess

    work = tmp_path_factory.mktemp("v32-train")
    preprocess([str(CORPUS)], mini, str(work / "corpus"), append_eod=True, progress=False)
    argv = ["--load-hf", mini, "--data-path", str(work / "corpus"), "--data-cache-path", str(work / "cache"),
            "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-2",
            "--lr-warmup-iters", "0", "--train-iters", str(WARMUP + 1), "--dsa-warmup-iters", str(WARMUP),
            "--dsa-indexer-loss-coeff", "1.0", "--save", str(work / "run"), "--save-interval", str(WARMUP),
            "--metrics-file", str(work / "metrics.jsonl")]
    specs = [CompareSpec(hf_path=mini, layout=lay, seq_length=64 if lay.cp > 1 else 32) for lay in LAYOUTS]
    specs.append(CompareSpec(hf_path=mini, layout=ParallelLayout(cp=2), seq_length=24))
    specs += [CompareSpec(hf_path=mini, mutate=fn) for fn in BROKEN]
    reports, code = run_ranks(_compare_then_train, 2, timeout=600, args=(specs, argv), env=ENV)[0]
    return reports, code, work


@pytest.fixture(scope="module")
def reports(group):
    return group[0]


def _check_pass(report):
    failed = [(r["component"], r["layer"], r["max_abs"], r.get("note")) for r in report["rows"] if not r["passed"]]
    assert report["result"] == "PASS", failed
    assert report["logits"]["max_abs"] <= LOGITS_BAR and report["logits"]["top1_agreement"] == 1.0
    indexer = [r for r in report["rows"] if r["component"] == "indexer"]
    assert [r["layer"] for r in indexer] == list(range(report["model"]["num_layers"]))
    assert all(r["selection_mismatch"] == 0 for r in indexer)


@pytest.mark.parametrize("case", range(len(LAYOUTS) + 1),
                         ids=[lay.describe() for lay in LAYOUTS] + ["CP2-24-tokens"])
def test_compare_passes_against_hf(reports, case):
    report = reports[case]
    _check_pass(report)
    lay = LAYOUTS[case] if case < len(LAYOUTS) else ParallelLayout(cp=2)
    got = report["layout"]
    assert (got["tp"], got["pp"], got["ep"], got.get("cp", 1)) == (lay.tp, lay.pp, lay.ep, lay.cp)


@pytest.mark.parametrize("case", range(len(BROKEN)), ids=[fn.__name__ for fn in BROKEN])
def test_broken_indexer_fails_at_the_first_indexer_row(reports, case):
    report = reports[len(LAYOUTS) + 1 + case]
    assert report["result"] == "FAIL"
    first = next(r for r in report["rows"] if not r["passed"])
    assert (first["component"], first["layer"]) == ("indexer", 0)
    assert first["selection_mismatch"] > 0


# ---------------------------------------------------------------------------------------------------
# conversion
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,impl", [("torch", "transformer_engine"), ("torch_dist", "local")])
def test_hf_to_mcore_tp2_ep2_and_back_is_byte_identical(mini, tmp_path, fmt, impl):
    """torch with TE names; torch_dist with local names, resharded to PP2xEP2 (torch, TE names) on the way."""
    from megatron_patch.convert.hf2mcore import hf2mcore
    from megatron_patch.convert.mcore2hf import mcore2hf

    ckpt, back = tmp_path / "mcore", tmp_path / "back"
    hf2mcore(mini, ckpt, ParallelLayout(tp=2, ep=2, etp=1), fmt=fmt, transformer_impl=impl)
    if fmt == "torch":
        sd = torch.load(ckpt / "release" / "mp_rank_01_001" / "model_optim_rng.pt", weights_only=False)["model"]
        ix = "decoder.layers.1.self_attention.core_attention."
        assert ix + "indexer.linear_wq_b._extra_state" in sd and ix + "indexer.k_norm.bias" in sd
        assert ix + "_extra_state" not in sd  # DSAttention is not a TE module
    if fmt == "torch_dist":  # and resharded to another layout on the way back
        from megatron_patch.convert.reshard import reshard

        ckpt2 = tmp_path / "resharded"
        reshard(ckpt, ckpt2, ParallelLayout(pp=2, ep=2, etp=1), fmt="torch")
        ckpt = ckpt2
    mcore2hf(ckpt, back)
    assert (back / "model.safetensors").read_bytes() == (Path(mini) / "model.safetensors").read_bytes()


def _quantise(w: torch.Tensor, ue8m0: bool, block: int = 128):
    """DeepSeek's block FP8: per 128x128 block, scale = amax / 448, fp8 = w / scale, scale_inv = scale.
    ue8m0 (V3.2's scale_fmt): the scale rounded up to a power of two, stored as float8_e8m0fnu."""
    rows, cols = w.shape
    fmax = torch.finfo(torch.float8_e4m3fn).max
    s = torch.empty(math.ceil(rows / block), math.ceil(cols / block))
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            b = w[i * block:(i + 1) * block, j * block:(j + 1) * block].float()
            s[i, j] = b.abs().max().clamp(min=1e-12) / fmax
            if ue8m0:
                s[i, j] = 2.0 ** torch.ceil(torch.log2(s[i, j]))
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (b / s[i, j]).to(torch.float8_e4m3fn)
    return q, s.to(torch.float8_e8m0fnu) if ue8m0 else s


def test_fp8_to_bf16_dequantises_every_attention_and_indexer_weight(mini, tmp_path):
    """As DeepSeek ships V3.2: every linear weight FP8 with a block scale (the indexer's wq_b and wk
    included), norms, router, embeddings and the indexer's weights_proj (fp32) plain. After the cast every
    tensor is there, none FP8, each FP8 one equal to the block dequantisation, and transformers loads the
    result with no missing or unexpected key (no layer left uninitialised)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from megatron_patch.convert.fp8 import fp8_to_bf16

    src, out = tmp_path / "fp8", tmp_path / "bf16"
    src.mkdir()
    tensors = load_file(str(Path(mini) / "model.safetensors"))
    fp8, stored = {}, {}
    for name, t in tensors.items():
        plain = (t.dim() != 2 or "embed_tokens" in name or "lm_head" in name or name.endswith("mlp.gate.weight")
                 or "weights_proj" in name)
        if plain:
            stored[name] = t if "weights_proj" in name else t.to(torch.bfloat16)
        else:
            q, s = _quantise(t, ue8m0=".indexer." in name)  # both scale formats
            fp8[name] = (q, s)
            stored[name], stored[name + "_scale_inv"] = q, s
    assert any(".indexer.wq_b." in n for n in fp8) and any(".indexer.wk." in n for n in fp8)
    save_file(stored, str(src / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((Path(mini) / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (src / "config.json").write_text(json.dumps(config))
    fp8_to_bf16(src, out)

    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(tensors)
    for name, t in got.items():
        assert t.dtype in (torch.bfloat16, torch.float32), name
        if name in fp8:
            q, s = fp8[name]
            scale = s.float().repeat_interleave(128, 0)[: q.shape[0]].repeat_interleave(128, 1)[:, : q.shape[1]]
            assert torch.equal(t, (q.float() * scale).to(torch.bfloat16)), name
        else:
            assert torch.equal(t, stored[name]), name
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    mtp = f"model.layers.{config['num_hidden_layers']}."  # transformers does not build the MTP layer
    assert not info["missing_keys"] and not [k for k in info["unexpected_keys"] if not k.startswith(mtp)], info
    assert any(k.startswith(mtp + "self_attn.indexer.") for k in fp8)
    assert torch.equal(model.model.layers[1].self_attn.indexer.wk.weight.bfloat16(),
                       got["model.layers.1.self_attn.indexer.wk.weight"])


# ---------------------------------------------------------------------------------------------------
# DSA training stages (the run in the compare group: DP2, 4 warm-up steps, 1 sparse step)
# ---------------------------------------------------------------------------------------------------
def test_dsa_warmup_trains_only_the_indexer_and_its_kl_falls(group, mini, tmp_path):
    from safetensors.torch import load_file

    from megatron_patch.convert.mcore2hf import mcore2hf

    _, code, work = group
    assert code == 0
    steps = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    indexer = [r["indexer"] for r in steps]
    assert len(indexer) == WARMUP + 1 and all(v > 0 for v in indexer)
    assert indexer[WARMUP - 1] < 0.9 * indexer[0], indexer  # the KL to the dense attention falls
    start = load_file(str(Path(mini) / "model.safetensors"))
    changed = {}
    for it in (WARMUP, WARMUP + 1):
        out = tmp_path / f"hf{it}"
        mcore2hf(work / "run" / f"iter_{it:07d}", out, hf_config_dir=mini)
        got = load_file(str(out / "model.safetensors"))
        assert set(got) == set(start)
        changed[it] = {n for n in start if not torch.equal(got[n], start[n])}
    indexer_names = {n for n in start if ".self_attn.indexer." in n}
    assert changed[WARMUP] == indexer_names  # warm-up: every indexer tensor moved, nothing else (expert bias too)
    assert changed[WARMUP + 1] > indexer_names  # sparse stage: the rest of the model trains as well
