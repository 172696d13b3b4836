"""Training on megatron-core: the FLOPs formula, the log line, preprocessing, and end-to-end runs of the
trainer under torchrun on gloo (tiny DeepSeek-V3 / Qwen2 from make-mini, the shipped corpus):

  * loss decreases over 20 steps at TP1, EP2 (DeepSeek-V3, from a converted Megatron checkpoint),
    TP2xPP2 (DeepSeek-V3 with its MTP layer; Qwen2 through the Pai-style launch script);
  * the loss at every step is the same at TP1 and at EP2 / TP2xPP2 for the same global batch
    (fp32; LOSS_TOL below: only the reduction order differs);
  * a run killed while it writes a checkpoint leaves the previous one loadable, and resuming from it
    gives bit-identical losses for the remaining steps (exact float equality);
  * the trained checkpoint exports to HF (`convert mcore2hf`) and matches the trained model layer by layer;
  * two launcher invocations as two nodes (NNODES/NODE_RANK/MASTER_ADDR) train exactly like one node;
  * NaN/Inf stops the run with exit status 3 and names the step; the launcher refuses unsupported
    arguments by name.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_patch.errors import UserError

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "examples" / "data" / "corpus.txt"
PY = sys.executable
STEPS = 20
LOSS_TOL = 1e-5  # fp32, same global batch: TP/EP/PP only change the reduction order
# 8 sequences of 32 tokens per step, 4 micro-batches of 2 at DP1 (2 per EP rank at EP2)
TRAIN = ["--micro-batch-size", "2", "--global-batch-size", "8", "--seq-length", "32", "--train-iters", str(STEPS),
         "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "2",
         "--adam-beta2", "0.95", "--weight-decay", "0.1", "--seed", "1234"]


# ---------------------------------------------------------------------------------------------------
# fast checks
# ---------------------------------------------------------------------------------------------------
def test_flops_per_token_hand_computed():
    from megatron_patch.training.flops import forward_flops_per_token, training_flops_per_token

    # MLA + MoE, two layers (dense, MoE), one MTP layer; hand count of multiply-adds per token:
    mla = SimpleNamespace(
        num_layers=2, hidden_size=8, num_attention_heads=2, multi_latent_attention=True, q_lora_rank=4,
        kv_lora_rank=4, qk_head_dim=3, qk_pos_emb_head_dim=1, v_head_dim=2, ffn_hidden_size=16,
        gated_linear_unit=True, num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=4,
        moe_shared_expert_intermediate_size=4, moe_layer_freq=[0, 1], mtp_num_layers=1)
    seq, vocab = 10, 32
    # q: 8*4 + 4*2*(3+1) = 64; kv: 8*(4+1) + 4*2*(3+2) = 80; out: 2*2*8 = 32;
    # core: 2*4*10/2 + 2*2*10/2 = 60  -> attention 236
    attention = 236
    dense = 8 * 16 * 3  # 384
    moe = 8 * 4 + 2 * (8 * 4 * 3) + 8 * 4 * 3  # router 32 + two experts 192 + shared 96 = 320
    logits = 8 * 32  # 256
    mtp = 2 * 8 * 8 + attention + moe + logits  # eh_proj 128, a layer like the last (MoE), its own logits
    macs = attention + dense + attention + moe + logits + mtp
    assert forward_flops_per_token(mla, vocab, seq) == 2 * macs
    assert training_flops_per_token(mla, vocab, seq) == 6 * macs

    # GQA, dense, no SwiGLU: q 8*2*4=64, kv 2*8*1*4=64, out 64, core 2*2*4*10/2=80; mlp 8*16*2=256
    gqa = SimpleNamespace(num_layers=1, hidden_size=8, num_attention_heads=2, num_query_groups=1, kv_channels=4,
                          ffn_hidden_size=16, gated_linear_unit=False, num_moe_experts=None)
    assert forward_flops_per_token(gqa, vocab, seq) == 2 * (64 + 64 + 64 + 80 + 256 + 8 * 32)


def test_log_line_format():
    from megatron_patch.training.metrics import StepRecord, format_line

    rec = StepRecord(iteration=12, train_iters=100, loss=5.12341, lr=3e-4, grad_norm=1.234, step_time=0.5,
                     tokens=617, aux={"aux": 0.001234}, flops_per_token=1e6, peak_flops=1e6 * 1234 / 0.123,
                     world_size=1, mem_bytes=int(1.2 * 1024**3))
    assert format_line(rec) == ("Step 12/100 | Loss: 5.1234 | Aux: 0.001234 | LR: 3.00e-04 | Grad norm: 1.23 | "
                                "Time: 0.50s | tok/s: 1234 | MFU: 12.3% | Mem: 1.2 GiB")
    rec.aux, rec.peak_flops, rec.mtp = {}, None, 5.5  # dense model on CPU (no peak known), with MTP
    assert format_line(rec) == ("Step 12/100 | Loss: 5.1234 | MTP: 5.5000 | LR: 3.00e-04 | Grad norm: 1.23 | "
                                "Time: 0.50s | tok/s: 1234 | Mem: 1.2 GiB")


@pytest.mark.parametrize("argv, message", [
    (["--context-parallel-size", "0"], "--context-parallel-size must be >= 1"),
    (["--context-parallel-size", "3"], "divisible by 2 x --context-parallel-size"),
    (["--context-parallel-size", "2", "--cp-comm-type", "a2a"], "--cp-comm-type a2a is not supported.*use p2p or"),
    (["--fp16", "--bf16"], "--fp16 and --bf16 exclude each other"),
    (["--loss-scale", "8"], "--loss-scale needs --fp16"),
    (["--lr-warmup-iters", "20"], "--lr-warmup-iters"),
    (["--load", "a", "--load-hf", "b"], "--load"),
    (["--save-interval", "5"], "--save-interval needs --save"),
    (["--data-path", "/nonexistent/corpus"], "/nonexistent/corpus.bin not found"),
    (["--pack"], "--pack needs --sft"),
    (["--lora-rank", "4", "--lora-target", "q_proj,experts", "--lora-dropout", "0.1"],
     "--lora-dropout 0.1 with --lora-target experts: peft adapts the fused experts without dropout"),
])
def test_trainer_flag_validation(argv, message):
    from megatron_patch.training.arguments import build_parser, validate

    args = build_parser().parse_args(["--hf-config", "x", "--data-path", "p", *TRAIN, *argv])
    with pytest.raises(UserError, match=message):
        validate(args)


# ---------------------------------------------------------------------------------------------------
# shared workspace: minis, data, converted checkpoint
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def work():
    from megatron_patch.convert.mini import make_mini
    from megatron_patch.data.preprocess import preprocess

    # A private directory, not pytest's tmp_path: pytest sessions started meanwhile (other checkouts on this
    # machine) prune old numbered pytest directories, which could delete this one mid-run.
    root = Path(tempfile.mkdtemp(prefix="mp-training-"))
    yield _workspace(root, make_mini, preprocess)
    shutil.rmtree(root, ignore_errors=True)


def _workspace(root: Path, make_mini, preprocess) -> SimpleNamespace:
    w = SimpleNamespace(root=root)
    w.ds3 = make_mini("deepseek_v3", root / "ds3")  # with one MTP layer
    w.qwen2 = make_mini("qwen2", root / "qwen2")
    # make-mini trains the same tokenizer for every family (same corpus, vocab 512): one dataset serves all
    w.data = str(root / "corpus")
    stats = preprocess([str(CORPUS)], str(w.ds3), w.data, append_eod=True, progress=False)
    assert stats["documents"] > 100 and stats["tokens"] > 20000
    w.cache = str(root / "cache")
    w.ds3_ep2 = _convert(w.ds3, root / "ds3_ep2_torch", ep=2)
    w.ds3_tp2pp2 = _convert(w.ds3, root / "ds3_tp2pp2_torch", tp=2, pp=2)
    w.qwen2_tp2pp2 = _convert(w.qwen2, root / "qwen2_tp2pp2_torch", tp=2, pp=2)
    return w


def _convert(hf_dir: Path, out: Path, **layout) -> Path:
    """A Megatron torch-layout checkpoint at that layout, written by `convert hf2mcore`."""
    from megatron_patch.convert.hf2mcore import hf2mcore
    from megatron_patch.models.builder import ParallelLayout

    hf2mcore(str(hf_dir), str(out), ParallelLayout(**layout), fmt="torch", dtype="fp32")
    return out


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", MP_DEVICE="cpu",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra or {})
    return env


def _run(cmd: list[str], log: Path, env: dict | None = None, timeout: int = 300) -> tuple[int, str]:
    """Run with output to a file (a pipe could be held open by a leftover writer process)."""
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(env), timeout=timeout, cwd=REPO)
    return proc.returncode, log.read_text(errors="replace")


def train(work, name: str, nproc: int, args: list[str], env: dict | None = None, expect_rc: int = 0):
    """Train; returns the per-step metrics (JSON lines, exact floats) and the log text."""
    out = work.root / name
    out.mkdir(exist_ok=True)
    metrics = out / "metrics.jsonl"
    argv = [*args, "--data-path", work.data, "--data-cache-path", work.cache, "--metrics-file", str(metrics)]
    if nproc == 1:
        cmd = [PY, "-m", "megatron_patch.training.pretrain", *argv]
    else:
        cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(_port()),
               "-m", "megatron_patch.training.pretrain", *argv]
    rc, text = _run(cmd, out / "log.txt", env)
    assert rc == expect_rc, f"{name}: exit {rc}\n{text[-4000:]}"
    return _read_metrics(metrics), text


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if '"loss"' in line]


def _port() -> int:
    from megatron_patch.runtime.multirank import free_port

    return free_port()


def _losses(metrics) -> list[float]:
    return [m["loss"] for m in metrics]


def assert_decreasing(losses, name):
    assert len(losses) == STEPS, (name, losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.3, f"{name}: loss did not decrease ({first:.4f} -> {last:.4f}): {losses}"


def assert_same_losses(ref, other, name):
    worst = max(abs(a - b) for a, b in zip(ref, other))
    assert len(ref) == len(other) and worst <= LOSS_TOL, f"{name}: max |loss diff| {worst:.2e} > {LOSS_TOL}"


# ---------------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ds3_runs(work):
    """DeepSeek-V3 mini: TP1 from HF weights; EP2 + distributed optimizer from the converted checkpoint."""
    tp1, log = train(work, "ds3_tp1", 1, ["--load-hf", str(work.ds3), *TRAIN])
    assert "Aux: " in log and "MTP: " in log and "tok/s: " in log
    ep2, _ = train(work, "ds3_ep2", 2, ["--load", str(work.ds3_ep2), "--hf-config", str(work.ds3),
                                        "--expert-model-parallel-size", "2", "--use-distributed-optimizer",
                                        "--save", str(work.root / "ds3_ep2_trained"), *TRAIN])
    return tp1, ep2


def test_deepseek_v3_trains_and_matches_across_tp1_and_ep2(ds3_runs):
    tp1, ep2 = ds3_runs
    assert_decreasing(_losses(tp1), "DeepSeek-V3 TP1")
    assert_decreasing(_losses(ep2), "DeepSeek-V3 EP2")
    assert_same_losses(_losses(tp1), _losses(ep2), "DeepSeek-V3 TP1 vs EP2")
    assert all(m["aux"] > 0 and m["mtp"] > 0 for m in ep2)


def test_kill_during_save_then_stop_at_n_and_resume_to_2n_are_bit_identical(work, ds3_runs):
    """EP2 + distributed optimizer, against the uninterrupted 2N = 20-step run:
    1. checkpoints every 5 steps; the ranks are killed while writing the step-10 one: the tracker stays
       on step 5 and no iter_0000010 appears;
    2. the same command resumes from that step-5 checkpoint and stops at step N = 10 (--exit-interval:
       save and exit 0);
    3. the same command resumes from step N and runs to 2N. Steps 6..2N reproduce the uninterrupted run
       exactly (float equality of loss and grad norm)."""
    from megatron_patch.checkpoint.mcore_layout import read_tracker
    from megatron_patch.training.checkpointing import CRASH_ENV

    _, straight = ds3_runs
    half = STEPS // 2
    save = work.root / "ds3_resume_ckpt"
    args = ["--load", str(work.ds3_ep2), "--hf-config", str(work.ds3), "--expert-model-parallel-size", "2",
            "--use-distributed-optimizer", "--save", str(save), "--save-interval", "5", *TRAIN]
    first, log = train(work, "ds3_resume_a", 2, args, env={CRASH_ENV: str(half)}, expect_rc=1)
    assert f"[{CRASH_ENV}]" in log and [m["iteration"] for m in first] == list(range(1, half + 1))
    assert read_tracker(save) == 5
    assert not (save / f"iter_{half:07d}").exists()

    stopped, log = train(work, "ds3_resume_b", 2, [*args, "--exit-interval", str(half)])
    assert "start at iteration 5" in log and f"exiting at iteration {half}" in log
    assert [m["iteration"] for m in stopped] == list(range(6, half + 1))
    assert read_tracker(save) == half and (save / f"iter_{half:07d}").is_dir()

    resumed, log = train(work, "ds3_resume_c", 2, args)
    assert f"start at iteration {half}" in log
    assert [m["iteration"] for m in resumed] == list(range(half + 1, STEPS + 1))
    for name in ("loss", "grad_norm"):
        assert [m[name] for m in stopped + resumed] == [m[name] for m in straight][5:]  # exact float equality
    assert read_tracker(save) == STEPS


def test_trained_checkpoint_exports_to_hf(work, ds3_runs):
    """The EP2 run's final checkpoint (torch_dist, with distributed-optimizer state) -> `convert mcore2hf`:
    the exported HF model reproduces the trained Megatron model layer by layer (`compare` PASS), and no
    longer the initial weights (FAIL), so the export carries what training changed."""
    ckpt, back = work.root / "ds3_ep2_trained", work.root / "ds3_trained_hf"
    cli = [PY, "-m", "megatron_patch.cli"]
    rc, log = _run([*cli, "convert", "mcore2hf", "--mcore-path", str(ckpt), "--hf-config", str(work.ds3),
                    "--out", str(back)], work.root / "export.log")
    assert rc == 0 and "from torch_dist" in log, log[-3000:]
    compare = [*cli, "compare", "--mcore-path", str(ckpt), "--ep", "2", "--hf-path"]
    rc, log = _run([*compare, str(back)], work.root / "compare_trained.log")
    assert rc == 0 and log.rstrip().endswith("PASS"), log[-3000:]
    rc, log = _run([*compare, str(work.ds3)], work.root / "compare_initial.log")
    assert rc == 1 and "First mismatch: embedding" in log, log[-3000:]


def test_deepseek_v3_tp2_pp2_with_mtp_matches_tp1(work, ds3_runs):
    tp1, _ = ds3_runs
    run, log = train(work, "ds3_tp2pp2", 4, ["--load", str(work.ds3_tp2pp2), "--tensor-model-parallel-size", "2",
                                             "--pipeline-model-parallel-size", "2", *TRAIN])
    assert f"model: torch {work.ds3_tp2pp2 / 'release'} | TP2xPP2" in log  # the converted checkpoint
    assert_decreasing(_losses(run), "DeepSeek-V3 TP2xPP2")
    assert_same_losses(_losses(tp1), _losses(run), "DeepSeek-V3 TP1 vs TP2xPP2")
    assert max(abs(a["mtp"] - b["mtp"]) for a, b in zip(tp1, run)) <= LOSS_TOL


def launch_qwen2(work, name: str, env: dict) -> tuple[list[dict], str]:
    """The Pai-style launcher at TP2xPP2 from the converted checkpoint, 20 steps, fp32."""
    out = work.root / name
    metrics = out / "metrics.jsonl"
    # ENV MODEL_SIZE MBS GBS LR MIN_LR SEQ PAD PR TP PP CP ETP EP SP DO FL SFT AC OFFLOAD SAVE_INTERVAL DATA
    # VALID CKPT TRAIN_TOKENS WARMUP_TOKENS OUTPUT; 20 steps = 5120 tokens, 2 warm-up steps = 512 tokens
    cmd = ["bash", str(REPO / "examples/qwen2/run_mcore_qwen2.sh"), "local", "mini", "2", "8", "3e-3", "3e-4", "32",
           "32", "fp32", "2", "2", "1", "1", "1", "true", "false", "false", "false", "none", "false", "100",
           work.data, "none", str(work.qwen2_tp2pp2), "5120", "512", str(out)]
    node = env.get("NODE_RANK", "0")
    rc, log = _run(cmd, work.root / f"{name}-node{node}.log",
                   env={"PY": PY, "EXTRA_ARGS": f"--metrics-file {metrics} --seed 1234", **env})
    assert rc == 0, log[-4000:]
    return (_read_metrics(metrics) if metrics.exists() else []), log


@pytest.fixture(scope="module")
def qwen2_launched(work):
    return launch_qwen2(work, "qwen_launch", {"NPROC": "4"})


def test_qwen2_launch_script_tp2_pp2_matches_tp1(work, qwen2_launched):
    ref, _ = train(work, "qwen_tp1", 1, ["--load-hf", str(work.qwen2), *TRAIN])
    launched, log = qwen2_launched
    out = work.root / "qwen_launch"
    assert "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2" in log
    assert f"--load {work.qwen2_tp2pp2}" in log  # the converted checkpoint, not the HF weights
    assert_decreasing(_losses(ref), "Qwen2 TP1")
    assert_decreasing(_losses(launched), "Qwen2 TP2xPP2 (launcher)")
    assert_same_losses(_losses(ref), _losses(launched), "Qwen2 TP1 vs TP2xPP2")
    assert list((out / "checkpoint").glob("*/iter_0000020"))  # saved at the end
    assert list((out / "tensorboard").glob("*/events.out.tfevents.*"))


def test_qwen2_launch_script_two_nodes(work, qwen2_launched):
    """Two launcher invocations as two 'nodes' of 2 ranks (NNODES/NODE_RANK/MASTER_ADDR/MASTER_PORT, as on
    a cluster with a shared filesystem) train exactly like the one-node run of 4 ranks."""
    from concurrent.futures import ThreadPoolExecutor

    env = {"NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_port()), "NPROC": "2"}
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda rank: launch_qwen2(work, "qwen_2nodes", {**env, "NODE_RANK": str(rank)}),
                             (0, 1)))
    for _, log in runs:
        assert "--nnodes 2" in log and "--master_addr 127.0.0.1" in log, log[-2000:]
    metrics = runs[1][0] or runs[0][0]  # written by the logging rank (the last one: node 1)
    assert len(metrics) == STEPS and _losses(metrics) == _losses(qwen2_launched[0])


def test_nan_stops_with_the_step_number(work):
    metrics, log = train(work, "nan", 1, ["--hf-config", str(work.qwen2), "--micro-batch-size", "2",
                                          "--global-batch-size", "2", "--seq-length", "32", "--train-iters", "5",
                                          "--lr", "1e30", "--clip-grad", "0"], expect_rc=3)
    assert "NaN/Inf in the loss at step 2" in log
    assert len(metrics) == 1


@pytest.mark.parametrize("position, value, message", [
    (12, "3", "CP=3"),  # SEQ_LEN 64 is not divisible by 2 x CP
    (18, "true", "SFT=true"),
    (17, "true", "FL=true"),
    (20, "0.5", "OPTIMIZER_OFFLOAD=0.5"),
    (9, "fp8", "PR=fp8"),
    (19, "offload", "AC=offload"),
    (25, "100", "TRAIN_TOKENS=100"),
])
def test_launch_script_refuses_unsupported_arguments(work, position, value, message):
    argv = ["local", "mini", "2", "8", "3e-3", "3e-4", "64", "64", "fp32", "1", "1", "1", "1", "2", "false",
            "false", "false", "false", "none", "false", "10", work.data, "none", str(work.ds3), "10240", "1024",
            str(work.root / "refused")]
    argv[position - 1] = value
    rc, log = _run(["bash", str(REPO / "examples/deepseek_v3/run_mcore_deepseek_v3.sh"), *argv],
                   work.root / "refused.log", env={"PY": PY})
    assert rc == 2 and message in log, log
    assert "torch.distributed.run" not in log


def test_launch_script_refuses_expert_parallel_for_dense(work):
    argv = ["local", "mini", "2", "8", "3e-3", "3e-4", "64", "64", "fp32", "1", "1", "1", "1", "2", "false",
            "false", "false", "false", "none", "false", "10", work.data, "none", str(work.qwen2), "10240", "1024",
            str(work.root / "refused")]
    rc, log = _run(["bash", str(REPO / "examples/qwen2/run_mcore_qwen2.sh"), *argv], work.root / "dense.log")
    assert rc == 2 and "EP=2" in log and "dense" in log


def test_preprocess_jsonl_round_trip(work, tmp_path):
    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    from megatron_patch.data.preprocess import preprocess

    docs = ["The first document.", "A second one, a little longer than the first.", ""]
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"content": d}) for d in docs) + "\n\n")
    stats = preprocess([str(src)], str(work.ds3), str(tmp_path / "out"), json_key="content", append_eod=True,
                       progress=False)
    assert stats["documents"] == 2 and stats["empty"] == 1
    tok = AutoTokenizer.from_pretrained(work.ds3)
    ds = IndexedDataset(str(tmp_path / "out"))
    for i, text in enumerate(docs[:2]):
        expected = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert numpy.array_equal(ds[i], numpy.array(expected))
    with pytest.raises(UserError, match="json-key"):
        preprocess([str(src)], str(work.ds3), str(tmp_path / "bad"), json_key="text", progress=False)


# Mixed precision against the fp32 TP1 run (same data and schedule, first PRECISION_STEPS steps). The bands
# hold rounding-level drift (measured max |diff| over 8 steps: bf16 ~0.05-0.09, fp16 ~0.01-0.04) and fail
# on a broken scaling (an un-unscaled fp16 gradient moves the loss by whole units).
PRECISION_STEPS = 8
PRECISION_BAND = {"bf16": 0.2, "fp16": 0.1}
# An overflow injected into the last step's gradients (an inf in one main_grad), like a too-large loss scale.
INJECT_OVERFLOW = f"""
import sys
import megatron_patch.training.step as step
from megatron_patch.training.pretrain import main
original, calls = step.forward_backward, []
def forward_backward(chunks, *args, **kwargs):
    loss = original(chunks, *args, **kwargs)
    calls.append(1)
    if len(calls) == {PRECISION_STEPS}:
        next(p for p in chunks[0].parameters() if p.requires_grad).main_grad.fill_(float("inf"))
    return loss
step.forward_backward = forward_backward
sys.exit(main(sys.argv[1:]))
"""


def test_bf16_and_fp16_track_fp32_and_an_fp16_overflow_is_skipped(work, ds3_runs):
    ref = _losses(ds3_runs[0])[:PRECISION_STEPS]
    common = ["--load-hf", str(work.ds3), *TRAIN, "--exit-interval", str(PRECISION_STEPS)]
    bf16, _ = train(work, "ds3_bf16", 1, [*common, "--bf16"])
    fp16_dir = work.root / "ds3_fp16"
    fp16_dir.mkdir(exist_ok=True)
    metrics = fp16_dir / "metrics.jsonl"
    rc, log = _run([PY, "-c", INJECT_OVERFLOW, *common, "--fp16", "--initial-loss-scale", "4096", "--hysteresis", "1",
                    "--data-path", work.data, "--data-cache-path", work.cache, "--metrics-file", str(metrics)],
                   fp16_dir / "log.txt")
    assert rc == 0, log[-3000:]
    fp16 = _read_metrics(metrics)
    for name, run in (("bf16", bf16), ("fp16", fp16)):
        losses = _losses(run)
        worst = max(abs(a - b) for a, b in zip(ref, losses))
        assert len(losses) == PRECISION_STEPS and worst <= PRECISION_BAND[name], (name, worst, losses, ref)
    # fp16: no overflow at scale 4096 until the injected one, which is skipped, counted and halves the scale
    assert [m["skipped"] for m in fp16] == [False] * (PRECISION_STEPS - 1) + [True]
    assert [m["loss_scale"] for m in fp16] == [4096.0] * (PRECISION_STEPS - 1) + [2048.0]
    assert fp16[-1]["skipped_total"] == 1 and "Loss scale: 2048 | update skipped | Skipped: 1" in log
