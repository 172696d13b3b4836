"""`train` and `compare` build megatron-core's Transformer Engine spec (--transformer-impl, issue 10 item 4).

Over the TE test double (tests/te_double): `compare --transformer-impl transformer_engine` PASSes against HF
transformers for a DeepSeek-V3 mini (MLA, MoE, MTP) and a Qwen3-MoE mini at TP1 and TP2xEP2, with the same
hook rows as the local spec (the norms TE fuses into the next linear are recorded from that linear, and a
wrong fused norm weight FAILs at that row); `auto` on CPU builds the local spec; a 3-step `train
--transformer-impl transformer_engine` from HF gives the local spec's losses and saves TE names. One 2-rank
spawn for all comparisons, two training subprocesses.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from megatron_patch.models.builder import ParallelLayout
from megatron_patch.verify.compare import CompareSpec, run_specs_in_group

from te_harness import make_minis, run_te_ranks, te_double_env

REPO = Path(__file__).resolve().parents[1]
TE, LOCAL = "transformer_engine", "local"
TP1, TP2EP2 = ParallelLayout(), ParallelLayout(tp=2, ep=2, etp=1)
LOSS_TOL = 1e-5  # fp32, same data and initial weights: only the module implementations differ


def break_fused_input_norm_layer1(chunks, config, layout):
    """Layer 1's input RMSNorm weight (TE: fused into linear_qkv) scaled by 1.5."""
    with torch.no_grad():
        chunks[0].decoder.layers[1].self_attention.linear_qkv.layer_norm_weight.mul_(1.5)


@pytest.fixture(scope="module")
def work():
    root = Path(tempfile.mkdtemp(prefix="mp-te-build-"))
    yield root, make_minis(root)
    shutil.rmtree(root, ignore_errors=True)


CASES = [(f, impl, layout) for f in ("deepseek_v3", "qwen3_moe") for impl, layout in
         ((TE, TP1), (TE, TP2EP2), (LOCAL, TP1), ("auto", TP1))]


@pytest.fixture(scope="module")
def reports(work):
    _, minis = work
    specs = [CompareSpec(hf_path=str(minis[f]), layout=layout, transformer_impl=impl) for f, impl, layout in CASES]
    specs.append(CompareSpec(hf_path=str(minis["qwen3_moe"]), transformer_impl=TE, mutate=break_fused_input_norm_layer1))
    specs += [CompareSpec(hf_path=str(minis[f]), transformer_impl=TE, mcore_path=str(path))
              for f, path in _converted(work).items()]
    return run_te_ranks(run_specs_in_group, 2, timeout=400, args=(specs,), env={"TORCHDYNAMO_DISABLE": "1"})[0]


def _converted(work) -> dict:
    """`convert hf2mcore` outputs in the other names: TE (default) torch_dist, local-spec legacy torch."""
    from megatron_patch.convert.hf2mcore import hf2mcore

    root, minis = work
    hf2mcore(str(minis["deepseek_v3"]), str(root / "ds3-dist"), TP1, fmt="torch_dist")
    hf2mcore(str(minis["qwen3_moe"]), str(root / "q3-local"), TP1, fmt="torch", transformer_impl=LOCAL)
    return {"deepseek_v3": root / "ds3-dist", "qwen3_moe": root / "q3-local"}


def _rows(report) -> list[tuple]:
    return [(r["component"], r["layer"]) for r in report["rows"]]


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
@pytest.mark.parametrize("layout", [TP1, TP2EP2], ids=["tp1", "tp2ep2"])
def test_compare_te_spec_passes_against_hf(reports, family, layout):
    by_case = dict(zip(CASES, reports))
    report, local = by_case[(family, TE, layout)], by_case[(family, LOCAL, TP1)]
    assert report["model"]["transformer_impl"] == TE
    assert report["result"] == "PASS", report["first_failure"]
    # the same hook points as the local spec (fused norms included), and the logits within the bound
    assert _rows(report) == _rows(local)
    assert ("input_layernorm", 0) in _rows(report) and ("pre_mlp_layernorm", 0) in _rows(report)
    assert report["logits"]["top1_agreement"] == 1.0
    assert not [n for n in report["notes"] if "never ran" in n or "only in" in n], report["notes"]


def test_auto_builds_the_local_spec_on_cpu(reports):
    by_case = dict(zip(CASES, reports))
    for family in ("deepseek_v3", "qwen3_moe"):
        assert by_case[(family, LOCAL, TP1)]["model"]["transformer_impl"] == LOCAL
        auto = by_case[(family, "auto", TP1)]
        assert auto["model"]["transformer_impl"] == LOCAL and auto["result"] == "PASS"


def test_te_spec_compares_checkpoints_in_either_names(reports):
    for report in reports[-2:]:  # TE-named torch_dist (DeepSeek-V3), local-named torch (Qwen3-MoE)
        assert report["model"]["transformer_impl"] == TE
        assert report["weights"].startswith("Megatron checkpoint") and report["result"] == "PASS", report["weights"]


def test_a_wrong_fused_norm_weight_fails_at_that_row(reports):
    report = reports[len(CASES)]
    assert report["result"] == "FAIL"
    assert (report["first_failure"]["component"], report["first_failure"]["layer"]) == ("input_layernorm", 1)


def test_explicit_te_without_te_is_a_one_line_error(work, tmp_path):
    _, minis = work
    env = dict(te_double_env(), PYTHONPATH=str(REPO))  # the double left off the path
    proc = subprocess.run([sys.executable, "-m", "megatron_patch.cli", "compare", "--hf-path",
                           str(minis["qwen3_moe"]), "--transformer-impl", TE],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: --transformer-impl transformer_engine: transformer_engine is not "
                                "importable"), proc.stderr[-2000:]


def _train(root: Path, minis, name: str, impl: str, data: str, start: list[str] | None = None,
           steps: int = 3) -> tuple[list[float], str]:
    out = root / name
    metrics = out / "metrics.jsonl"
    out.mkdir()
    hf = str(minis["deepseek_v3"])
    cmd = [sys.executable, "-m", "megatron_patch.training.pretrain", *(start or ["--load-hf", hf]), "--hf-config", hf,
           "--data-path", data, "--data-cache-path", str(root / "cache"), "--metrics-file", str(metrics),
           "--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "32", "--train-iters", str(steps),
           "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "1",
           "--seed", "1234", "--transformer-impl", impl, "--save", str(out / "ckpt")]
    env = te_double_env()
    env.update(PYTHONPATH=f"{env['PYTHONPATH']}:{REPO}", TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1",
               MP_DEVICE="cpu")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines() if '"loss"' in line]
    return losses, proc.stdout


def test_train_te_spec_matches_local_losses_and_saves_te_names(work):
    from megatron_patch.checkpoint.key_map import stored_keys
    from megatron_patch.data.preprocess import preprocess

    root, minis = work
    data = str(root / "corpus")
    preprocess([str(REPO / "examples" / "data" / "corpus.txt")], str(minis["deepseek_v3"]), data,
               append_eod=True, progress=False)
    te, te_log = _train(root, minis, "te", TE, data)
    local, local_log = _train(root, minis, "local", LOCAL, data)
    assert "| transformer_engine spec |" in te_log and "| local spec |" in local_log
    assert len(te) == len(local) == 3
    worst = max(abs(a - b) for a, b in zip(te, local))
    assert worst <= LOSS_TOL, (te, local)
    # the checkpoint follows the spec used: TE's fused norm names and _extra_state; the local run's has neither
    te_keys = stored_keys(root / "te" / "ckpt" / "iter_0000003")
    local_keys = stored_keys(root / "local" / "ckpt" / "iter_0000003")
    fused = "decoder.layers.0.self_attention.linear_q_up_proj.layer_norm_weight"
    assert fused in te_keys and "decoder.layers.0.self_attention.q_layernorm.weight" not in te_keys
    assert fused not in local_keys and "decoder.layers.0.self_attention.q_layernorm.weight" in local_keys
    assert any(k.startswith("decoder.layers.0.input_layernorm._extra_state") for k in te_keys)
    # each spec reads the other's torch_dist checkpoint (the model's own names decide the direction)
    te_from_local, _ = _train(root, minis, "te-from-local", TE, data, ["--load", str(root / "local" / "ckpt"),
                                                                       "--finetune"], steps=2)
    local_from_te, _ = _train(root, minis, "local-from-te", LOCAL, data, ["--load", str(root / "te" / "ckpt"),
                                                                          "--finetune"], steps=2)
    assert abs(te_from_local[0] - local_from_te[0]) <= LOSS_TOL, (te_from_local, local_from_te)
    assert te_from_local[0] < te[0] - 0.3  # the trained weights were loaded, not the initial ones
