"""examples/deepseek_v32/run_mcore_deepseek_v32.sh: Pai's positional arguments with context parallelism wired
(CP; CP_COMM_TYPE only all_gather: DSA gathers K/V), SEQ_LEN `default` = 32768 (seed 004), MODEL_SIZE tiny
(make-mini --family deepseek_v32)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "examples" / "deepseek_v32" / "run_mcore_deepseek_v32.sh"


def launch(args: list[str], out: Path, **env) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PY=sys.executable, TORCHDYNAMO_DISABLE="1", **env,
                    PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(["bash", str(LAUNCHER), *args], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=300)


def positional(model_size, seq, cp, data, ckpt, out, train_tokens, etp_ep=("1", "1")) -> list[str]:
    # ENV MODEL_SIZE MBS GBS LR MIN_LR SEQ PAD PR TP PP CP ETP EP SP DO FL SFT AC OFFLOAD SAVE_INTERVAL DATA
    # VALID CKPT TRAIN_TOKENS WARMUP_TOKENS OUTPUT
    return ["local", model_size, "1", "2", "3e-3", "3e-4", seq, seq, "fp32", "1", "1", str(cp), *etp_ep, "false",
            "false", "false", "false", "none", "false", "100", data, "none", ckpt, str(train_tokens), "0", str(out)]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A dataset prefix the launcher accepts (a dry run only checks that its .bin/.idx exist)."""
    root = tmp_path_factory.mktemp("v32-launcher")
    for suffix in (".bin", ".idx"):
        (root / f"corpus{suffix}").write_bytes(b"")
    return root, str(root / "corpus")


def test_dry_run_tiny_at_the_default_32k_with_context_parallelism(work):
    root, data = work
    proc = launch(positional("tiny", "default", 4, data, "none", root / "dry", 32768 * 2 * 3), root / "dry",
                  DRY_RUN="1", GPUS_PER_NODE="8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    cmd = proc.stdout
    assert "--seq-length 32768" in cmd and "--context-parallel-size 4 --cp-comm-type all_gather" in cmd, cmd
    assert "--train-iters 3" in cmd and "--nproc_per_node 8" in cmd
    assert re.search(r"--hf-config \S*/hf_config/deepseek_v32-tiny ", cmd)
    assert (root / "dry" / "hf_config" / "deepseek_v32-tiny" / "config.json").is_file()


@pytest.mark.parametrize("env, message", [
    ({"CP_COMM_TYPE": "p2p"}, "error: CP_COMM_TYPE=p2p: DeepSeek-V3.2's DSA attention gathers K/V"),
    ({}, "error: CP=3: SEQ_LEN=32768 must be divisible by 2 x CP"),
])
def test_bad_context_parallel_arguments_are_one_line_errors(work, env, message):
    root, data = work
    cp = 3 if not env else 2
    proc = launch(positional("tiny", "default", cp, data, "none", root / "bad", 10 ** 6), root / "bad",
                  DRY_RUN="1", **env)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr
