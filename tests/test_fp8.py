"""fp8_to_bf16 against an independent, block-by-block dequantisation of weights quantised here."""
import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from megatron_patch.convert.fp8 import fp8_to_bf16
from megatron_patch.checkpoint.hf_reader import HFCheckpoint
from megatron_patch.errors import UserError

B = 128
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


def quantise(w: torch.Tensor):
    """DeepSeek-V3 style: per 128x128 block, scale = amax / 448; fp8 = w / scale; scale_inv = scale."""
    rows, cols = w.shape
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    s = torch.empty(math.ceil(rows / B), math.ceil(cols / B), dtype=torch.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            block = w[i * B:(i + 1) * B, j * B:(j + 1) * B].float()
            scale = block.abs().max().clamp(min=1e-12) / FP8_MAX
            q[i * B:(i + 1) * B, j * B:(j + 1) * B] = (block / scale).to(torch.float8_e4m3fn)
            s[i, j] = scale
    return q, s


def reference_dequant(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=torch.bfloat16)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            block = q[i * B:(i + 1) * B, j * B:(j + 1) * B].float() * s[i, j].item()
            out[i * B:(i + 1) * B, j * B:(j + 1) * B] = block.to(torch.bfloat16)
    return out


def _bits(t):
    return t.view(torch.int16)


@pytest.fixture
def fp8_model(tmp_path):
    g = torch.Generator().manual_seed(1)
    src = tmp_path / "fp8"
    src.mkdir()
    weights = {
        "model.layers.0.mlp.down_proj.weight": torch.randn(256, 384, generator=g).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(300, 200, generator=g).to(torch.bfloat16),  # partial edge blocks
        "model.layers.0.mlp.experts.0.up_proj.weight": torch.randn(130, 129, generator=g).to(torch.bfloat16),
    }
    plain = {
        "model.layers.0.input_layernorm.weight": torch.randn(200, generator=g).to(torch.bfloat16),
        "model.embed_tokens.weight": torch.randn(50, 200, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.gate.e_score_correction_bias": torch.randn(8, generator=g).float(),
    }
    quantised = {name: quantise(w) for name, w in weights.items()}
    names = list(weights)
    # Two shards; the down_proj scale lives in the other shard than its weight.
    shard1 = {names[0]: quantised[names[0]][0], names[1]: quantised[names[1]][0], names[1] + "_scale_inv": quantised[names[1]][1]}
    shard1.update({k: plain[k] for k in list(plain)[:2]})
    shard2 = {names[0] + "_scale_inv": quantised[names[0]][1], names[2]: quantised[names[2]][0], names[2] + "_scale_inv": quantised[names[2]][1]}
    shard2.update({k: plain[k] for k in list(plain)[2:]})
    weight_map = {}
    for i, shard in enumerate((shard1, shard2)):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file(shard, str(src / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"model_type": "deepseek_v3", "hidden_size": 200, "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    (src / "config.json").write_text(json.dumps(config))
    (src / "tokenizer.json").write_text("{}")
    (src / "tokenizer_config.json").write_text("{}")
    return src, weights, quantised, plain


def test_fp8_to_bf16_is_bit_exact(fp8_model, tmp_path):
    src, weights, quantised, plain = fp8_model
    out = tmp_path / "bf16"
    summary = fp8_to_bf16(src, out, max_shard_bytes=100_000)
    assert summary["tensors"] == len(weights) + len(plain)
    assert summary["shards"] >= 2 and "GB/s" in summary["line"]

    with HFCheckpoint(out) as ckpt:
        assert sorted(ckpt.keys()) == sorted(list(weights) + list(plain))  # scale_inv dropped
        for name, (q, s) in quantised.items():
            got = ckpt.get(name)
            assert got.dtype == torch.bfloat16
            assert torch.equal(_bits(got), _bits(reference_dequant(q, s))), name
            assert (got.float() - weights[name].float()).abs().max() < 0.35  # sanity: close to the original
        for name, t in plain.items():
            got = ckpt.get(name)
            assert got.dtype == t.dtype and torch.equal(got, t)
        assert "quantization_config" not in ckpt.config and ckpt.config["model_type"] == "deepseek_v3"
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= set(os.listdir(out))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_fp8_to_bf16_refuses_existing_output(fp8_model, tmp_path):
    src, *_ = fp8_model
    (tmp_path / "bf16").mkdir()
    with pytest.raises(UserError, match="already exists"):
        fp8_to_bf16(src, tmp_path / "bf16")
    fp8_to_bf16(src, tmp_path / "bf16", force=True)
    assert (tmp_path / "bf16" / "config.json").is_file()


def test_fp8_missing_scale_leaves_nothing(fp8_model, tmp_path):
    src, *_ = fp8_model
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.0.mlp.down_proj.weight_scale_inv"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(UserError, match="down_proj.weight_scale_inv"):
        fp8_to_bf16(src, tmp_path / "bf16")
    assert sorted(os.listdir(tmp_path)) == ["fp8"]


def test_fp8_rejects_bf16_input(tmp_path):
    src = tmp_path / "m"
    src.mkdir()
    (src / "config.json").write_text("{}")
    save_file({"w": torch.ones(2, 2, dtype=torch.bfloat16)}, str(src / "model.safetensors"))
    with pytest.raises(UserError, match="no float8_e4m3fn weights"):
        fp8_to_bf16(src, tmp_path / "out")
