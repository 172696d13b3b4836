"""LoRA on DeepSeek's MLA projections (issue 11): the six HF names at TP2 x EP2 (ETP1, SP) with the distributed
optimizer; the resumed run repeats the uninterrupted one bit for bit (adapters + optimizer state); the export loads
in peft, whose loss equals the one the run logged, the merged model equals base + adapter and `compare
--peft-path` PASSes. Names peft reads differently on MoE models (gate_proj/up_proj/down_proj) are refused with one
line; `experts` names the fused expert parameters."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_patch.errors import UserError
from test_sft_lora import LOSS_TOL, _env, _hf_model, _loss, _records

REPO = Path(__file__).resolve().parents[1]
SEQ = 64
MLA = "q_a_proj,q_b_proj,q_proj,kv_a_proj_with_mqa,kv_b_proj,o_proj"
ITERS, GBS = 4, 4


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    from megatron_patch.convert.mini import make_mini
    from megatron_patch.data.sft import preprocess_sft

    root = tmp_path_factory.mktemp("lora-mla")
    w = SimpleNamespace(root=root, model=make_mini("deepseek_v3", root / "ds3", seed=2,
                                                   overrides={"num_nextn_predict_layers": 0}))
    (root / "data.json").write_text(json.dumps(_records()))
    w.prefix = str(root / "sft")
    preprocess_sft([str(root / "data.json")], str(w.model), w.prefix, seq_length=SEQ)
    return w


def _train(w, save: Path, extra: list[str], targets: str = MLA, iters: int = ITERS, check: bool = True):
    """The logged losses (check=False: the finished process)."""
    from megatron_patch.runtime.multirank import free_port

    metrics = save.with_suffix(".jsonl")
    argv = ["--load-hf", str(w.model), "--data-path", w.prefix, "--sft", "--curriculum", "--curriculum-seed", "42",
            "--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2", "--expert-tensor-parallel-size",
            "1", "--use-distributed-optimizer", "--seq-length", str(SEQ), "--micro-batch-size", "2",
            "--global-batch-size", str(GBS), "--train-iters", str(iters), "--lr", "1e-2", "--lora-rank", "4",
            "--lora-alpha", "8", "--lora-target", targets, "--save", str(save), "--metrics-file", str(metrics), *extra]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), "-m", "megatron_patch.training.pretrain", *argv], capture_output=True,
                         text=True, env=_env(), timeout=400, cwd=REPO)
    if not check:
        return run
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return [json.loads(line)["loss"] for line in metrics.read_text().splitlines() if '"loss"' in line]


@pytest.fixture(scope="module")
def runs(ds):
    full = _train(ds, ds.root / "full", ["--save-interval", "2"])
    # the resumed run: the uninterrupted run's step-2 checkpoint, continued to step 4
    shutil.copytree(ds.root / "full", ds.root / "resumed", ignore=shutil.ignore_patterns("iter_0000004", "*.lock"))
    (ds.root / "resumed" / "latest_checkpointed_iteration.txt").write_text("2")
    resumed = _train(ds, ds.root / "resumed", [])
    return SimpleNamespace(full=full, resumed=resumed)


def _hf_batch(w, step: int, iters: int = ITERS):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_patch.data.curriculum import DEFAULT_STAGES, BatchSampler, parse_stages

    meta = json.loads(Path(w.prefix + ".sft.json").read_text())
    sampler = BatchSampler(meta["difficulty"], iters, GBS, 42, parse_stages(DEFAULT_STAGES), log=lambda *_: None)
    rows = sampler.batch(step)
    ids, masks = IndexedDataset(w.prefix), IndexedDataset(w.prefix + ".mask")
    pad = json.loads((w.model / "config.json").read_text())["eos_token_id"]
    inputs = torch.full((GBS, SEQ), pad, dtype=torch.int64)
    labels = torch.full((GBS, SEQ), -100, dtype=torch.int64)
    for r, i in enumerate(rows):
        tok, mask = torch.from_numpy(ids[i].astype("int64")), torch.from_numpy(masks[i].astype(bool))
        inputs[r, :len(tok)], labels[r, :len(tok)] = tok, torch.where(mask, tok, torch.tensor(-100))
    return inputs, labels


def test_resume_repeats_the_uninterrupted_run(runs):
    assert len(runs.full) == ITERS and runs.full[-1] < runs.full[0]
    assert runs.resumed == runs.full[2:]  # bit for bit: adapters, optimizer state and sampler restored


def test_mla_adapters_load_in_peft_and_compare_passes(ds, runs, tmp_path):
    import torch
    from peft import PeftModel

    from megatron_patch.cli import main

    for it, out in (("iter_0000002", "a2"), ("iter_0000004", "a4")):
        assert main(["convert", "lora2peft", "--mcore-path", str(ds.root / "full" / it), "--hf-config",
                     str(ds.model), "--out", str(tmp_path / out)]) == 0
    assert main(["convert", "lora2peft", "--mcore-path", str(ds.root / "full"), "--hf-config", str(ds.model),
                 "--out", str(tmp_path / "merged"), "--merge"]) == 0
    cfg = json.loads((tmp_path / "a4" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(set(MLA.split(",")) - {"q_proj"})  # the V3 mini has q_lora
    # the loss the run logged at step 3 is peft's with the step-2 adapters (the adapters act: not the base loss)
    batch = _hf_batch(ds, 2)
    peft2 = PeftModel.from_pretrained(_hf_model(ds.model), str(tmp_path / "a2")).eval()
    assert abs(_loss(peft2, batch) - runs.full[2]) <= LOSS_TOL, (_loss(peft2, batch), runs.full[2])
    assert abs(_loss(_hf_model(ds.model), batch) - runs.full[2]) > 10 * LOSS_TOL
    peft4 = PeftModel.from_pretrained(_hf_model(ds.model), str(tmp_path / "a4")).eval()
    with torch.no_grad():
        peft_logits, merged_logits = peft4(batch[0]).logits, _hf_model(tmp_path / "merged")(batch[0]).logits
    assert (merged_logits - peft_logits).abs().max() <= 1e-5 * max(1.0, float(peft_logits.abs().max()))
    assert main(["compare", "--hf-path", str(ds.model), "--mcore-path", str(ds.root / "full"), "--seq-length", "16",
                 "--peft-path", str(tmp_path / "a4")]) == 0


def test_names_peft_reads_as_routed_experts_are_refused(ds):
    from transformers import AutoConfig

    from megatron_patch.models.families import family_for_config
    from megatron_patch.models.lora import lora_targets

    cfg = AutoConfig.from_pretrained(ds.model)
    family = family_for_config(cfg)
    assert {t.rel for t in lora_targets(family, cfg, MLA.split(","))} == {
        "self_attention.linear_q_down_proj", "self_attention.linear_q_up_proj", "self_attention.linear_kv_down_proj",
        "self_attention.linear_kv_up_proj", "self_attention.linear_proj"}
    with pytest.raises(UserError, match="gate_proj: on deepseek_v3 peft 0.21"):
        lora_targets(family, cfg, ["q_a_proj", "gate_proj"])
    assert [t.hf for t in lora_targets(family, cfg, ["experts"])] == [
        ("model.layers.{layer}.mlp.experts.gate_up_proj",), ("model.layers.{layer}.mlp.experts.down_proj",)]
