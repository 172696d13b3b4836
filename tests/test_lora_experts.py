"""LoRA on routed experts (`--lora-target experts`, issue 11): DeepSeek-V3 mini at TP2 x ETP2 (EP1) with the
distributed optimizer, grouped experts (the default): fc1's adapter B split over expert TP as [gate_i; up_i], fc2's A
by columns. Its step-2 checkpoint resumed with SequentialMLP (--no-moe-grouped-gemm) refuses the optimizer state
(bucketed in the experts' parameter order) and, with --no-load-optim at TP2 x EP2 x ETP1 (resharded on load), repeats
step 3's loss; with --lr 0 its step-3 checkpoint holds the same adapters, and both export to the same peft files (the
torch_dist adapters are layout-free). The export loads in peft on transformers 5's fused experts
(target_parameters), peft's loss equals the logged one, the merged model equals base + adapter and `compare
--peft-path` PASSes. Below: the adapters' loss, grad norm, gradients and Adam step at TP2xEP2xETP2, EP2xETP2 (TP1),
PP2xEP2 and TP2xEP2xETP1 against the single-rank run."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_patch.models.builder import ParallelLayout
from test_lora_mla import _hf_batch, _train, ds  # noqa: F401  (ds: the module-scoped mini + SFT data)
from test_sft_lora import LOSS_TOL, _hf_model, _loss

TARGETS = "experts,o_proj"
ETP2 = ["--expert-model-parallel-size", "1", "--expert-tensor-parallel-size", "2"]
EP2 = ["--expert-model-parallel-size", "2", "--expert-tensor-parallel-size", "1"]


@pytest.fixture(scope="module")
def runs(ds):  # noqa: F811
    full = _train(ds, ds.root / "full", ["--save-interval", "2", *ETP2], TARGETS, iters=3)
    shutil.copytree(ds.root / "full", ds.root / "seq", ignore=shutil.ignore_patterns("iter_0000003", "*.lock"))
    (ds.root / "seq" / "latest_checkpointed_iteration.txt").write_text("2")
    # the distributed optimizer's state (dp_reshardable buckets) follows the experts' parameter order: refused ...
    refused = _train(ds, ds.root / "seq", ["--no-moe-grouped-gemm", *ETP2], TARGETS, iters=3, check=False)
    # ... and the adapters alone load into the other experts at another expert layout (lr 0: they stay as loaded)
    seq = _train(ds, ds.root / "seq", ["--no-moe-grouped-gemm", "--no-load-optim", *EP2, "--lr", "0"], TARGETS,
                 iters=3)
    return SimpleNamespace(full=full, seq=seq, refused=refused)


def test_plan_counts_expert_adapters_split_over_expert_tp(ds):  # noqa: F811
    """Per rank at EP2: fc1 A [r, H] whole + B [2I/ETP, r], fc2 A [r, I/ETP] + B [H, r] whole, per local expert."""
    from transformers import AutoConfig

    from megatron_patch.training.plan_params import rank_params

    cfg = AutoConfig.from_pretrained(ds.model)
    h, i, r = cfg.hidden_size, cfg.moe_intermediate_size, 4
    local = cfg.n_routed_experts // 2 * (cfg.num_hidden_layers - cfg.first_k_dense_replace)
    for etp in (1, 2):
        (counts,) = rank_params(cfg, ParallelLayout(tp=2, ep=2, etp=etp), False, r, "experts")
        assert counts.expert_trainable == counts.trainable == local * (r * h + 2 * i // etp * r + r * i // etp + h * r)


def test_expert_adapters_resume_in_sequential_experts_and_load_in_peft(ds, runs, tmp_path):  # noqa: F811
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from megatron_patch.cli import main

    refusal = "with the distributed optimizer and grouped experts; this run is"
    assert refusal in runs.refused.stderr, runs.refused.stderr[-2000:]
    assert runs.refused.returncode != 0 and len(runs.full) == 3 and len(runs.seq) == 1
    assert abs(runs.seq[0] - runs.full[2]) <= LOSS_TOL, (runs.seq, runs.full)  # grouped GEMM vs per-expert loop
    assert main(["convert", "lora2peft", "--mcore-path", str(ds.root / "full" / "iter_0000002"), "--hf-config",
                 str(ds.model), "--out", str(tmp_path / "a2")]) == 0
    assert main(["convert", "lora2peft", "--mcore-path", str(ds.root / "full" / "iter_0000002"), "--hf-config",
                 str(ds.model), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    # the same adapters saved at EP2 x ETP1 by SequentialMLP (lr 0) export to the same tensors
    assert main(["convert", "lora2peft", "--mcore-path", str(ds.root / "seq" / "iter_0000003"), "--hf-config",
                 str(ds.model), "--out", str(tmp_path / "ep2")]) == 0
    etp2, ep2 = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("a2", "ep2"))
    assert etp2.keys() == ep2.keys() and all(torch.equal(etp2[k], ep2[k]) for k in etp2)
    cfg = json.loads((tmp_path / "a2" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["o_proj"]
    assert cfg["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    batch = _hf_batch(ds, 2, iters=3)
    peft = PeftModel.from_pretrained(_hf_model(ds.model), str(tmp_path / "a2")).eval()
    experts = peft.base_model.model.model.layers[1].mlp.experts
    assert experts.lora_B["default"].weight.abs().max() > 0  # the trained expert adapters were loaded
    assert experts.base_layer.lora_B["default"].weight.abs().max() > 0
    assert abs(_loss(peft, batch) - runs.full[2]) <= LOSS_TOL, (_loss(peft, batch), runs.full[2])
    without_experts = _hf_model(ds.model)  # the logged loss needs the expert adapters, not only o_proj's
    PeftModel.from_pretrained(without_experts, str(tmp_path / "a2"))
    with torch.no_grad():
        for layer in without_experts.model.layers[1:]:
            layer.mlp.experts.lora_B["default"].weight.zero_()
            layer.mlp.experts.base_layer.lora_B["default"].weight.zero_()
    assert abs(_loss(without_experts.eval(), batch) - runs.full[2]) > 10 * LOSS_TOL
    with torch.no_grad():
        peft_logits, merged_logits = peft(batch[0]).logits, _hf_model(tmp_path / "merged")(batch[0]).logits
    assert (merged_logits - peft_logits).abs().max() <= 1e-5 * max(1.0, float(peft_logits.abs().max()))
    assert main(["compare", "--hf-path", str(ds.model), "--mcore-path", str(ds.root / "full" / "iter_0000002"),
                 "--seq-length", "16", "--peft-path", str(tmp_path / "a2")]) == 0


# ----------------------------------------------------------------------------------------------------------------
# expert adapters under expert tensor parallelism and pipeline parallelism: the tiny MLA + MoE model of
# testing/equivalence.py with adapters on the routed experts only (B drawn at random so A's gradients are not 0),
# one Adam step against the single-rank SequentialMLP run. The layouts load the reference's torch_dist adapters
# into their own sharding (fc1's B split as [gate_i; up_i], fc2's A by columns) and compare their gradients and
# post-step adapters the same way: one spawn of 4 ranks runs them all.
# ----------------------------------------------------------------------------------------------------------------
GROUPED = {"moe_grouped_gemm": True}
EXPERT_LAYOUTS = {
    "TP2xEP2xETP2 grouped": dict(layout=ParallelLayout(tp=2, ep=2, etp=2), overrides=GROUPED),
    # expert TP wider than TP (dense DP4): the whole factors' copies still count once in the grad norm
    "EP2xETP2 SequentialMLP distopt": dict(layout=ParallelLayout(ep=2, etp=2), dist_opt=True),
    "PP2xEP2 grouped": dict(layout=ParallelLayout(pp=2, ep=2), overrides=GROUPED),
    # expert TP 1 under TP2: TP rank 1's experts are its own, their adapters count in the grad norm too
    "TP2xEP2xETP1 grouped": dict(layout=ParallelLayout(tp=2, ep=2, etp=1), overrides=GROUPED),
}


@pytest.fixture(scope="module")
def expert_layouts(tmp_path_factory):
    from megatron_patch.runtime.multirank import run_ranks
    from megatron_patch.testing.equivalence import cases_run, reference_run

    ref_dir = str(tmp_path_factory.mktemp("expert-lora-reference"))
    (ref,) = run_ranks(reference_run, 1, timeout=240, args=(ref_dir, False, True))
    cases = [dict(case, ref_dir=ref_dir, lora=True) for case in EXPERT_LAYOUTS.values()]
    per_rank = run_ranks(cases_run, 4, timeout=400, args=(cases,))
    return ref, {name: [results[i] for results in per_rank] for i, name in enumerate(EXPERT_LAYOUTS)}


@pytest.mark.parametrize("name", list(EXPERT_LAYOUTS))
def test_expert_adapters_match_single_rank(expert_layouts, name):
    from test_parallel_layouts import assert_matches_reference

    ref, results = expert_layouts
    for rank, res in enumerate(results[name]):
        assert_matches_reference(res, ref, (name, rank))
        assert all(".lora_" in key for key in res["step_diff"]), "only the adapters train"
        assert {k.rsplit(".", 1)[-1][:6] for k in res["step_diff"]} == {"lora_A", "lora_B"}  # grouped: lora_A{i}
        if "grad_diff" in res:  # both factors got a gradient (B random): the reduced one too
            assert all(scale > 0 for _, scale in res["grad_diff"].values())
