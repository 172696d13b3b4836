"""Supervised fine-tuning with LoRA (issue 11): `preprocess --sft`; `train --sft` against HF's loss with labels=-100
on the prompt; the difficulty curriculum (shares, determinism, resume, short levels, no difficulty); LoRA on all
seven Qwen projections at TP1 and TP2 (+SP), resumed, adapters-only checkpoints; `convert lora2peft` loaded by
peft itself (and --merge); validation on SFT data."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy
import pytest

from megatron_patch.errors import UserError

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
SEQ = 96
LOSS_TOL = 1e-5  # fp32, same batch: TP only changes the reduction order
LORA = ["--lora-rank", "4", "--lora-alpha", "8", "--lora-target", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"]
LEVEL_COUNTS = {"explain": 30, "reasoning": 12, "topology": 5}  # deliberately unbalanced (topology is short)


def _records() -> list[dict]:
    recs, i = [], 0
    for level, n in LEVEL_COUNTS.items():
        for _ in range(n):
            recs.append({"instruction": f"Explain item {i} ({level}).", "input": "" if i % 2 else f"context {i}",
                         "output": f"Item {i}: " + "the answer grows " * (1 + i % 4), "difficulty": level})
            i += 1
    return recs


@pytest.fixture(scope="module")
def work():
    from megatron_patch.convert.mini import make_mini
    from megatron_patch.data.sft import preprocess_sft

    root = Path(tempfile.mkdtemp(prefix="mp-sft-"))
    w = SimpleNamespace(root=root, model=make_mini("qwen2", root / "qwen2"))
    w.src = root / "data.json"
    w.src.write_text(json.dumps(_records()))
    w.prefix = str(root / "sft")
    w.summary = preprocess_sft([str(w.src)], str(w.model), w.prefix, seq_length=SEQ)
    yield w
    shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# preprocess --sft
# ---------------------------------------------------------------------------------------------------
def _answers(prefix: str, tok) -> list[str]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ids, masks = IndexedDataset(prefix), IndexedDataset(prefix + ".mask")
    return [tok.decode(ids[i][masks[i] == 1]) for i in range(len(ids))]


def test_plain_template_masks_exactly_the_answer(work):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work.model)
    assert not tok.chat_template and work.summary["template"] == "plain"
    assert work.summary["samples"] == sum(LEVEL_COUNTS.values()) and work.summary["truncated"] == 0
    assert work.summary["levels"] == {**LEVEL_COUNTS, "none": 0}
    got = _answers(work.prefix, tok)
    for rec, answer in zip(_records(), got):
        assert answer == rec["output"] + tok.eos_token


def test_chat_template_messages_and_truncation(work, tmp_path):
    from transformers import AutoTokenizer

    from megatron_patch.data.sft import preprocess_sft

    tok = AutoTokenizer.from_pretrained(work.model)
    tok.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok.save_pretrained(tmp_path / "tok")
    chat = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                          {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And?"},
                          {"role": "assistant", "content": "Bye."}]},
            {"instruction": "Q", "output": "A long answer " * 100}]
    src = tmp_path / "chat.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in chat) + "\n")
    s = preprocess_sft([str(src)], str(tmp_path / "tok"), str(tmp_path / "c"), seq_length=150)
    assert s["template"] == "chat" and s["truncated"] == 1 and s["samples"] == 2
    first = _answers(str(tmp_path / "c"), tok)[0]
    assert first == f"Hello.{tok.eos_token}Bye.{tok.eos_token}"  # both assistant turns, nothing else
    s = preprocess_sft([str(src)], str(tmp_path / "tok"), str(tmp_path / "d"), seq_length=150, drop_long=True)
    assert s["dropped_long"] == 1 and s["samples"] == 1


@pytest.mark.parametrize("content, message", [
    (b'{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', "bad.jsonl:2: missing 'output'"),
    (b'{"instruction": ["a"], "output": "b"}\n', "bad.jsonl:1: 'instruction' is list"),
    (b'{"instruction": "a", "output": "b", "difficulty": "hard"}\n', "bad.jsonl:1: difficulty 'hard'"),
    (b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff", "output": "b"}\n', "bad.jsonl:2: not UTF-8"),
    (b'{"messages": [{"role": "user", "content": "x"}]}\n', "bad.jsonl:1: the last message"),
])
def test_bad_records_name_the_record_and_write_nothing(work, tmp_path, content, message):
    from megatron_patch.data.sft import preprocess_sft

    src = tmp_path / "bad.jsonl"
    src.write_bytes(content)
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("?", r"\?")):
        preprocess_sft([str(src)], str(work.model), str(tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_non_utf8_in_a_json_list_names_the_record(work, tmp_path):
    from megatron_patch.data.sft import preprocess_sft

    src = tmp_path / "bad.json"
    src.write_bytes(b'[{"instruction": "a", "output": "b"}, {"instruction": "a", "output": "\xfe"}]')
    with pytest.raises(UserError, match="bad.json:2: 'output' is not valid UTF-8"):
        preprocess_sft([str(src)], str(work.model), str(tmp_path / "out"))


# ---------------------------------------------------------------------------------------------------
# curriculum sampler
# ---------------------------------------------------------------------------------------------------
def _levels():
    return numpy.repeat([0, 1, 2], list(LEVEL_COUNTS.values()))


def test_curriculum_follows_default_shares_and_is_deterministic():
    from megatron_patch.data.curriculum import DEFAULT_STAGES, BatchSampler, parse_stages

    stages = parse_stages(DEFAULT_STAGES)
    a = BatchSampler(_levels(), 40, 8, 42, stages, log=lambda *_: None)
    drawn = [a.next() for _ in range(40)]
    report = a.counts()
    assert [(r["start_step"], r["end_step"]) for r in report] == [(0, 12), (12, 28), (28, 40)]
    for (_, _, shares), r in zip(stages, report):
        total = sum(r["counts"].values())
        assert total == (r["end_step"] - r["start_step"]) * 8
        for share, n in zip(shares, r["counts"].values()):
            assert abs(n - share * total) < 1  # every stage within one sample of its shares
    # the levels actually drawn agree with the report
    levels = _levels()
    assert sum(int((levels[b] == 2).sum()) for b in drawn[28:]) == report[2]["counts"]["topology"]
    # topology (5 samples) is needed more often than it has samples: resampled with replacement
    assert report[1]["counts"]["topology"] + report[2]["counts"]["topology"] > LEVEL_COUNTS["topology"]
    b = BatchSampler(_levels(), 40, 8, 42, stages, log=lambda *_: None)
    assert all((b.next() == d).all() for d in drawn)
    c = BatchSampler(_levels(), 40, 8, 7, stages, log=lambda *_: None)
    assert any((c.next() != d).any() for d in drawn)


def test_curriculum_resume_and_settings_mismatch():
    from megatron_patch.data.curriculum import DEFAULT_STAGES, BatchSampler, parse_stages

    stages = parse_stages(DEFAULT_STAGES)
    full = BatchSampler(_levels(), 10, 4, 42, stages, log=lambda *_: None)
    ref = [full.next() for _ in range(10)]
    first = BatchSampler(_levels(), 10, 4, 42, stages, log=lambda *_: None)
    for _ in range(4):
        first.next()
    resumed = BatchSampler(_levels(), 10, 4, 42, stages, log=lambda *_: None)
    resumed.restore(first.state(), 4)
    assert all((resumed.next() == r).all() for r in ref[4:])
    assert resumed.counts() == full.counts()
    other = BatchSampler(_levels(), 10, 4, 43, stages, log=lambda *_: None)
    with pytest.raises(UserError, match="sampler state differs"):
        other.restore(first.state(), 4)
    with pytest.raises(UserError, match="START-END"):
        parse_stages("0-50:100/0/0,50-100")
    with pytest.raises(UserError, match="cover 0-100"):
        parse_stages("0-50:100/0/0,60-100:0/0/100")


def test_curriculum_without_difficulty_warns_and_samples_plainly():
    from megatron_patch.data.curriculum import DEFAULT_STAGES, BatchSampler, parse_stages

    logs = []
    s = BatchSampler([-1] * 10, 4, 5, 1, parse_stages(DEFAULT_STAGES), log=logs.append)
    assert not s.curriculum and "no 'difficulty'" in logs[0]
    seen = numpy.concatenate([s.next() for _ in range(4)])
    assert sorted(seen[:10]) == list(range(10))  # a shuffled epoch: every sample once
    with pytest.raises(UserError, match="2 samples have no 'difficulty'"):
        BatchSampler([0, 1, -1, -1], 5, 4, 1, parse_stages(DEFAULT_STAGES))


# ---------------------------------------------------------------------------------------------------
# train --sft: loss against HF, TP1 and TP2, curriculum report, resume
# ---------------------------------------------------------------------------------------------------
def _env() -> dict:
    return dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", MP_DEVICE="cpu",
                PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _train(work, name: str, nproc: int, extra: list[str]) -> list[float]:
    from megatron_patch.runtime.multirank import free_port

    out = work.root / name
    out.mkdir(exist_ok=True)
    metrics = out / "metrics.jsonl"
    argv = ["--load-hf", str(work.model), "--data-path", work.prefix, "--sft", "--curriculum",
            "--curriculum-seed", "42", "--seq-length", str(SEQ), "--micro-batch-size", "2",
            "--global-batch-size", "4", "--train-iters", "6", "--lr", "1e-2", "--metrics-file", str(metrics), *LORA,
            *extra]
    launcher = [PY] if nproc == 1 else [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                                        "--master_port", str(free_port())]
    with open(out / "log.txt", "a") as f:
        rc = subprocess.run([*launcher, "-m", "megatron_patch.training.pretrain", *argv], stdout=f,
                            stderr=subprocess.STDOUT, env=_env(), timeout=400, cwd=REPO).returncode
    log = (out / "log.txt").read_text()
    assert rc == 0, log[-4000:]
    return [json.loads(line)["loss"] for line in metrics.read_text().splitlines() if '"loss"' in line]


def _valid_losses(work, name: str) -> dict:
    lines = (work.root / name / "metrics.jsonl").read_text().splitlines()
    return {r["iteration"]: r["valid_loss"] for r in map(json.loads, lines) if "valid_loss" in r}


def _hf_batch(work, step: int | None, indices=None):
    """input_ids and labels (-100 on prompt and padding) of global batch `step` (0-based), or of the dataset rows
    `indices`, as HF takes them."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_patch.data.curriculum import DEFAULT_STAGES, BatchSampler, parse_stages

    meta = json.loads(Path(work.prefix + ".sft.json").read_text())
    if indices is None:
        indices = BatchSampler(meta["difficulty"], 6, 4, 42, parse_stages(DEFAULT_STAGES),
                               log=lambda *_: None).batch(step)
    ids, masks = IndexedDataset(work.prefix), IndexedDataset(work.prefix + ".mask")
    pad = json.loads((work.model / "config.json").read_text())["eos_token_id"]
    inputs = torch.full((4, SEQ), pad, dtype=torch.int64)
    labels = torch.full((4, SEQ), -100, dtype=torch.int64)
    for row, i in enumerate(indices):
        tok, mask = torch.from_numpy(ids[i].astype("int64")), torch.from_numpy(masks[i].astype(bool))
        inputs[row, :len(tok)] = tok
        labels[row, :len(tok)] = torch.where(mask, tok, torch.tensor(-100))
    return inputs, labels


def _hf_model(path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _loss(model, batch) -> float:
    import torch

    with torch.no_grad():
        return float(model(input_ids=batch[0], labels=batch[1]).loss)


@pytest.fixture(scope="module")
def sft_runs(work):
    tp1 = _train(work, "tp1", 1, ["--curriculum-report", str(work.root / "tp1.json")])
    # TP2 stopped after step 3 (mid-run, at a stage boundary) and resumed to 6
    tp2_args = ["--tensor-model-parallel-size", "2", "--save", str(work.root / "ck"),
                "--curriculum-report", str(work.root / "tp2.json"),
                "--valid-data-path", work.prefix, "--eval-iters", "1", "--eval-interval", "3"]  # rows 0-3 of the data
    first = _train(work, "tp2", 2, [*tp2_args, "--exit-interval", "3"])
    assert len(first) == 3
    both = _train(work, "tp2", 2, tp2_args)  # the metrics file is appended to: steps 1-3, then 4-6
    assert "start at iteration 3" in (work.root / "tp2" / "log.txt").read_text()
    return SimpleNamespace(tp1=tp1, tp2=both)


def test_sft_loss_equals_hf_at_tp1_and_tp2(work, sft_runs):
    hf = _loss(_hf_model(work.model), _hf_batch(work, 0))  # LoRA's B starts at zero: the base model's loss
    assert abs(sft_runs.tp1[0] - hf) <= LOSS_TOL, (sft_runs.tp1[0], hf)
    assert abs(sft_runs.tp2[0] - hf) <= LOSS_TOL, (sft_runs.tp2[0], hf)


def test_tp2_resumed_run_matches_tp1_and_reports_the_curriculum(work, sft_runs):
    from megatron_patch.data.curriculum import DEFAULT_STAGES, BatchSampler, parse_stages

    assert len(sft_runs.tp1) == 6 and len(sft_runs.tp2) == 6
    assert max(abs(a - b) for a, b in zip(sft_runs.tp1, sft_runs.tp2)) <= LOSS_TOL, (sft_runs.tp1, sft_runs.tp2)
    assert sft_runs.tp1[-1] < sft_runs.tp1[0]
    meta = json.loads(Path(work.prefix + ".sft.json").read_text())
    expected = BatchSampler(meta["difficulty"], 6, 4, 42, parse_stages(DEFAULT_STAGES), log=lambda *_: None)
    for _ in range(6):
        expected.next()
    for name in ("tp1.json", "tp2.json"):
        assert json.loads((work.root / name).read_text()) == {"stages": expected.counts()}
    assert "curriculum: stage 2/3 (steps 2-4)" in (work.root / "tp1" / "log.txt").read_text()


def test_lora_checkpoint_holds_adapters_only(work, sft_runs):
    import torch.distributed.checkpoint as dcp

    keys = list(dcp.FileSystemReader(str(work.root / "ck" / "iter_0000006")).read_metadata().state_dict_metadata)
    model = [k for k in keys if not k.startswith(("optimizer", "rng_state"))]
    assert model and all(".lora_" in k for k in model), model
    optim = [k for k in keys if k.startswith("optimizer")]
    assert optim and all(".lora_" in k for k in optim if "decoder" in k or "embedding" in k or "output" in k)
    assert not any("embedding" in k or "output_layer" in k for k in keys)


def test_lora2peft_loads_in_peft_and_matches_training_loss(work, sft_runs, tmp_path):
    """Adapters saved after step 3 at TP2, exported, loaded by peft: peft's loss on batch 4 is the loss the run
    logged at step 4; --merge gives base + adapter."""
    import torch
    from peft import PeftModel

    from megatron_patch.cli import main

    ck = str(work.root / "ck" / "iter_0000003")
    assert main(["convert", "lora2peft", "--mcore-path", ck, "--hf-config", str(work.model),
                 "--out", str(tmp_path / "adapter")]) == 0
    assert main(["convert", "lora2peft", "--mcore-path", ck, "--hf-config", str(work.model),
                 "--out", str(tmp_path / "merged"), "--merge"]) == 0
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and sorted(cfg["target_modules"]) == sorted(LORA[-1].split(","))
    batch = _hf_batch(work, 3)
    base = _hf_model(work.model)
    with torch.no_grad():
        base_logits = base(batch[0]).logits
    peft_model = PeftModel.from_pretrained(_hf_model(work.model), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        peft_logits = peft_model(batch[0]).logits
    assert (peft_logits - base_logits).abs().max() > 0.1  # the adapters act
    assert abs(_loss(peft_model, batch) - sft_runs.tp2[3]) <= LOSS_TOL, (_loss(peft_model, batch), sft_runs.tp2[3])
    # --sft validation after step 3 (--valid-data-path, 1 batch: the data's first 4 rows): peft's answer-token loss
    valid = _valid_losses(work, "tp2")
    assert sorted(valid) == [3, 6]
    peft_valid = _loss(peft_model, _hf_batch(work, None, range(4)))
    assert abs(valid[3] - peft_valid) <= LOSS_TOL, (valid[3], peft_valid)
    with torch.no_grad():
        merged_logits = _hf_model(tmp_path / "merged")(batch[0]).logits
    bound = 1e-5 * max(1.0, float(peft_logits.abs().max()))  # W + s*BA in fp32 vs peft's separate path
    assert (merged_logits - peft_logits).abs().max() <= bound


def test_compare_peft_path_passes_and_catches_other_adapters(work, sft_runs, tmp_path):
    """`compare --peft-path`: our LoRA model against peft's, layer by layer, with the TP2-saved adapters loaded at
    TP1 (resharded); adapters of another step FAIL."""
    from megatron_patch.cli import main

    ck = work.root / "ck"
    for it, out in (("iter_0000006", "a6"), ("iter_0000003", "a3")):
        assert main(["convert", "lora2peft", "--mcore-path", str(ck / it), "--hf-config", str(work.model),
                     "--out", str(tmp_path / out)]) == 0
    common = ["compare", "--hf-path", str(work.model), "--mcore-path", str(ck), "--seq-length", "16"]
    assert main([*common, "--peft-path", str(tmp_path / "a6")]) == 0
    assert main([*common, "--peft-path", str(tmp_path / "a3")]) == 1


def test_lora_target_names_are_checked(work):
    from transformers import AutoConfig

    from megatron_patch.models.families import family_for_config
    from megatron_patch.models.lora import lora_targets

    cfg = AutoConfig.from_pretrained(work.model)
    targets = lora_targets(family_for_config(cfg), cfg, ["q_proj", "v_proj", "down_proj"])
    assert [(t.rel, t.short) for t in targets] == [("self_attention.linear_qkv", ("q_proj", "v_proj")),
                                                   ("mlp.linear_fc2", ("down_proj",))]
    with pytest.raises(UserError, match="--lora-target qkv_proj: not a linear"):
        lora_targets(family_for_config(cfg), cfg, ["qkv_proj"])


def test_lora_learns_under_full_recompute(work, sft_runs):
    # recompute re-runs the same ops, so the losses equal the plain TP1 run; with the frozen embedding the
    # checkpointed blocks once had no input needing a gradient and the adapters silently stayed at zero
    losses = _train(work, "recompute", 1, ["--recompute-granularity", "full", "--recompute-method", "uniform",
                                           "--recompute-num-layers", "1"])
    scale = max(abs(x) for x in sft_runs.tp1)
    assert max(abs(a - b) for a, b in zip(losses, sft_runs.tp1)) <= 8 * scale * 2.0 ** -23, (losses, sft_runs.tp1)
