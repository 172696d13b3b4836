"""The conversion I/O layer: HF reader/writer, atomic output dirs, progress, Megatron torch layout."""
import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from megatron_patch.checkpoint import mcore_layout
from megatron_patch.checkpoint.atomic import MARKER, atomic_output_dir
from megatron_patch.checkpoint.hf_reader import HFCheckpoint
from megatron_patch.checkpoint.hf_writer import ShardedSafetensorsWriter, copy_tokenizer_files
from megatron_patch.convert.progress import ConversionProgress
from megatron_patch.errors import UserError


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _tensors():
    g = torch.Generator().manual_seed(0)
    out = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for i, shape in enumerate([(64, 48), (33,), (7, 5, 3)]):
            out[f"layers.{i}.{str(dtype)[6:]}.weight"] = torch.randn(shape, generator=g).to(dtype)
    out["scalar"] = torch.tensor(3.5)
    return out


def _write_model(path, tensors, max_shard_bytes=8 * 1024):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "toy"}))
    writer = ShardedSafetensorsWriter(path, max_shard_bytes=max_shard_bytes)
    for name, t in tensors.items():
        writer.add(name, t)
    return writer.close()


# --- writer + reader ---------------------------------------------------------


def test_round_trip_is_byte_identical_across_shards(tmp_path):
    tensors = _tensors()
    weight_map = _write_model(tmp_path / "m", tensors)
    shards = sorted(set(weight_map.values()))
    assert len(shards) >= 3
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["weight_map"] == weight_map
    assert not [p for p in os.listdir(tmp_path / "m") if p.startswith(".")]  # no temporary shards left

    with HFCheckpoint(tmp_path / "m") as ckpt:
        assert ckpt.config == {"model_type": "toy"}
        assert sorted(ckpt.keys()) == sorted(tensors)
        for name, t in tensors.items():
            assert ckpt.shape(name) == tuple(t.shape)
            assert ckpt.dtype(name) == t.dtype
            got = ckpt.get(name)
            assert got.dtype == t.dtype and _bytes(got) == _bytes(t)
        name = "layers.0.bfloat16.weight"
        part = ckpt.get_slice(name)
        assert tuple(part.shape) == (64, 48)
        assert _bytes(part[10:20, 5:9]) == _bytes(tensors[name][10:20, 5:9])


def test_single_shard_has_no_index(tmp_path):
    weight_map = _write_model(tmp_path / "m", {"a": torch.ones(4), "b": torch.zeros(2, 2)}, max_shard_bytes=1 << 20)
    assert set(weight_map.values()) == {"model.safetensors"}
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]
    with HFCheckpoint(tmp_path / "m") as ckpt:
        assert torch.equal(ckpt.get("b"), torch.zeros(2, 2))


def test_writer_copies_views_so_shared_storage_saves(tmp_path):
    fused = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    q, k, v = fused.chunk(3)  # contiguous views sharing one storage
    _write_model(tmp_path / "m", {"q": q, "k": k, "v": v.t()}, max_shard_bytes=1 << 20)
    with HFCheckpoint(tmp_path / "m") as ckpt:
        assert torch.equal(ckpt.get("k"), k) and torch.equal(ckpt.get("v"), v.t())


def test_copy_tokenizer_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "merges.txt", "generation_config.json", "model.safetensors"):
        (src / name).write_text(name)
    copied = copy_tokenizer_files(src, tmp_path / "dst")
    assert sorted(copied) == ["generation_config.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"]
    assert sorted(os.listdir(tmp_path / "dst")) == sorted(copied)


# --- reader: bad inputs ------------------------------------------------------


def _bad(path, *words):
    with pytest.raises(UserError) as info:
        HFCheckpoint(path)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


def test_missing_dir(tmp_path):
    _bad(tmp_path / "nope", "not found", "nope")


def test_no_config_json(tmp_path):
    (tmp_path / "m").mkdir()
    _bad(tmp_path / "m", "no config.json")


def test_no_weights(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    _bad(tmp_path / "m", "model.safetensors")


def test_truncated_shard(tmp_path):
    weight_map = _write_model(tmp_path / "m", _tensors())
    shard = tmp_path / "m" / sorted(set(weight_map.values()))[1]
    size = shard.stat().st_size
    os.truncate(shard, size - 10)
    _bad(tmp_path / "m", "truncated", shard.name)


def test_truncated_single_file(tmp_path):
    _write_model(tmp_path / "m", {"a": torch.ones(100)}, max_shard_bytes=1 << 20)
    os.truncate(tmp_path / "m" / "model.safetensors", 50)
    _bad(tmp_path / "m", "truncated", "model.safetensors")


def test_index_names_missing_file(tmp_path):
    weight_map = _write_model(tmp_path / "m", _tensors())
    gone = sorted(set(weight_map.values()))[-1]
    (tmp_path / "m" / gone).unlink()
    _bad(tmp_path / "m", "missing shard", gone)


def test_unreadable_header(tmp_path):
    weight_map = _write_model(tmp_path / "m", _tensors())
    shard = tmp_path / "m" / sorted(set(weight_map.values()))[0]
    shard.write_bytes((20).to_bytes(8, "little") + b"this is not json!!!!" + b"\0" * 64)
    _bad(tmp_path / "m", "unreadable", shard.name)


def test_index_lists_tensor_absent_from_shard(tmp_path):
    _write_model(tmp_path / "m", _tensors())
    index_path = tmp_path / "m" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost.weight"] = next(iter(index["weight_map"].values()))
    index_path.write_text(json.dumps(index))
    _bad(tmp_path / "m", "ghost.weight", "does not contain")


# --- atomic output dir -------------------------------------------------------


def test_atomic_dir_commits_on_success(tmp_path):
    with atomic_output_dir(tmp_path / "out") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
        (tmp / "f").write_text("x")
    assert os.listdir(tmp_path) == ["out"]
    assert (tmp_path / "out" / "f").read_text() == "x"
    assert sorted(os.listdir(tmp_path / "out")) == [MARKER, "f"]  # ours: a later --force may replace it


def test_atomic_dir_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_atomic_dir_refuses_existing_without_force(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("keep")
    with pytest.raises(UserError, match="already exists.*--force"):
        with atomic_output_dir(tmp_path / "out"):
            pytest.fail("must not get here")
    assert os.listdir(tmp_path / "out") == ["old"]
    assert os.listdir(tmp_path) == ["out"]


def _earlier_output(path):
    with atomic_output_dir(path) as tmp:
        (tmp / "old").write_text("old")


def test_atomic_dir_force_replaces(tmp_path):
    _earlier_output(tmp_path / "out")
    with atomic_output_dir(tmp_path / "out", force=True) as tmp:
        (tmp / "new").write_text("new")
    assert os.listdir(tmp_path) == ["out"]
    assert sorted(os.listdir(tmp_path / "out")) == [MARKER, "new"]


def test_atomic_dir_force_error_keeps_old(tmp_path):
    _earlier_output(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(tmp_path / "out", force=True):
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["out"]
    assert sorted(os.listdir(tmp_path / "out")) == [MARKER, "old"]


def test_atomic_dir_force_never_replaces_what_it_did_not_write(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine").write_text("mine")
    with pytest.raises(UserError, match="not written by megatron-patch"):
        with atomic_output_dir(tmp_path / "out", force=True):
            pytest.fail("must not get here")
    assert os.listdir(tmp_path / "out") == ["mine"] and os.listdir(tmp_path) == ["out"]


@pytest.mark.parametrize("out, relation", [("in", "is"), (".", "contains"), ("in/sub", "is inside")])
def test_atomic_dir_refuses_output_overlapping_an_input(tmp_path, out, relation):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "w").write_text("w")
    with pytest.raises(UserError, match=f"{relation} the input"):
        with atomic_output_dir(tmp_path / out, force=True, inputs=[tmp_path / "in"]):
            pytest.fail("must not get here")
    assert os.listdir(tmp_path / "in") == ["w"]


def test_atomic_dir_lock_and_stale_temporaries(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    (tmp_path / f".out.tmp-{dead.pid}").mkdir()  # a killed run's temporary
    (tmp_path / ".out.lock").write_text(str(dead.pid))  # and its lock
    with atomic_output_dir(tmp_path / "out") as tmp:
        assert (tmp_path / ".out.lock").read_text() == str(os.getpid())
        (tmp_path / ".other.lock").write_text(str(os.getppid()))  # held by a live process
        with pytest.raises(UserError, match=re.escape(f"being written by another process (pid {os.getppid()}")):
            with atomic_output_dir(tmp_path / "other"):
                pytest.fail("must not get here")
        (tmp / "f").write_text("x")
    assert sorted(os.listdir(tmp_path)) == [".other.lock", "out"]


# --- progress ----------------------------------------------------------------


def test_progress_counts_when_hidden():
    with ConversionProgress(total_bytes=3000, desc="t") as progress:  # pytest's stderr is not a TTY
        progress.update(1000)
        progress.update(2000, ntensors=4)
        stats, line = progress.summary()
    assert stats["tensors"] == 5 and stats["bytes"] == 3000
    assert stats["seconds"] >= 0 and stats["gb_per_s"] >= 0 and stats["peak_rss_gib"] > 0
    assert "5 tensors" in line and "GB/s" in line and "peak RSS" in line and "\n" not in line


# --- Megatron torch layout ---------------------------------------------------


def _rank_state(tp, pp, ep, chunk):
    return {"marker": torch.tensor([tp, pp, ep, chunk]), "decoder.layers.0.mlp.linear_fc1.weight": torch.full((2, 3), float(tp * 100 + pp * 10 + ep + chunk / 10))}


def test_mcore_layout_tp2_pp2_ep2_vpp2_round_trip(tmp_path):
    root = tmp_path / "ckpt"
    sizes = {"tp": 2, "pp": 2, "ep": 2, "vpp": 2}
    args = {"num_layers": 8, "hidden_size": 16, "num_attention_heads": 4}
    for tp in range(2):
        for pp in range(2):
            for ep in range(2):
                mcore_layout.write_rank(root, 100, tp, pp, ep, sizes, [_rank_state(tp, pp, ep, c) for c in range(2)], args)
    mcore_layout.write_latest(root, 100)

    assert (root / "latest_checkpointed_iteration.txt").read_text() == "100"
    assert sorted(os.listdir(root)) == ["iter_0000100", "latest_checkpointed_iteration.txt"]
    assert sorted(os.listdir(root / "iter_0000100")) == [
        "mp_rank_00_000_000", "mp_rank_00_000_001", "mp_rank_00_001_000", "mp_rank_00_001_001",
        "mp_rank_01_000_000", "mp_rank_01_000_001", "mp_rank_01_001_000", "mp_rank_01_001_001",
    ]
    assert os.listdir(root / "iter_0000100" / "mp_rank_01_001_000") == ["model_optim_rng.pt"]
    assert mcore_layout.checkpoint_rank_dir(root, 100, 1, 0, 1, 2, 2) == root / "iter_0000100" / "mp_rank_01_000_001"

    iteration, found = mcore_layout.read_layout(root)
    assert iteration == 100
    assert found == {"tp": 2, "pp": 2, "ep": 2, "etp": 2, "vpp": 2}
    for tp in range(2):
        for pp in range(2):
            for ep in range(2):
                chunks = mcore_layout.read_rank(root, tp, pp, ep, sizes=found, iteration=iteration)
                assert len(chunks) == 2
                for c, sd in enumerate(chunks):
                    want = _rank_state(tp, pp, ep, c)
                    assert sd.keys() == want.keys()
                    assert all(torch.equal(sd[k], want[k]) for k in want)

    saved = torch.load(root / "iter_0000100" / "mp_rank_01_001_001" / "model_optim_rng.pt", weights_only=False)
    assert sorted(saved) == ["args", "checkpoint_version", "iteration", "model0", "model1"]
    assert saved["checkpoint_version"] == 3.0 and saved["iteration"] == 100
    a = saved["args"]
    assert isinstance(a, argparse.Namespace)
    assert (a.tensor_model_parallel_size, a.pipeline_model_parallel_size, a.expert_model_parallel_size) == (2, 2, 2)
    assert (a.expert_tensor_parallel_size, a.virtual_pipeline_model_parallel_size) == (2, 2)
    assert (a.num_layers, a.hidden_size, a.num_attention_heads) == (8, 16, 4)


@pytest.mark.parametrize(
    "sizes, names",
    [
        ({"tp": 2, "pp": 1, "ep": 1}, ["mp_rank_00", "mp_rank_01"]),
        ({"tp": 1, "pp": 2, "ep": 1}, ["mp_rank_00_000", "mp_rank_00_001"]),
        ({"tp": 1, "pp": 1, "ep": 2}, ["mp_rank_00_000", "mp_rank_00_001"]),
    ],
)
def test_mcore_layout_names_and_release(tmp_path, sizes, names):
    root = tmp_path / "ckpt"
    for tp in range(sizes["tp"]):
        for pp in range(sizes["pp"]):
            for ep in range(sizes["ep"]):
                mcore_layout.write_rank(root, "release", tp, pp, ep, sizes, [_rank_state(tp, pp, ep, 0)], {"num_layers": 2})
    mcore_layout.write_latest(root, "release")
    assert (root / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert sorted(os.listdir(root / "release")) == names
    iteration, found = mcore_layout.read_layout(root)
    assert iteration == "release"
    assert {k: found[k] for k in ("tp", "pp", "ep", "vpp")} == {**sizes, "vpp": 1}
    # PP and EP layouts share the mp_rank_XX_YYY names; the stored args tell them apart.
    tp, pp, ep = sizes["tp"] - 1, sizes["pp"] - 1, sizes["ep"] - 1
    (sd,) = mcore_layout.read_rank(root, tp, pp, ep)
    assert torch.equal(sd["marker"], torch.tensor([tp, pp, ep, 0]))
    saved = torch.load(root / "release" / names[-1] / "model_optim_rng.pt", weights_only=False)
    assert "model" in saved and saved["iteration"] == 0


def test_parallel_layout_validates_and_normalises_itself():
    """One place checks sizes (every command builds a ParallelLayout) and VPP 1 is no VPP; sizes dicts (rank
    files, convert_meta.json) and layouts convert both ways without loss."""
    from megatron_patch.models.builder import ParallelLayout

    assert ParallelLayout(pp=2, vpp=1).vpp is None
    for bad, message in [(dict(tp=0), "--tp 0: must be >= 1"), (dict(cp=0), "--cp 0: must be >= 1"),
                         (dict(etp=0), "--etp 0: must be >= 1"), (dict(pp=2, vpp=0), "--vpp 0: must be >= 1"),
                         (dict(vpp=2), "--vpp 2 needs pipeline parallelism")]:
        with pytest.raises(UserError, match=re.escape(message)):
            ParallelLayout(**bad)
    for layout in (ParallelLayout(), ParallelLayout(tp=2, pp=2, ep=4, etp=1, vpp=2),
                   ParallelLayout(pp=3, decoder_first_pipeline_num_layers=1, decoder_last_pipeline_num_layers=2),
                   ParallelLayout(pp=2, pipeline_model_parallel_layout="Et|t|t|tL")):
        sizes = mcore_layout.layout_dict(layout)
        assert mcore_layout.layout_of(sizes) == dataclasses.replace(layout, etp=layout.expert_tp)  # ETP resolved
        assert mcore_layout.layout_key(sizes) == mcore_layout.layout_key(mcore_layout.layout_dict(mcore_layout.layout_of(sizes)))


def test_mcore_layout_errors(tmp_path):
    with pytest.raises(UserError, match="latest_checkpointed_iteration.txt"):
        mcore_layout.read_layout(tmp_path)
    sizes = {"tp": 2, "pp": 2, "ep": 1}
    for tp in range(2):
        for pp in range(2):
            mcore_layout.write_rank(tmp_path, 5, tp, pp, 0, sizes, [{}], {})
    mcore_layout.write_latest(tmp_path, 5)
    (tmp_path / "iter_0000005" / "mp_rank_01_001" / "model_optim_rng.pt").unlink()
    with pytest.raises(UserError, match="mp_rank_01_001"):
        mcore_layout.read_layout(tmp_path)


def test_atomic_dir_under_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="a parent path is a file"):
        with atomic_output_dir(tmp_path / "file" / "out"):
            pytest.fail("must not get here")
    assert (tmp_path / "file").read_text() == "x"
