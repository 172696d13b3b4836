"""Every command line of the user's guides (the seeds), as typed there with the paths replaced by tiny models:
exit status and the lines their users look for, and where a number is printed, an independent reference."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_patch.convert.mini import cut_config, layer_kinds, make_mini
from megatron_patch.errors import UserError
from megatron_patch.runtime.multirank import free_port

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def _env(tmp, **extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               TORCHDYNAMO_DISABLE="1", PYTHONWARNINGS="ignore", MP_DATA_CACHE=str(tmp))
    env.update(extra)
    return env


def run(cmd, tmp, timeout=240, **env):
    proc = subprocess.run(cmd, cwd=REPO, env=_env(tmp, **env), capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("seeds")


@pytest.fixture(scope="module")
def ds3(work):
    return make_mini("deepseek_v3", work / "ds3")


@pytest.fixture(scope="module")
def ds2(work):
    return make_mini("deepseek_v2", work / "ds2")


@pytest.fixture(scope="module")
def ds3_six(work):
    """More layers than the mini (first layer dense, MoE after) and an MTP module, to cut from."""
    return make_mini("deepseek_v3", work / "ds3_six", layers=6, overrides={"num_nextn_predict_layers": 1})


def hf_loss(model_dir, tokens):
    """transformers' own next-token loss (mean over the shifted positions) on these tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return float(model(tokens, labels=tokens).loss)


# --- seed 001 -------------------------------------------------------------------------------------------
def test_seed001_mla_moe_correctness(ds3, work):
    rc, out, err = run([PY, "examples/deepseek_v3/test_mla_moe_correctness.py", "--hf-model-path", str(ds3),
                        "--test-tp", "2", "--test-pp", "1", "--test-batch-size", "2", "--test-seq-length", "512",
                        "--debug"], work)
    assert rc == 0, out + err
    for section in ("--- Checking Multi-Latent Attention (MLA) ---", "--- Checking Mixture of Experts (MOE) ---",
                    "--- Checking Final Output ---"):
        assert section in out
    num = r"(\d\.\d{3}e[+-]\d\d)"
    for what in ("Layer 0 Attention Output", "Layer 1 MOE Output", "Layer 1 Router Output", "Final Output"):
        m = re.search(rf"^PASS: {what} - Max diff: {num}, Avg diff: {num}$", out, re.M)
        assert m, what
        assert float(m.group(2)) <= float(m.group(1)) <= 1e-4
    assert out.rstrip().endswith("============= Overall Result =============\nPASS")


def test_seed001_sections_show_a_failure():
    from megatron_patch.verify.report import format_seed_sections

    row = dict(max_abs=1e-7, mean_abs=1e-8, passed=True)
    report = {"result": "FAIL", "model": {"num_experts": 8}, "rows": [
        dict(row, component="attention", layer=0), dict(row, component="mlp", layer=0),
        dict(row, component="router", layer=1), dict(row, component="mlp", layer=1, passed=False, max_abs=0.5),
        dict(row, component="logits", layer=None, passed=False, max_abs=0.7)]}
    text = format_seed_sections(report)
    assert "PASS: Layer 0 Dense MLP Output - Max diff: 1.000e-07, Avg diff: 1.000e-08" in text
    assert "FAIL: Layer 1 MOE Output - Max diff: 5.000e-01" in text and "FAIL: Final Output" in text
    assert text.endswith("Overall Result =============\nFAIL")


# --- seed 000 -------------------------------------------------------------------------------------------
def test_seed000_test_deepseek_moe(ds2, work):
    rc, out, err = run([PY, "examples/deepseek_v2/test_deepseek_moe.py", "--model_path", str(ds2),
                        "--device", "cpu"], work)
    assert rc == 0, out + err
    for line in ("DeepSeek-V2 MoE TP Conversion Test", "[1/4] Loading tokenizer...", "[4/4] Testing TP conversion",
                 "CPU forward pass successful!", "CPU backward pass successful!", "All tests passed!"):
        assert line in out
    assert "8 experts top-2" in out and "shared experts" in out and "TP2x" in out
    # the loss of the TP2 forward is transformers' loss on the same tokens (preflight's seeded batch)
    tokens = torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(1234))
    loss = float(re.search(r"fp32, loss (\d+\.\d+), gradients finite", out).group(1))
    assert abs(loss - hf_loss(ds2, tokens)) <= 6e-5  # printed with 4 decimals


def test_preflight_fails_on_non_finite_weights(ds2, work, monkeypatch):
    from safetensors.torch import load_file, save_file

    from megatron_patch.training.preflight import PreflightSpec, run_preflight

    bad = work / "ds2_nan"
    if not bad.exists():
        import shutil

        shutil.copytree(ds2, bad)
        tensors = load_file(str(bad / "model.safetensors"))
        tensors["model.layers.1.mlp.shared_experts.down_proj.weight"][0, 0] = float("nan")
        save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    monkeypatch.setenv("MP_DEVICE", "cpu")  # preflight sets it for its ranks; restored after the test
    lines = []
    steps = run_preflight(PreflightSpec(hf_path=str(bad), device="cpu"), emit=lines.append)
    assert [s.name for s in steps if s.ok is False] == ["train step"]
    assert "gradients NOT finite" in lines[-2] and lines[-2].startswith("[FAIL]")


def test_seed000_train_deepseek_v2_lite(ds2, work):
    rc, out, err = run([PY, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
                        "examples/deepseek_v2/train_deepseek_v2_lite.py", "--model_path", str(ds2), "--tp_size", "2",
                        "--batch_size", "1", "--max_length", "256", "--epochs", "1", "--dtype", "float32"], work)
    assert rc == 0, out + err
    steps = re.findall(r"^Step (\d+)/(\d+) \| Loss: (\d+\.\d+) \| Aux: \S+ \| LR: \S+ \| .*Time: [\d.]+s", out, re.M)
    assert [int(s[0]) for s in steps] == list(range(1, 21)) and {s[1] for s in steps} == {"20"}
    assert all(0 < float(s[2]) < 10 for s in steps)
    assert "TP Size: 2" in out and "World Size: 2" in out
    assert out.rstrip().endswith("[Done] Training completed successfully!")


# --- seed 001's convert_mini_model: make-mini --from -------------------------------------------------------
def test_make_mini_from_cuts_layers(ds3_six, work):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from megatron_patch.models.builder import ParallelLayout
    from megatron_patch.verify.compare import CompareSpec
    from megatron_patch.verify.compare import run as compare

    out = work / "cut"
    rc, stdout, err = run([PY, "-m", "megatron_patch.cli", "make-mini", "--from", str(ds3_six), "--layers", "0,1,2,5",
                           "--out", str(out)], work)
    assert rc == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["first_k_dense_replace"], cfg["num_nextn_predict_layers"]) == (4, 1, 0)
    assert (out / "tokenizer.json").is_file()
    kept = {0: 0, 1: 1, 2: 2, 5: 3}
    with safe_open(str(ds3_six / "model.safetensors"), "pt") as src, safe_open(str(out / "model.safetensors"), "pt") as dst:
        expected = {}
        for name in src.keys():
            m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
            if not m:
                expected[name] = name
            elif int(m.group(1)) in kept:
                expected[f"model.layers.{kept[int(m.group(1))]}.{m.group(2)}"] = name
        assert sorted(dst.keys()) == sorted(expected)
        for new, old in expected.items():
            assert torch.equal(dst.get_tensor(new), src.get_tensor(old)), new
    # transformers loads it, and it computes what the source model computes with those layers alone
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = AutoModelForCausalLM.from_pretrained(str(ds3_six), dtype=torch.float32).eval()
    ref.model.layers = torch.nn.ModuleList([ref.model.layers[i] for i in kept])
    ref.config.num_hidden_layers = len(kept)
    cut = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = ref(tokens, use_cache=False).logits, cut(tokens, use_cache=False).logits
    assert torch.equal(a, b)
    report = compare(CompareSpec(hf_path=str(out), layout=ParallelLayout(tp=1)))
    assert report["result"] == "PASS" and report["model"]["num_layers"] == 4
    assert {r["layer"] for r in report["rows"] if r["component"] == "router"} == {1, 2, 3}


def test_make_mini_from_keeps_mtp_and_refuses_bad_layers(ds3_six, work):
    from safetensors import safe_open

    from megatron_patch.convert.mini import cut_checkpoint

    out = work / "cut_mtp"
    cut_checkpoint(ds3_six, out, [0, 4], keep_mtp=True)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["num_nextn_predict_layers"]) == (2, 1)
    with safe_open(str(ds3_six / "model.safetensors"), "pt") as src, safe_open(str(out / "model.safetensors"), "pt") as dst:
        mtp = [k for k in src.keys() if k.startswith("model.layers.6.")]
        assert mtp and all(torch.equal(dst.get_tensor(k.replace("layers.6.", "layers.2.")), src.get_tensor(k)) for k in mtp)
    rc, _, err = run([PY, "-m", "megatron_patch.cli", "make-mini", "--from", str(ds3_six), "--layers", "0,6",
                      "--out", str(work / "cut_bad")], work)
    assert rc == 2 and err.startswith("error: --layers [6]") and not (work / "cut_bad").exists()


def test_make_mini_from_copies_fp8_tensors_as_they_are(work):
    from safetensors.torch import load_file, save_file

    from megatron_patch.convert.mini import cut_checkpoint

    src = work / "fp8_two_layers"
    src.mkdir()
    g = torch.Generator().manual_seed(5)
    tensors = {f"model.layers.{i}.mlp.down_proj.{k}": v for i in range(2) for k, v in (
        ("weight", torch.randn(128, 128, generator=g).to(torch.float8_e4m3fn)), ("weight_scale_inv", torch.rand(1, 1)))}
    tensors["model.embed_tokens.weight"] = torch.randn(8, 128, generator=g).to(torch.bfloat16)
    for i, part in enumerate(({k: v for k, v in tensors.items() if ".0." in k}, {k: v for k, v in tensors.items() if ".0." not in k})):
        save_file(part, str(src / f"model-0000{i + 1}-of-00002.safetensors"), metadata={"format": "pt"})
    index = {"weight_map": {k: f"model-0000{1 + ('.0.' not in k)}-of-00002.safetensors" for k in tensors}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    (src / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "num_hidden_layers": 2,
                                                 "n_routed_experts": 4, "first_k_dense_replace": 1}))
    cut_checkpoint(src, work / "fp8_cut", [1])
    got = load_file(str(work / "fp8_cut" / "model.safetensors"))
    assert sorted(got) == ["model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight",
                           "model.layers.0.mlp.down_proj.weight_scale_inv"]
    w = got["model.layers.0.mlp.down_proj.weight"]
    assert w.dtype == torch.float8_e4m3fn and torch.equal(w.view(torch.uint8),
                                                          tensors["model.layers.1.mlp.down_proj.weight"].view(torch.uint8))
    assert json.loads((work / "fp8_cut" / "config.json").read_text())["first_k_dense_replace"] == 0


def test_cut_config_keeps_each_layer_kind():
    """The kind of every kept layer as the family table maps it (megatron's moe_layer_freq) before and after."""
    from megatron_patch.convert.mini import build_hf_config, config_dict
    from megatron_patch.models.families import get_family

    fam = get_family("qwen3_moe")
    hf = build_hf_config("qwen3_moe", config_dict("qwen3_moe", layers=6, overrides={
        "decoder_sparse_step": 2, "mlp_only_layers": [3]}))
    before = fam.to_mcore_config(hf).moe_layer_freq
    assert before == layer_kinds(hf.to_dict()) == [0, 1, 0, 0, 0, 1]
    new = cut_config(hf.to_dict(), [1, 2, 5], keep_mtp=False)
    assert fam.to_mcore_config(type(hf).from_dict(new)).moe_layer_freq == [1, 0, 1]
    assert (new["decoder_sparse_step"], new["mlp_only_layers"]) == (1, [1])
    assert cut_config({**hf.to_dict(), "layer_types": ["full_attention"] * 6}, [0, 5], False)["layer_types"] == [
        "full_attention"] * 2
    v3 = {"num_hidden_layers": 61, "n_routed_experts": 256, "first_k_dense_replace": 3, "num_nextn_predict_layers": 1}
    new = cut_config(v3, [0, 1, 2, 60], keep_mtp=False)
    assert (new["num_hidden_layers"], new["first_k_dense_replace"], new["num_nextn_predict_layers"]) == (4, 3, 0)
    with pytest.raises(UserError, match="0..60"):
        cut_config(v3, [61], keep_mtp=False)


# --- seed 004 -------------------------------------------------------------------------------------------
def test_seed004_weight_convert(work):
    from safetensors.torch import load_file, save_file

    from megatron_patch.convert.fp8 import fp8_to_bf16

    src = work / "fp8"
    src.mkdir()
    g = torch.Generator().manual_seed(3)
    save_file({"model.layers.0.mlp.down_proj.weight": torch.randn(128, 256, generator=g).to(torch.float8_e4m3fn),
               "model.layers.0.mlp.down_proj.weight_scale_inv": torch.rand(1, 2, generator=g),
               "model.embed_tokens.weight": torch.randn(16, 256, generator=g).to(torch.bfloat16)},
              str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "quantization_config": {
        "quant_method": "fp8", "weight_block_size": [128, 128]}}))
    rc, out, err = run(["bash", "toolkits/checkpoint/weight_convert.sh", "--input_fp8_hf_path", str(src),
                        "--output_hf_path", str(work / "bf16"), "--quant_mode", "bfloat16"], work, PYTHON=PY)
    assert rc == 0, err
    fp8_to_bf16(src, work / "bf16_ref")  # the command it stands for (tested bit-exact in test_fp8.py)
    got = load_file(str(next((work / "bf16").glob("*.safetensors"))))
    ref = load_file(str(next((work / "bf16_ref").glob("*.safetensors"))))
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    rc, _, err = run(["bash", "toolkits/checkpoint/weight_convert.sh", "--input_fp8_hf_path", str(src),
                      "--output_hf_path", str(work / "int8"), "--quant_mode", "int8"], work, PYTHON=PY)
    assert rc == 2 and "only bfloat16" in err and not (work / "int8").exists()


def test_seed004_parquet2json(work):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    src = work / "enwiki"
    (src / "part").mkdir(parents=True)
    tables = [pa.table({"id": [1, 2], "text": ["first line", "第二行"]}), pa.table({"id": [3], "text": ["third"]})]
    pq.write_table(tables[0], str(src / "a.parquet"))
    pq.write_table(tables[1], str(src / "part" / "b.parquet"))
    rc, out, err = run([PY, "toolkits/data/parquet2json.py", str(src), str(src / "data.json")], work)
    assert rc == 0, err
    rows = [json.loads(line) for line in (src / "data.json").read_text(encoding="utf-8").splitlines()]
    assert rows == tables[0].to_pylist() + tables[1].to_pylist()
    assert "3 rows from 2 parquet file(s)" in out


def test_parquet2json_without_pyarrow_names_the_package(work):
    blocker = work / "no_pyarrow" / "pyarrow"
    blocker.mkdir(parents=True, exist_ok=True)
    (blocker / "__init__.py").write_text("raise ImportError('blocked for this test')\n")
    (work / "pq_in").mkdir(exist_ok=True)
    (work / "pq_in" / "x.parquet").write_bytes(b"PAR1")
    env_path = os.pathsep.join([str(work / "no_pyarrow"), str(REPO)])
    rc, _, err = run([PY, "toolkits/data/parquet2json.py", str(work / "pq_in"), str(work / "out.json")], work,
                     PYTHONPATH=env_path)
    assert rc == 2 and "pip install 'megatron-patch[data]'" in err and not (work / "out.json").exists()


# --- seed 003 -------------------------------------------------------------------------------------------
def test_seed003_check_npu_setup(work):
    from megatron_patch.runtime.env_check import launch_problems
    from megatron_patch.runtime.multirank import free_port

    rc, out, err = run([PY, "toolkits/env/check_npu_setup.py", "--device", "cpu"], work, WORLD_SIZE="4",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    assert rc == 0, out + err
    assert "Distributed world size: 4" in out and "ready to launch" in out
    info = {"device": "cpu", "backend": "gloo", "device_count": 1, "backends_available": {"gloo": True},
            "optional": {"torch_npu": False}, "launcher": {"WORLD_SIZE": "4", "MASTER_PORT": "29500"},
            "master_port_free": False}
    problems = launch_problems(info, "npu")
    assert problems[0].startswith("no npu device") and "MASTER_PORT=29500 is in use" in problems[1]
    npu = dict(info, device="npu", backend="hccl", backends_available={"hccl": True}, master_port_free=True)
    assert launch_problems(npu, "npu") == ["WORLD_SIZE=4 is more than 1 npu device(s) x 1 node(s)"]


def _corpus_prefix(ds2, work):
    from megatron_patch.data.preprocess import indexed_from_text

    return indexed_from_text(str(REPO / "examples" / "data" / "corpus.txt"), str(ds2), cache_dir=str(work))


def test_seed003_presets(ds2, work):
    prefix = _corpus_prefix(ds2, work)
    args = ["local", "mini", "1", "8", "1e-4", "1e-5", "256", "256", "fp32", "2", "1", "1", "1", "1", "true", "false",
            "false", "false", "none", "false", "10", prefix, "none", str(ds2), "10240", "0", str(work / "pai")]
    rc, out, err = run(["bash", "examples/deepseek_v2/run_mcore_deepseek_v2.sh", *args], work, PRESET="conservative",
                       DRY_RUN="1", PY=PY, GPUS_PER_NODE="2")
    assert rc == 0, err
    assert "--micro-batch-size 2 --global-batch-size 128 --seq-length 256 --lr 7e-05 --min-lr 7e-06" in out
    assert "--train-iters 500" in out
    rc, out, err = run(["bash", "examples/deepseek_v2/run_mcore_deepseek_v2.sh", *args], work, PRESET="standard",
                       DRY_RUN="1", PY=PY, GPUS_PER_NODE="2")
    assert rc == 0 and "--micro-batch-size 4 --global-batch-size 256 --seq-length 256 --lr 1e-4 --min-lr 1e-5" in out
    assert "--train-iters 1000" in out
    rc, _, err = run(["bash", "examples/deepseek_v2/run_mcore_deepseek_v2.sh", *args], work, PRESET="fast",
                     DRY_RUN="1", PY=PY, GPUS_PER_NODE="2")
    assert rc == 2 and "PRESET=fast" in err


# --- seed 002 -------------------------------------------------------------------------------------------
def test_seed002_curriculum_flags(ds2, work):
    from megatron_patch.training.arguments import build_parser, validate

    base = ["--hf-config", str(ds2), "--train-iters", "2", "--seq-length", "32", "--data-path", _corpus_prefix(ds2, work)]
    args = build_parser().parse_args(base + ["--use_curriculum", "False", "--curriculum_seed", "42"])
    validate(args)
    assert args.curriculum_seed == 42
    # seed 002's spelling turns on --curriculum, which trains on SFT data (tests/test_sft_lora.py runs it)
    with pytest.raises(UserError, match=r"--curriculum \(--use_curriculum True\) needs --sft"):
        validate(build_parser().parse_args(base + ["--use_curriculum", "True", "--curriculum_seed", "42"]))
