"""Bugs that no other test would notice (issue 17): each test here fails on a realistic one-line bug that
left the rest of the suite green. `make mutants` (megatron_patch/testing/mutants.py) re-introduces them.

  * the loss is the token mean over the loss mask, across micro-batches (hand-computed from the logits);
  * an HF checkpoint holding a tensor the family table does not map is refused (exit 2, nothing written);
  * a vocab that is not a multiple of 128 x TP: padding added on import, stripped on export (the original
    bytes come back), and `compare` PASSes with the padded logits cut;
  * DeepSeek YaRN with distinct mscale / mscale_all_dim matches HF;
  * an MTP copy of the embedding that differs past row 4096 is refused;
  * the NPU permute/unpermute fallbacks (fused, drop_and_pad) hand every argument to megatron's function;
  * the training tracker is replaced atomically (a kill between write and rename keeps the old one);
  * the Pai-convention converter wrapper refuses a MODEL_SIZE the weights contradict;
  * training end to end (one rank, Qwen2 mini, hidden dropout 0.1, NPU settings forced on CPU so the
    warm-up step runs): `--load` of a torch_dist checkpoint + `evaluate` give the validation loss HF
    transformers computes for those weights; the warm-up forward is the first step's forward; stop at N and
    resume to 2N reproduce the straight run bit for bit (random states restored).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from megatron_patch.errors import UserError
from megatron_patch.models.builder import ParallelLayout
from megatron_patch.runtime.multirank import run_ranks

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
PADDED_VOCAB = 520  # not a multiple of 128 x TP: megatron pads to 640 (TP1) / 768 (TP2)
LOGITS_BAR = 1e-5


@pytest.fixture(scope="module")
def work():
    from megatron_patch.convert.mini import make_mini

    root = Path(tempfile.mkdtemp(prefix="mp-silent-"))
    w = type("Work", (), {})()
    w.root = root
    w.padded = make_mini("qwen2", root / "qwen2-v520", overrides={"vocab_size": PADDED_VOCAB})
    w.mscale = make_mini("deepseek_v3", root / "ds3-mscale", layers=2,
                         overrides={"rope_parameters.mscale": 1.0, "rope_parameters.mscale_all_dim": 0.707,
                                    "num_nextn_predict_layers": 0})
    yield w
    shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# one rank, one spawn: loss mask, padded-vocab compare (HF in memory and a converted checkpoint), YaRN
# ---------------------------------------------------------------------------------------------------
def _masked_loss_check(hf_path: str) -> tuple[float, float]:
    """(forward_backward's loss, the hand-computed token mean) for a batch whose two micro-batches keep
    different numbers of tokens."""
    from transformers import AutoConfig

    from megatron_patch.data.batch import Batch
    from megatron_patch.models.builder import build_family_model, initialize_parallel
    from megatron_patch.training.step import forward_backward

    layout = ParallelLayout()
    initialize_parallel(layout, seed=5)
    hf = AutoConfig.from_pretrained(hf_path)
    chunks, _, _ = build_family_model(hf, layout)
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, PADDED_VOCAB, (2, 16), generator=gen)
    labels = torch.randint(0, PADDED_VOCAB, (2, 16), generator=gen)
    mask = torch.zeros(2, 16)
    mask[0, [1, 4, 5]] = 1  # 3 tokens in micro-batch 0, 11 in micro-batch 1
    mask[1, 2:13] = 1
    batch = Batch(tokens, labels, mask)
    with torch.no_grad():
        loss = forward_backward(chunks, batch, micro_batch_size=1, forward_only=True)
        logits = chunks[0](tokens, batch.position_ids, None).float()  # megatron's loss spans the padded vocab
    per_token = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                  reduction="none").view(2, 16)
    expected = (per_token * mask).sum() / mask.sum()
    return float(loss), float(expected)


def _one_rank_checks(rank: int, world: int, padded: str, padded_ckpt: str, mscale: str) -> dict:
    from megatron_patch.verify.compare import CompareSpec, run_in_group

    out = {"loss": _masked_loss_check(padded)}
    out["padded"] = run_in_group(CompareSpec(hf_path=padded))
    out["padded_ckpt"] = run_in_group(CompareSpec(hf_path=padded, mcore_path=padded_ckpt))
    out["mscale"] = run_in_group(CompareSpec(hf_path=mscale))
    return out


@pytest.fixture(scope="module")
def one_rank(work):
    from megatron_patch.convert.hf2mcore import hf2mcore

    ckpt = work.root / "qwen2-v520-tp1"
    hf2mcore(str(work.padded), str(ckpt), ParallelLayout(), fmt="torch", dtype="fp32")
    return run_ranks(_one_rank_checks, 1, timeout=400, args=(str(work.padded), str(ckpt), str(work.mscale)),
                     env={"TORCHDYNAMO_DISABLE": "1"})[0]


def test_loss_is_the_masked_token_mean(one_rank):
    got, expected = one_rank["loss"]
    assert abs(got - expected) <= 8 * torch.finfo(torch.float32).eps * abs(expected), (got, expected)


def _assert_pass(report):
    failed = [(r["component"], r["layer"], r["max_abs"]) for r in report["rows"] if not r["passed"]]
    assert report["result"] == "PASS", failed
    assert report["logits"]["max_abs"] <= LOGITS_BAR and report["logits"]["top1_agreement"] == 1.0


@pytest.mark.parametrize("which", ["padded", "padded_ckpt"])
def test_compare_passes_with_a_padded_vocab(one_rank, which):
    _assert_pass(one_rank[which])
    assert one_rank[which]["model"].get("vocab_size", PADDED_VOCAB) == PADDED_VOCAB


def test_yarn_with_distinct_mscale_values_matches_hf(work, one_rank):
    rope = json.loads((work.mscale / "config.json").read_text())["rope_parameters"]
    assert (rope["rope_type"], rope["mscale"], rope["mscale_all_dim"]) == ("yarn", 1.0, 0.707)
    _assert_pass(one_rank["mscale"])


def test_yarn_attention_factor_checked_against_hf(work):
    """An explicit rope attention_factor is accepted when it is what HF derives from mscale / mscale_all_dim
    (megatron derives the same) and refused otherwise: HF would use it as given."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron_patch.models.families.common import mla_rope

    hf = AutoConfig.from_pretrained(work.mscale)
    _, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    assert hf_factor != 1.0
    rope = dict(hf.rope_parameters)
    mla_rope(dict(rope, attention_factor=hf_factor), hf.max_position_embeddings)
    with pytest.raises(UserError, match="attention_factor"):
        mla_rope(dict(rope, attention_factor=hf_factor * 1.001), hf.max_position_embeddings)


# ---------------------------------------------------------------------------------------------------
# conversion
# ---------------------------------------------------------------------------------------------------
def _read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_padding_added_on_import_and_stripped_on_export(work):
    from megatron_patch.convert.hf2mcore import hf2mcore
    from megatron_patch.convert.mcore2hf import mcore2hf

    ckpt, back = work.root / "v520-tp2", work.root / "v520-back"
    hf2mcore(str(work.padded), str(ckpt), ParallelLayout(tp=2), fmt="torch", dtype="fp32")
    rank0 = torch.load(ckpt / "release" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    assert rank0["model"]["embedding.word_embeddings.weight"].shape[0] == 768 // 2  # padded to 128 x TP
    mcore2hf(str(ckpt), str(back))
    original, exported = _read_safetensors(work.padded), _read_safetensors(back)
    assert sorted(original) == sorted(exported)
    for name, tensor in original.items():
        assert exported[name].shape == tensor.shape and torch.equal(exported[name], tensor), name


@pytest.mark.parametrize("pp, vpp", [(2, None), (4, None), (2, 2)])
def test_layer_placement_matches_megatron_layer_offsets(work, pp, vpp):
    """Where the converter puts each decoder layer (stage, virtual chunk, local index) is where megatron's
    get_transformer_layer_offset says that stage's chunk starts."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
    from transformers import AutoConfig

    from megatron_patch.checkpoint.engine import ShardPlan
    from megatron_patch.models.builder import apply_layout
    from megatron_patch.models.families import family_for_config

    hf = AutoConfig.from_pretrained(work.padded)
    layout = ParallelLayout(pp=pp, vpp=vpp)
    plan = ShardPlan(family_for_config(hf), hf, layout)
    config = apply_layout(plan.mcore_config, layout)
    places = set()
    for row in (r for r in plan.rows if r.layer is not None):
        place = plan.placement(row)
        offset = get_transformer_layer_offset(config, vp_stage=place.chunk if vpp else None, pp_rank=place.pp)
        assert offset + place.local_layer == row.layer, (row.mcore, place)
        places.add((place.pp, place.chunk, place.local_layer))
    assert len(places) == hf.num_hidden_layers


def _with_extra_tensor(src: Path, dst: Path, name: str) -> None:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    (shard,) = dst.glob("*.safetensors")  # the minis are one shard
    tensors = load_file(shard)
    tensors[name] = torch.zeros(4, 4)
    save_file(tensors, shard, metadata={"format": "pt"})


EXTRA = "model.layers.0.mlp.extra_proj.weight"


@pytest.fixture(scope="module")
def extra_tensor_hf(work):
    hf = work.root / "extra-tensor"
    _with_extra_tensor(work.padded, hf, EXTRA)
    return hf


def test_hf2mcore_refuses_a_tensor_the_table_does_not_map(work, extra_tensor_hf, capsys):
    from megatron_patch.cli import main

    out = work.root / "extra-out"
    before = set(work.root.iterdir())
    rc = main(["convert", "hf2mcore", "--hf-path", str(extra_tensor_hf), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and EXTRA in err, err
    assert set(work.root.iterdir()) == before  # nothing written, not even a temporary sibling


def test_in_memory_loads_refuse_a_tensor_the_table_does_not_map(extra_tensor_hf):
    """compare (before any rank starts) and `train --load-hf` read HF weights without converting: the same
    check applies."""
    from transformers import AutoConfig

    from megatron_patch.training.checkpointing import init_from_hf
    from megatron_patch.verify.compare import CompareSpec, prepare

    with pytest.raises(UserError, match=EXTRA):
        prepare(CompareSpec(hf_path=str(extra_tensor_hf)))
    hf_config = AutoConfig.from_pretrained(extra_tensor_hf)
    with pytest.raises(UserError, match=EXTRA):
        init_from_hf(str(extra_tensor_hf), [], hf_config, ParallelLayout(), None, None)


def test_mtp_copy_that_differs_past_row_4096_is_refused():
    from types import SimpleNamespace

    from megatron_patch.checkpoint.engine import check_hf_copies

    primary = torch.randn(4100, 4)
    copy = primary.clone()
    plan = SimpleNamespace(rows=[SimpleNamespace(mcore="embedding.word_embeddings.weight",
                                                 hf=("model.embed_tokens.weight",))],
                           copies={"model.layers.2.embed_tokens.weight": "embedding.word_embeddings.weight"})
    tensors = {"model.embed_tokens.weight": primary, "model.layers.2.embed_tokens.weight": copy}
    check_hf_copies(plan, tensors.__getitem__)  # an exact copy passes
    copy[4099, 0] += 1
    with pytest.raises(UserError, match="rows 4096..4099"):
        check_hf_copies(plan, tensors.__getitem__)


def test_model_size_mismatch_refused_by_the_pai_wrapper(work):
    out = work.root / "sized"
    env = dict(os.environ, PYTHON=PY, TORCHDYNAMO_DISABLE="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # MODEL_SIZE SRC DST TP PP ETP EP PR MG2HF: a ~1M-parameter mini declared as 16B
    proc = subprocess.run(["bash", str(REPO / "toolkits/checkpoint/hf2mcore.sh"), "16B", str(work.padded), str(out),
                           "1", "1", "1", "1", "fp32", "false"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "error: MODEL_SIZE 16B" in proc.stderr, proc.stderr[-2000:]
    assert not out.exists() and not list(work.root.glob("sized*"))


# ---------------------------------------------------------------------------------------------------
# NPU fallbacks and the tracker
# ---------------------------------------------------------------------------------------------------
def _npu_patch(target):
    from megatron_patch.runtime import npu_adapter  # noqa: F401 - registers the NPU patches
    from megatron_patch.runtime.adapters import REGISTRY
    from megatron_patch.runtime.patching import _resolve

    (patch,) = [p for p in REGISTRY.patches if p.target == target and p.devices == ("npu",)]
    owner, name = _resolve(target)
    original = getattr(owner, name)
    return original, patch.make(original)


def test_npu_moe_fallbacks_pass_every_argument_to_megatron(npu_double):
    """drop_and_pad: capacity-padded routing (each expert exactly `capacity` tokens) through the patched
    permute/unpermute gives megatron's result, which for identity experts is sum_e p[t, e] * x[t] (hand
    computed). fused: megatron's TE-only branch is reached (its own error on a machine without TE)."""
    orig_p, new_p = _npu_patch("megatron.core.transformer.moe.moe_utils.permute")
    orig_u, new_u = _npu_patch("megatron.core.transformer.moe.moe_utils.unpermute")
    gen = torch.Generator().manual_seed(0)
    tokens, experts, capacity = 8, 4, 3
    x = torch.randn(tokens, 6, generator=gen)
    routing_map = torch.zeros(tokens, experts, dtype=torch.bool)
    for e in range(experts):
        routing_map[torch.randperm(tokens, generator=gen)[:capacity], e] = True
    probs = torch.rand(tokens, experts, generator=gen) * routing_map
    out_tokens = experts * capacity
    ref = orig_p(x, routing_map, probs, out_tokens, False, True)
    got = new_p(x, routing_map, probs, num_out_tokens=out_tokens, drop_and_pad=True)
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
    back = new_u(got[0], got[2], x.shape, probs=probs, routing_map=routing_map, drop_and_pad=True)
    torch.testing.assert_close(back, orig_u(ref[0], ref[2], x.shape, probs, routing_map, False, True), rtol=0, atol=0)
    by_hand = x * probs.sum(dim=1, keepdim=True)
    torch.testing.assert_close(back, by_hand, rtol=1e-6, atol=1e-6)
    for call in (lambda: new_p(x, routing_map, probs, fused=True),
                 lambda: new_u(got[0], got[2], x.shape, probs=probs, routing_map=routing_map, fused=True)):
        with pytest.raises(ValueError, match="fused_(un)?permute.* not available"):
            call()


def test_tracker_survives_a_kill_between_write_and_rename(tmp_path, monkeypatch):
    from megatron_patch.checkpoint import mcore_layout

    mcore_layout.write_latest(tmp_path, 5)  # what training publishes a save by, and converters write

    def killed(*_):
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(mcore_layout.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        mcore_layout.write_latest(tmp_path, 10)
    assert mcore_layout.read_tracker(tmp_path) == 5


# ---------------------------------------------------------------------------------------------------
# training: --load torch_dist, evaluate, warm-up (NPU settings on CPU), dropout + resume
# ---------------------------------------------------------------------------------------------------
CORPUS = REPO / "examples" / "data" / "corpus.txt"
# The trainer with the NPU launch settings (warm-up step) on this CPU; everything else as on CPU.
FORCE_NPU_SETTINGS = """
import sys
from megatron_patch.runtime import settings
cpu_settings = settings.settings_for
def npu_on_cpu(device):
    npu, own = cpu_settings("npu"), cpu_settings(device)
    npu.device, npu.batch_p2p_comm, npu.disable_compile = own.device, own.batch_p2p_comm, own.disable_compile
    return npu
settings.settings_for = npu_on_cpu
from megatron_patch.training.pretrain import main
sys.exit(main(sys.argv[1:]))
"""
GBS, SEQ, EVAL_ITERS = 4, 32, 2
TRAIN = ["--micro-batch-size", "2", "--global-batch-size", str(GBS), "--seq-length", str(SEQ), "--seed", "7",
         "--hidden-dropout", "0.1", "--log-interval", "1"]


@pytest.fixture(scope="module")
def train_work(work):
    from megatron_patch.convert.hf2mcore import hf2mcore
    from megatron_patch.convert.mini import make_mini
    from megatron_patch.data.preprocess import preprocess

    w = type("TrainWork", (), {})()
    w.root = work.root
    w.hf = make_mini("qwen2", work.root / "qwen2", layers=2)
    w.data = str(work.root / "corpus")
    preprocess([str(CORPUS)], str(w.hf), w.data, append_eod=True, progress=False)
    w.cache = str(work.root / "cache")
    w.dist = work.root / "qwen2-dist"
    hf2mcore(str(w.hf), str(w.dist), ParallelLayout(), fmt="torch_dist", dtype="fp32")
    w.base = ["--load", str(w.dist), "--hf-config", str(w.hf), "--data-path", w.data, "--data-cache-path", w.cache,
              *TRAIN]
    return w


def _train(w, name: str, argv: list[str]) -> tuple[list[dict], str]:
    metrics = w.root / f"{name}.jsonl"
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", MP_DEVICE="cpu",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(w.root / f"{name}.log", "w") as log:
        proc = subprocess.run([PY, "-c", FORCE_NPU_SETTINGS, *w.base, *argv, "--metrics-file", str(metrics)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, timeout=300, cwd=REPO)
    text = (w.root / f"{name}.log").read_text(errors="replace")
    assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{text[-4000:]}"
    return [json.loads(line) for line in metrics.read_text().splitlines()], text


def _warmup_loss(log: str) -> float:
    (line,) = [line for line in log.splitlines() if line.startswith("warm-up: ")]
    return float(line.rsplit("loss ", 1)[1].split()[0])


def _hf_losses(w) -> tuple[float, float]:
    """Through transformers' model with the HF weights (no dropout): the loss of the first training batch,
    and the validation loss evaluate() should report (the mean over the validation batches of each batch's
    token-mean loss). The batches are the trainer's: megatron's GPTDataset with the trainer's settings."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_patch.data.gpt import DataSpec, GlobalBatches, build_datasets, tokenizer_from_hf_config

    hf_config = AutoConfig.from_pretrained(w.hf)
    spec = DataSpec(train_blend=([w.data], None), seq_length=SEQ, global_batch_size=GBS, train_iters=1, seed=7,
                    tokenizer=tokenizer_from_hf_config(hf_config), valid_blend=([w.data], None),
                    eval_samples=EVAL_ITERS * GBS, cache_dir=w.cache)
    train, valid = build_datasets(spec)
    model = AutoModelForCausalLM.from_pretrained(w.hf, torch_dtype=torch.float32).eval()

    def loss(batch) -> float:
        with torch.no_grad():
            logits = model(batch.tokens).logits.float()
        per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), reduction="none")
        return float((per_token * batch.loss_mask.flatten()).sum() / batch.loss_mask.sum())

    batches = GlobalBatches(valid, GBS)
    return loss(GlobalBatches(train, GBS).next()), sum(loss(batches.next()) for _ in range(EVAL_ITERS)) / EVAL_ITERS


def test_load_torch_dist_and_evaluate_match_hf(train_work):
    """lr 0: the weights stay those of the torch_dist checkpoint (converted from HF), so evaluate() must give
    HF's validation loss; dropout 0.1 is on in training (the step's loss is not HF's) and off in evaluation."""
    metrics, log = _train(train_work, "eval", ["--train-iters", "1", "--lr", "0", "--min-lr", "0",
                                               "--eval-interval", "1", "--eval-iters", str(EVAL_ITERS),
                                               "--valid-data-path", train_work.data])
    assert f"model: torch_dist {train_work.dist}" in log
    (valid,) = [m["valid_loss"] for m in metrics if "valid_loss" in m]
    (step,) = [m for m in metrics if "loss" in m]
    hf_step, hf_valid = _hf_losses(train_work)
    assert abs(valid - hf_valid) <= 1e-5, (valid, hf_valid)
    assert abs(step["loss"] - hf_step) > 1e-3, (step["loss"], hf_step)  # dropout was on
    assert _warmup_loss(log) == step["loss"]  # the warm-up ran the first batch from the same state


def test_dropout_resume_is_bit_identical_with_warmup(train_work):
    """Hidden dropout 0.1 and a warm-up step before each start: stop at N = 2 and resume to 2N gives exactly
    the straight run's losses and grad norms (model, optimizer, data position and random states restored)."""
    steps = ["--train-iters", "4", "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine"]
    straight, log = _train(train_work, "straight", steps)
    assert _warmup_loss(log) == straight[0]["loss"]
    save = ["--save", str(train_work.root / "resume-ckpt"), "--save-interval", "2"]
    first, _ = _train(train_work, "first-half", [*steps, *save, "--exit-interval", "2"])
    second, log = _train(train_work, "second-half", [*steps, *save])
    assert "start at iteration 2" in log
    assert [m["iteration"] for m in first + second] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm"):
        assert [m[key] for m in first + second] == [m[key] for m in straight], key
    assert len({m["loss"] for m in straight}) == 4
