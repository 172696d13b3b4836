"""Bad input to `megatron-patch convert ...`: one line on stderr naming the problem, exit code 2, and no
output (not even a temporary directory) left behind. Plus the fp8-to-bf16 command and --verify failing."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_patch.checkpoint.hf_writer import ShardedSafetensorsWriter
from megatron_patch.cli import main
from megatron_patch.convert.mini import make_mini


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """qwen3_moe mini (8 heads, 4 groups, 8 experts, 4 layers) and broken copies of it."""
    root = tmp_path_factory.mktemp("bad")
    (root / "outputs").mkdir()
    good = make_mini("qwen3_moe", root / "good", seed=3)
    with safe_open(str(good / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}

    def copy(name, edit_config=None, sharded=False):
        dst = root / name
        shutil.copytree(good, dst)
        if sharded:
            (dst / "model.safetensors").unlink()
            writer = ShardedSafetensorsWriter(dst, max_shard_bytes=200_000)
            for k, v in tensors.items():
                writer.add(k, v)
            writer.close()
        if edit_config:
            config = json.loads((dst / "config.json").read_text())
            edit_config(config)
            (dst / "config.json").write_text(json.dumps(config))
        return dst

    out = {"good": good}
    out["no-config"] = copy("no-config")
    (out["no-config"] / "config.json").unlink()
    out["llama"] = copy("llama", lambda c: c.update(architectures=["LlamaForCausalLM"], model_type="llama"))
    out["missing-shard"] = copy("missing-shard", sharded=True)
    shards = sorted(out["missing-shard"].glob("model-*.safetensors"))
    assert len(shards) >= 3
    shards[1].unlink()
    out["truncated"] = copy("truncated", sharded=True)
    shard = sorted(out["truncated"].glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    out["bad-index"] = copy("bad-index", sharded=True)
    index = json.loads((out["bad-index"] / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-00099-of-00099.safetensors"
    (out["bad-index"] / "model.safetensors.index.json").write_text(json.dumps(index))
    out["shape"] = copy("shape", lambda c: c.update(moe_intermediate_size=48))
    out["ffn"] = copy("ffn", lambda c: c.update(intermediate_size=130))
    # DeepSeek-V3 whose MTP shared_head.head is not the lm_head it should copy
    out["mtp-copy"] = make_mini("deepseek_v3", root / "mtp-copy", seed=3)
    path = out["mtp-copy"] / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        ds3 = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    head = next(k for k in ds3 if k.endswith("shared_head.head.weight"))
    ds3[head][-1, 0] += 1.0
    save_file(ds3, str(path), metadata=metadata)
    return root, out


BAD_HF2MCORE = [
    ("missing-dir", [], "not found"),
    ("no-config", [], "no config.json"),
    ("llama", [], "unsupported architecture LlamaForCausalLM"),
    ("missing-shard", [], "names missing shard"),
    ("truncated", [], "is truncated"),
    ("bad-index", [], "names missing shard model-00099-of-00099.safetensors"),
    ("shape", [], "config.json implies"),
    ("good", ["--tp", "3"], "TP=3 does not divide num_attention_heads=8"),
    ("ffn", ["--tp", "4"], "TP=4 does not divide ffn_hidden_size=130"),
    ("good", ["--ep", "3"], "EP=3 does not divide num_experts=8"),
    ("good", ["--pp", "8"], "PP=8 x VPP=1 does not divide num_layers=4"),
    ("good", ["--dtype", "fp64"], "unknown dtype 'fp64'"),
    ("good", ["--format", "zarr"], "unknown --format 'zarr'"),
    ("good", ["--tp", "1", "--etp", "2", "--ep", "2"], "ETP must divide TP"),
    ("good", ["--vpp", "2"], "--vpp 2 needs pipeline parallelism"),
    ("mtp-copy", [], "shared_head.head.weight differs from lm_head.weight (rows 0..511)"),
]


def _run(capsys, argv) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp dirs


@pytest.mark.parametrize("case,flags,message", BAD_HF2MCORE, ids=[f"{c}{''.join(f)}" for c, f, _ in BAD_HF2MCORE])
def test_hf2mcore_bad_input(cases, capsys, case, flags, message):
    root, dirs = cases
    out = root / "outputs" / f"{case}{''.join(flags)}"
    src = dirs.get(case, root / "does-not-exist")
    code, err = _run(capsys, ["convert", "hf2mcore", "--hf-path", str(src), "--out", str(out), *flags])
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err
    _assert_nothing_written(out)


def test_existing_output_needs_force(cases, capsys):
    root, dirs = cases
    out = root / "outputs" / "existing"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    code, err = _run(capsys, ["convert", "hf2mcore", "--hf-path", str(dirs["good"]), "--out", str(out)])
    assert code == 2 and "already exists" in err and "--force" in err
    assert (out / "keep.txt").read_text() == "mine"
    # --force replaces only an earlier output of ours: not this directory, whatever it holds
    code, err = _run(capsys, ["convert", "hf2mcore", "--hf-path", str(dirs["good"]), "--out", str(out), "--force"])
    assert code == 2 and "was not written by megatron-patch" in err and (out / "keep.txt").read_text() == "mine"
    fresh = root / "outputs" / "fresh"
    assert main(["convert", "hf2mcore", "--hf-path", str(dirs["good"]), "--out", str(fresh)]) == 0
    (fresh / "latest_checkpointed_iteration.txt").write_text("garbage")
    assert main(["convert", "hf2mcore", "--hf-path", str(dirs["good"]), "--out", str(fresh), "--force"]) == 0
    assert (fresh / "latest_checkpointed_iteration.txt").read_text() == "release"


def test_mcore2hf_and_reshard_bad_input(cases, capsys):
    root, dirs = cases
    out = root / "outputs" / "m2h"
    code, err = _run(capsys, ["convert", "mcore2hf", "--mcore-path", str(root / "nope"), "--out", str(out)])
    assert code == 2 and "not found" in err and err.count("\n") == 1
    _assert_nothing_written(out)
    # a checkpoint without hf_config/ (as Megatron-LM training writes them) needs --hf-config
    ckpt = root / "outputs" / "ckpt"
    assert main(["convert", "hf2mcore", "--hf-path", str(dirs["good"]), "--out", str(ckpt), "--ep", "2"]) == 0
    shutil.rmtree(ckpt / "hf_config")
    (ckpt / "convert_meta.json").unlink()
    code, err = _run(capsys, ["convert", "mcore2hf", "--mcore-path", str(ckpt), "--out", str(out)])
    assert code == 2 and "--hf-config" in err
    _assert_nothing_written(out)
    code, err = _run(capsys, ["convert", "mcore2hf", "--mcore-path", str(ckpt), "--out", str(out),
                              "--hf-config", str(dirs["good"]), "--dtype", "int8"])
    assert code == 2 and "unknown dtype 'int8'" in err
    _assert_nothing_written(out)
    assert main(["convert", "mcore2hf", "--mcore-path", str(ckpt), "--out", str(out), "--hf-config",
                 str(dirs["good"])]) == 0
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    resharded = root / "outputs" / "resharded"
    code, err = _run(capsys, ["convert", "reshard", "--mcore-path", str(ckpt), "--out", str(resharded),
                              "--hf-config", str(dirs["good"]), "--tp", "3", "--pp", "1", "--ep", "1"])
    assert code == 2 and "TP=3 does not divide" in err
    _assert_nothing_written(resharded)


def test_exit_code_through_the_command_line(cases):
    root, _ = cases
    out = root / "outputs" / "subprocess"
    proc = subprocess.run([sys.executable, "-m", "megatron_patch.cli", "convert", "hf2mcore", "--hf-path",
                           str(root / "missing"), "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: HF checkpoint directory not found")
    _assert_nothing_written(out)


def test_verify_mismatch_exits_1_and_leaves_nothing(cases, capsys, monkeypatch):
    from megatron_patch.checkpoint import mcore_writer

    root, dirs = cases
    write = mcore_writer._RankFile.write

    def corrupt(self, chunk, name, tensor):
        if name == "decoder.final_layernorm.weight":
            tensor = tensor + 1
        write(self, chunk, name, tensor)

    monkeypatch.setattr(mcore_writer._RankFile, "write", corrupt)
    out = root / "outputs" / "corrupt"
    code, err = _run(capsys, ["convert", "hf2mcore", "--hf-path", str(dirs["good"]), "--out", str(out), "--verify"])
    assert code == 1 and "verify FAILED" in err and "model.norm.weight" in err
    _assert_nothing_written(out)


# --- fp8-to-bf16 --------------------------------------------------------------------------------------
def _quantise(w: torch.Tensor, block: int = 128):
    rows, cols = w.shape
    s = torch.empty(math.ceil(rows / block), math.ceil(cols / block))
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            part = w[i * block:(i + 1) * block, j * block:(j + 1) * block].float()
            s[i, j] = part.abs().max().clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (part / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


def test_fp8_to_bf16_cli(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    src = tmp_path / "fp8"
    src.mkdir()
    w = torch.randn(200, 300, generator=g).to(torch.bfloat16)
    q, s = _quantise(w)
    norm = torch.randn(300, generator=g).to(torch.bfloat16)
    save_file({"model.layers.0.mlp.down_proj.weight": q, "model.layers.0.mlp.down_proj.weight_scale_inv": s,
               "model.norm.weight": norm}, str(src / "model.safetensors"))
    config = {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"],
              "quantization_config": {"quant_method": "fp8"}}
    (src / "config.json").write_text(json.dumps(config))
    # hf2mcore refuses FP8 weights and points at this command
    code, err = _run(capsys, ["convert", "hf2mcore", "--hf-path", str(src), "--out", str(tmp_path / "m")])
    assert code == 2 and "fp8-to-bf16" in err
    assert main(["convert", "fp8-to-bf16", "--in", str(src), "--out", str(tmp_path / "bf16")]) == 0
    assert "fp8-to-bf16: wrote" in capsys.readouterr().out
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["model.layers.0.mlp.down_proj.weight", "model.norm.weight"]
        got = f.get_tensor("model.layers.0.mlp.down_proj.weight")
        expected = torch.empty(200, 300, dtype=torch.bfloat16)
        for i in range(s.shape[0]):
            for j in range(s.shape[1]):
                block = q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].float() * s[i, j]
                expected[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = block.to(torch.bfloat16)
        assert got.dtype == torch.bfloat16 and torch.equal(got, expected)
        assert torch.equal(f.get_tensor("model.norm.weight"), norm)
    assert "quantization_config" not in json.loads((tmp_path / "bf16" / "config.json").read_text())
    code, err = _run(capsys, ["convert", "fp8-to-bf16", "--in", str(tmp_path / "bf16"), "--out", str(tmp_path / "x")])
    assert code == 2 and "nothing to convert" in err
    _assert_nothing_written(tmp_path / "x")
