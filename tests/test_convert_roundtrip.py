"""Checkpoint conversion HF <-> Megatron is bit-exact at any layout, in both formats.

Property tests (hypothesis) over the four families and random valid layouts: HF -> mcore (torch) -> HF
and mcore -> reshard -> HF give back every tensor with the same dtype and the same bits. torch_dist is
written by one streaming process (each HF tensor read once, one parameter held at a time) and loaded by
megatron-core dist_checkpointing at other layouts; megatron-core models built at several layouts load
the torch-format rank files with strict=True (keys including _extra_state, shapes, file naming).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import uuid
import weakref
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from megatron_patch.checkpoint import mcore_layout
from megatron_patch.checkpoint.mcore_reader import open_mcore
from megatron_patch.convert.hf2mcore import hf2mcore
from megatron_patch.convert.mcore2hf import mcore2hf
from megatron_patch.convert.mini import make_mini
from megatron_patch.convert.reshard import reshard
from megatron_patch.models.builder import ParallelLayout
from megatron_patch.runtime.multirank import run_ranks

FAMILIES = ("deepseek_v2", "deepseek_v3", "qwen2", "qwen3_moe")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def minis(work):
    return {f: make_mini(f, work / "minis" / f, seed=1) for f in FAMILIES}


def read_all(path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_identical(expected: dict, got_dir, cast: dict | None = None) -> None:
    got = read_all(got_dir)
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        want = (cast or {}).get(name, want)
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
        assert torch.equal(bits(got[name]), bits(want)), name


@st.composite
def layouts(draw, family: str):
    """Valid layouts for the minis (4 layers; 4 or 8 heads, 4 query groups; 8 experts)."""
    tp = draw(st.sampled_from([1, 2, 4]))
    pp = draw(st.sampled_from([1, 2, 4]))
    vpp = draw(st.sampled_from([None, 2])) if pp == 2 else None
    ep = draw(st.sampled_from([1, 2, 4, 8])) if family != "qwen2" else 1
    etp = draw(st.sampled_from([e for e in (1, 2) if tp % e == 0]))  # torch format: ETP divides TP
    return ParallelLayout(tp=tp, pp=pp, ep=ep, etp=etp, vpp=vpp)


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_hf_mcore_hf_and_reshard_are_bit_exact(minis, work, data):
    family = data.draw(st.sampled_from(FAMILIES), label="family")
    first = data.draw(layouts(family), label="layout")
    second = data.draw(layouts(family), label="reshard to")
    case = work / f"case-{uuid.uuid4().hex[:8]}"
    try:
        src = read_all(minis[family])
        hf2mcore(minis[family], case / "mcore", first)
        _, sizes = mcore_layout.read_layout(case / "mcore")  # every (tp, pp, ep) file, named as Megatron-LM
        assert sizes == {"tp": first.tp, "pp": first.pp, "ep": first.ep, "etp": first.expert_tp,
                         "vpp": first.vpp or 1}
        mcore2hf(case / "mcore", case / "hf")
        assert_identical(src, case / "hf")
        reshard(case / "mcore", case / "resharded", second)
        mcore2hf(case / "resharded", case / "hf2")
        assert_identical(src, case / "hf2")
    finally:
        shutil.rmtree(case, ignore_errors=True)


def test_torch_format_is_what_megatron_lm_reads(minis, work):
    out = work / "megatron-lm"
    hf2mcore(minis["deepseek_v2"], out, ParallelLayout(tp=2, pp=2, ep=2, etp=1))
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert sorted(p.name for p in (out / "release").iterdir()) == [
        f"mp_rank_{t:02d}_{p:03d}_{e:03d}" for t in range(2) for p in range(2) for e in range(2)]
    ckpt = torch.load(out / "release/mp_rank_01_001_001/model_optim_rng.pt", weights_only=False)
    assert ckpt["checkpoint_version"] == 3.0 and ckpt["iteration"] == 0
    args = ckpt["args"]
    # check_checkpoint_args reads these with getattr(args, name) (no default)
    for name in ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings",
                 "make_vocab_size_divisible_by", "padded_vocab_size", "tokenizer_type", "tensor_model_parallel_size",
                 "pipeline_model_parallel_size"):
        assert hasattr(args, name), name
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size,
            args.expert_tensor_parallel_size) == (2, 2, 2, 1)
    assert args.padded_vocab_size == 512 and args.num_layers == 4 and args.add_position_embedding is False
    sd = ckpt["model"]
    assert "decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight" in sd  # stage-local, EP-local
    assert sd["decoder.layers.1.mlp.experts.local_experts.3.linear_fc2._extra_state"] is None
    meta = json.loads((out / "convert_meta.json").read_text())
    assert meta["family"] == "deepseek_v2" and meta["layout"]["etp"] == 1
    assert (out / "hf_config" / "config.json").is_file() and (out / "hf_config" / "tokenizer.json").is_file()


def test_dtype_cast_and_verify(minis, work):
    src = read_all(minis["deepseek_v3"])
    result = hf2mcore(minis["deepseek_v3"], work / "bf16", ParallelLayout(tp=2, ep=4, etp=1), dtype="bf16",
                      verify=True)
    assert result["verify"].startswith("verify OK") and "cast to bf16" in result["verify"]
    mcore2hf(work / "bf16", work / "bf16-hf")
    # megatron keeps the router's expert bias in fp32 whatever params_dtype is
    cast = {k: v if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16) for k, v in src.items()}
    assert_identical(src, work / "bf16-hf", cast)
    config = json.loads((work / "bf16-hf" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_torch_dist_round_trip(minis, work):
    """Save through megatron-core dist_checkpointing at TP2xEP2xETP1 (2 ranks), verify, export, reshard."""
    src = read_all(minis["deepseek_v3"])
    result = hf2mcore(minis["deepseek_v3"], work / "dist", ParallelLayout(tp=2, ep=2, etp=1), fmt="torch_dist",
                      verify=True)
    assert result["verify"].startswith("verify OK")
    assert (work / "dist" / "release" / "metadata.json").is_file()
    mcore2hf(work / "dist", work / "dist-hf")
    assert_identical(src, work / "dist-hf")
    reshard(work / "dist", work / "dist-torch", ParallelLayout(tp=1, pp=2, ep=4, etp=1), fmt="torch")
    mcore2hf(work / "dist-torch", work / "dist-torch-hf")
    assert_identical(src, work / "dist-torch-hf")


def _strict_load(rank, world, cases):
    """Build each case's model at its layout and load this rank's torch-format file with strict=True."""
    from transformers import AutoConfig

    from megatron_patch.checkpoint.engine import current_position
    from megatron_patch.models.builder import build_family_model, initialize_parallel

    loaded = 0
    for hf_dir, root, layout in cases:
        initialize_parallel(layout)
        chunks, _, _ = build_family_model(AutoConfig.from_pretrained(hf_dir), layout)
        pos = current_position()
        state = mcore_layout.read_rank(root, pos.tp, pos.pp, pos.ep)
        assert len(state) == len(chunks)
        for chunk, sd in zip(chunks, state):
            chunk.load_state_dict(sd, strict=True)  # what Megatron-LM's load_checkpoint does
            loaded += len(sd)
    return loaded


def test_megatron_core_loads_the_rank_files_strictly(minis, work):
    tied = make_mini("qwen2", work / "qwen2-tied", seed=2, overrides={"tie_word_embeddings": True})
    cases = []
    for name, hf_dir, layout in [
        ("v3", minis["deepseek_v3"], ParallelLayout(tp=2, ep=2, etp=1)),    # MTP, ETP != TP
        ("v2", minis["deepseek_v2"], ParallelLayout(pp=2, vpp=2)),          # VPP chunks
        ("q3", minis["qwen3_moe"], ParallelLayout(ep=2)),
        ("tied", tied, ParallelLayout(tp=2)),                                # output_layer without weight
    ]:
        hf2mcore(hf_dir, work / f"strict-{name}", layout, transformer_impl="local")  # our own (local) spec
        cases.append((str(hf_dir), str(work / f"strict-{name}"), layout))
    counts = run_ranks(_strict_load, 2, timeout=240, args=(cases,))
    assert all(c > 0 for c in counts)


def test_cli_and_toolkit_scripts(minis, work, capsys):
    from megatron_patch.cli import main

    assert main(["convert", "hf2mcore", "--hf-path", str(minis["qwen2"]), "--out", str(work / "cli"), "--tp", "2",
                 "--pp", "2", "--verify", "--model-size", "1M"]) == 0
    out = capsys.readouterr().out
    assert "hf2mcore: wrote" in out and "GB/s" in out and "peak RSS" in out and "verify OK" in out
    env = dict(os.environ, PYTHON=sys.executable)
    script = REPO / "toolkits" / "checkpoint" / "hf2mcore.sh"
    # Pai-Megatron-Patch order: MODEL_SIZE SRC DST TP PP ETP EP PR MG2HF HF_CKPT_PATH
    subprocess.run(["bash", str(script), "mini", str(work / "cli"), str(work / "sh-hf"), "1", "1", "1", "1", "fp32",
                    "true", str(minis["qwen2"])], check=True, env=env, capture_output=True)
    assert_identical(read_all(minis["qwen2"]), work / "sh-hf")
    assert (work / "sh-hf" / "tokenizer.json").is_file()


# --- torch_dist: one streaming writer, loadable at any layout ----------------------------------------
def _dist_load(rank, world, hf_dir, ckpt_dir, padded, layouts):
    """At each layout: build this rank's model, load the torch_dist checkpoint with dist_checkpointing
    (megatron reshards it) and compare every parameter with the rank's shard cut from the HF files."""
    from megatron.core import dist_checkpointing

    from megatron_patch.checkpoint.engine import ShardPlan, current_position
    from megatron_patch.checkpoint.tensors import dtype_overrides
    from megatron_patch.convert.hf2mcore import HFSource
    from megatron_patch.models.builder import build_family_model, initialize_parallel

    source = HFSource(hf_dir)
    checked = 0
    for layout in layouts:
        initialize_parallel(layout)
        chunks, config, args = build_family_model(source.hf_config, layout, vocab_size=padded,
                                                  **dtype_overrides(torch.float32))
        plan = ShardPlan(source.family, source.hf_config, layout, config, args)
        plan.ctx = dataclasses.replace(plan.ctx, padded_vocab_size=padded)  # the checkpoint's padding
        state = {f"model{i}" if len(chunks) > 1 else "model": c.sharded_state_dict() for i, c in enumerate(chunks)}
        loaded = dist_checkpointing.load(state, ckpt_dir)
        expected = plan.rank_state_dicts(source.read, current_position())
        for i, (chunk, want) in enumerate(zip(chunks, expected)):
            got = loaded[f"model{i}" if len(chunks) > 1 else "model"]
            chunk.load_state_dict(got, strict=True)
            for name, tensor in chunk.state_dict().items():
                if torch.is_tensor(tensor) and not name.endswith("_extra_state"):
                    assert torch.equal(bits(tensor), bits(want[name].to(tensor.dtype))), (layout, name)
                    checked += 1
    return checked


def test_torch_dist_loads_at_other_layouts(minis, work):
    """Written once (one process), loaded by megatron-core at layouts it was not written for."""
    out = work / "dist-any"
    hf2mcore(minis["deepseek_v2"], out, ParallelLayout(tp=2, ep=4, etp=1), fmt="torch_dist", transformer_impl="local")
    assert sorted(p.name for p in (out / "release").iterdir()) == [
        ".metadata", "__0_0.distcp", "common.pt", "metadata.json"]
    layouts = [ParallelLayout(tp=2, ep=2, etp=1), ParallelLayout(pp=2), ParallelLayout(tp=2, etp=2)]
    padded = open_mcore(out).padded_vocab()
    counts = run_ranks(_dist_load, 2, timeout=300,
                       args=(str(minis["deepseek_v2"]), str(out / "release"), padded, layouts))
    assert all(c > 0 for c in counts)


def test_torch_dist_pp2_with_mtp_round_trip(minis, work):
    """PP>1 with MTP layers: nothing is built per stage, so nothing to refuse."""
    src = read_all(minis["deepseek_v3"])
    out = work / "dist-pp2-mtp"
    hf2mcore(minis["deepseek_v3"], out, ParallelLayout(pp=2, ep=2, etp=1), fmt="torch_dist")
    args = torch.load(out / "release" / "common.pt", weights_only=False)["args"]
    assert (args.pipeline_model_parallel_size, args.expert_model_parallel_size, args.mtp_num_layers) == (2, 2, 1)
    mcore2hf(out, work / "dist-pp2-mtp-hf")
    assert_identical(src, work / "dist-pp2-mtp-hf")


def test_reshard_torch_to_torch_dist(minis, work):
    """The same writer reads a torch-format checkpoint (rows merged from its rank files)."""
    src = read_all(minis["qwen2"])
    hf2mcore(minis["qwen2"], work / "rs-torch", ParallelLayout(tp=2, pp=2))
    reshard(work / "rs-torch", work / "rs-dist", ParallelLayout(tp=4), fmt="torch_dist")
    mcore2hf(work / "rs-dist", work / "rs-dist-hf")
    assert_identical(src, work / "rs-dist-hf")


def test_torch_dist_streams_one_tensor_at_a_time(minis, work, monkeypatch):
    """Every HF tensor is read once, at most one parameter is held at a time, the summary counts every
    parameter once, and a failure part-way leaves no output and no process group behind."""
    from megatron_patch.checkpoint import dist_writer
    from megatron_patch.checkpoint.mcore_writer import dist_total_bytes
    from megatron_patch.convert.hf2mcore import HFSource

    reads: dict[str, int] = {}
    held: list[int] = []
    real_read, real_param = HFSource.read, dist_writer.TensorMaker.param

    def read(self, name):
        reads[name] = reads.get(name, 0) + 1
        return real_read(self, name)

    def param(self, name, like):
        held.append(len(self.cache) + (name not in self.cache))
        return real_param(self, name, like)

    monkeypatch.setattr(HFSource, "read", read)
    monkeypatch.setattr(dist_writer.TensorMaker, "param", param)
    result = hf2mcore(minis["qwen3_moe"], work / "dist-stream", ParallelLayout(ep=2), fmt="torch_dist")
    assert reads == {name: 1 for name in read_all(minis["qwen3_moe"])}
    assert max(held) == 1
    source = HFSource(minis["qwen3_moe"])
    assert result["bytes"] == dist_total_bytes(source, dist_writer.tp1_plan(source, 1), torch.float32)
    assert result["tensors"] == len(dist_writer.tp1_plan(source, 1).rows)  # q/k/v, gate/up: one each

    def boom(self, key, offset):
        raise RuntimeError("disk full")

    monkeypatch.setattr(dist_writer.TensorMaker, "make", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        hf2mcore(minis["qwen3_moe"], work / "dist-fail", ParallelLayout(), fmt="torch_dist")
    assert not [p for p in work.iterdir() if p.name.startswith((".dist-fail", "dist-fail"))]
    assert not torch.distributed.is_initialized()


# --- torch_dist read back in groups (dist_reader): bit-exact, bounded memory ------------------------
SMALL_GROUP = 48 * 1024  # bytes: groups split layers and an expert set (the minis are ~1-2 MB)
DIST_LAYOUTS = {"deepseek_v2": ParallelLayout(tp=2, ep=2, etp=1), "deepseek_v3": ParallelLayout(ep=4),
                "qwen2": ParallelLayout(tp=2), "qwen3_moe": ParallelLayout(tp=2, ep=2, etp=2)}


@pytest.fixture(scope="module")
def dist_minis(work):
    """family -> (HF mini with seed 3, its torch_dist checkpoint written at a layout with TP/EP/ETP)."""
    out = {}
    for family, layout in DIST_LAYOUTS.items():
        hf = make_mini(family, work / "seed3" / family, seed=3)
        hf2mcore(hf, work / "seed3" / f"{family}-dist", layout, fmt="torch_dist")
        out[family] = (hf, work / "seed3" / f"{family}-dist")
    return out


@pytest.fixture
def reader_log(monkeypatch):
    """A small group budget; records every DistSource and, per group load, the bytes of reader-made
    tensors alive at once (weak references: what the caller still holds counts too)."""
    from megatron_patch.checkpoint import dist_reader

    log = {"sources": [], "live": []}
    made: list = []
    real_init, real_load = dist_reader.DistSource.__init__, dist_reader.load_entries

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        log["sources"].append(self)

    def load(entries, reader):
        out = real_load(entries, reader)
        alive = [t for t in (ref() for ref in made) if t is not None]
        log["live"].append(sum(t.numel() * t.element_size() for t in alive + list(out.values())))
        made.extend(weakref.ref(t) for t in out.values())
        return out

    monkeypatch.setattr(dist_reader, "GROUP_BYTES", SMALL_GROUP)
    monkeypatch.setattr(dist_reader.DistSource, "__init__", init)
    monkeypatch.setattr(dist_reader, "load_entries", load)
    return log


@pytest.mark.parametrize("family", FAMILIES)
def test_mcore2hf_from_torch_dist_in_groups_is_bit_exact(dist_minis, work, reader_log, family):
    """Read back a group of parameters at a time (layers and expert sets split), in table order: every
    group is loaded once and the HF tensors come back with the same bits."""
    hf, dist = dist_minis[family]
    mcore2hf(dist, work / "seed3" / f"{family}-back", max_shard_bytes=64 * 1024)
    assert_identical(read_all(hf), work / "seed3" / f"{family}-back")
    (source,) = reader_log["sources"]
    assert len(source.groups) > 8 and source.loads == len(source.groups)


def test_torch_dist_reader_holds_about_one_group(dist_minis, work, reader_log):
    """The parameters alive at once stay about one group (a larger parameter alone, plus the last row
    the writer still holds), a small part of a model with several layers, whatever its size."""
    hf, dist = dist_minis["deepseek_v3"]
    mcore2hf(dist, work / "seed3" / "v3-bounded", max_shard_bytes=1)  # no output buffering
    (source,) = reader_log["sources"]
    sizes = [t.numel() * t.element_size() for t in (e.data for e in source.entries.values())]
    assert max(reader_log["live"]) <= SMALL_GROUP + max(sizes)
    assert max(reader_log["live"]) < sum(sizes) / 4


def test_reshard_from_torch_dist_round_trips(dist_minis, work, reader_log):
    """torch_dist -> torch at PP2xVPP2 (stage by stage) and -> torch_dist at TP4 (the writer's key order),
    read in groups in the order each writer asks for them, give back the same HF bits."""
    hf, dist = dist_minis["qwen3_moe"]
    src, case = read_all(hf), work / "seed3" / "rs"
    reshard(dist, case / "torch", ParallelLayout(tp=2, pp=2, vpp=2, ep=4, etp=1), fmt="torch")
    assert mcore_layout.read_layout(case / "torch")[1] == {"tp": 2, "pp": 2, "ep": 4, "etp": 1, "vpp": 2}
    reshard(dist, case / "dist", ParallelLayout(tp=4), fmt="torch_dist")
    for out in ("torch", "dist"):
        mcore2hf(case / out, case / f"{out}-hf")
        assert_identical(src, case / f"{out}-hf")
    to_torch, to_dist = reader_log["sources"][:2]
    assert to_torch.loads == len(to_torch.groups) and to_dist.loads == len(to_dist.groups)


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
def test_only_the_rank_files_a_run_saved(minis, work, family):
    """Megatron-LM / Pai-Megatron-Patch save only the ranks their run had: TP2 x EP2 x ETP1 on 2 GPUs writes
    mp_rank_00_000 and mp_rank_01_001. Such a checkpoint converts back byte-identical (dense weights from any
    EP rank of their TP rank, experts from any TP rank of their EP rank); one missing a needed file is refused."""
    out = work / f"{family}-diagonal"
    hf2mcore(minis[family], out, ParallelLayout(tp=2, ep=2, etp=1))
    for name in ("mp_rank_00_001", "mp_rank_01_000"):
        shutil.rmtree(out / "release" / name)
    mcore2hf(out, work / f"{family}-diagonal-hf")
    assert_identical(read_all(minis[family]), work / f"{family}-diagonal-hf")
    shutil.rmtree(out / "release" / "mp_rank_00_000")
    from megatron_patch.errors import UserError

    with pytest.raises(UserError, match="no rank file holds the weights of TP rank 0"):
        mcore2hf(out, work / f"{family}-diagonal-hf2")
    assert not (work / f"{family}-diagonal-hf2").exists()
