"""Fault cases: tampered checkpoints are refused without running their payload (every reader), and Megatron-LM's
real checkpoint content still loads. Each case asserts the exit code, the first line, that the payload did
not run and that nothing was written or lost."""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy
import pytest
import torch

from megatron_patch.checkpoint import safe_load
from megatron_patch.checkpoint import mcore_layout
from megatron_patch.cli import main
from megatron_patch.convert.hf2mcore import hf2mcore
from megatron_patch.convert.mini import make_mini
from megatron_patch.errors import UserError
from megatron_patch.models.builder import ParallelLayout

REFUSED = "refused to load: it holds posix.system"


class Payload:
    """Unpickling this runs `touch MARKER` (what an attacker's checkpoint would do with a worse command)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _tamper_pt(path, marker, key="args"):
    ck = torch.load(path, weights_only=False)
    if isinstance(ck[key], dict):  # a training run's args
        ck[key]["note"] = Payload(marker)
    else:
        ck[key].note = Payload(marker)  # inside Megatron's args Namespace, where a real one would hide it
    torch.save(ck, path)


def _tamper_metadata(ckpt_dir, marker):
    md = pickle.load(open(ckpt_dir / ".metadata", "rb"))
    md.mcore_data = {"x": Payload(marker)}
    pickle.dump(md, open(ckpt_dir / ".metadata", "wb"))


def _tamper_stored_object(ckpt_dir, marker):
    """Point one object stored among the tensors (an `_extra_state`) at a pickled payload appended to its file."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    md = pickle.load(open(ckpt_dir / ".metadata", "rb"))
    key = next(k for k, v in md.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))
    info = next(v for i, v in md.storage_data.items() if i.fqn == key)
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    path = ckpt_dir / info.relative_path
    info.offset, info.length = path.stat().st_size, len(buf.getvalue())
    with open(path, "ab") as f:
        f.write(buf.getvalue())
    pickle.dump(md, open(ckpt_dir / ".metadata", "wb"))
    return key


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    hf = make_mini("qwen2", root / "hf", layers=2)
    hf2mcore(str(hf), str(root / "torch"), ParallelLayout(), fmt="torch", dtype="fp32")
    hf2mcore(str(hf), str(root / "dist"), ParallelLayout(), fmt="torch_dist", dtype="fp32")
    marker = root / "PAYLOAD_RAN"
    bad = {}
    for name, src, tamper in (
        ("legacy_pt", "torch", lambda d: _tamper_pt(d / "release/mp_rank_00/model_optim_rng.pt", marker)),
        ("dist_metadata", "dist", lambda d: _tamper_metadata(d / "release", marker)),
        ("dist_common_pt", "dist", lambda d: _tamper_pt(d / "release/common.pt", marker)),
        ("dist_stored_object", "dist", lambda d: _tamper_stored_object(d / "release", marker)),
    ):
        bad[name] = root / name
        shutil.copytree(root / src, bad[name])
        tamper(bad[name])
    return {"root": root, "hf": hf, "marker": marker, "bad": bad}


def _snapshot(path):
    return {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", ["legacy_pt", "dist_metadata", "dist_common_pt", "dist_stored_object"])
def test_tampered_checkpoint_is_refused_by_every_command(ckpts, capsys, case):
    src = ckpts["bad"][case]
    before = _snapshot(src)
    out = ckpts["root"] / f"out-{case}"
    commands = [["convert", "mcore2hf", "--mcore-path", str(src), "--out", str(out)],
                ["convert", "reshard", "--mcore-path", str(src), "--out", str(out), "--tp", "1", "--pp", "1", "--ep", "1"],
                ["compare", "--hf-path", str(ckpts["hf"]), "--mcore-path", str(src)]]
    for argv in commands:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        first = next(line for line in err if line.startswith("error: "))
        assert REFUSED in first and str(src) in first, (argv, err)
        assert not ckpts["marker"].exists(), f"{argv}: the payload ran"
        assert not out.exists() and not list(out.parent.glob(f".{out.name}*")), f"{argv}: output left behind"
    assert _snapshot(src) == before  # nothing lost


def test_dcp_and_megatron_loaders_are_routed_through_the_safe_ones(ckpts):
    """Past the up-front check: torch DCP's own FileSystemReader, its load planner's objects and megatron's
    common.pt loader refuse the payload once safe_load.install() ran."""
    import torch.distributed.checkpoint as dcp
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint import FileSystemReader

    safe_load.install()
    with pytest.raises(safe_load.UnsafeCheckpoint, match=REFUSED):
        FileSystemReader(str(ckpts["bad"]["dist_metadata"] / "release")).read_metadata()
    with pytest.raises(safe_load.UnsafeCheckpoint, match=REFUSED):
        dist_checkpointing.load_common_state_dict(str(ckpts["bad"]["dist_common_pt"] / "release"))
    stored = ckpts["bad"]["dist_stored_object"] / "release"
    md = pickle.load(open(stored / ".metadata", "rb"))
    key = next(k for k, v in md.state_dict_metadata.items() if type(v).__name__ == "BytesStorageMetadata")
    with pytest.raises(BaseException) as err:  # DCP's CheckpointException is a BaseException
        dcp.load({key: io.BytesIO()}, checkpoint_id=str(stored), no_dist=True)
    assert isinstance(safe_load.refusal_in(err.value), safe_load.UnsafeCheckpoint)
    assert not ckpts["marker"].exists()
    # the untampered checkpoint still reads through the same loaders
    good = ckpts["root"] / "dist" / "release"
    assert dist_checkpointing.load_common_state_dict(str(good))["args"].tensor_model_parallel_size == 1
    objects = {key: io.BytesIO()}
    dcp.load(objects, checkpoint_id=str(good), no_dist=True)
    assert not isinstance(objects[key], io.BytesIO)


def test_megatron_lm_checkpoint_content_loads(tmp_path):
    """What Megatron-LM stores next to the weights (args with torch dtypes and megatron enums, the rng states
    of python/numpy/torch/tracker, the scheduler, the rerun state machine, optimizer state) loads
    weights-only, equal to what was saved."""
    from megatron.core.enums import ModelType
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.rerun_state_machine import RerunMode, RerunState
    from megatron.core.transformer.enums import AttnBackend

    numpy.random.seed(5)
    args = argparse.Namespace(params_dtype=torch.bfloat16, main_grads_dtype=torch.float32, model_type=ModelType.encoder_or_decoder,
                              attention_backend=AttnBackend.auto, data_path=["1.0", "/data/a_text_document"],
                              tensor_model_parallel_size=1, pipeline_model_parallel_size=1, expert_model_parallel_size=1,
                              lr=3e-4, rerun_mode="disabled", virtual_pipeline_model_parallel_size=None)
    rng = [{"random_rng_state": random.getstate(), "np_rng_state": numpy.random.get_state(),
            "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.get_rng_state(),
            "rng_tracker_states": {"model-parallel-rng": torch.get_rng_state()}}]
    extra = {"rng_state": rng, "opt_param_scheduler": {"max_lr": 3e-4, "num_steps": 80, "lr_decay_style": "cosine"},
             "rerun_state_machine": {"mode": RerunMode.DISABLED, "state": RerunState.NOT_RUNNING_YET, "rerun_requested": False},
             "optimizer": {"optimizer": {"state": {0: {"exp_avg": torch.ones(3), "step": torch.tensor(4.0)}},
                                         "param_groups": [{"lr": 3e-4, "params": [0]}]},
                           "config": OptimizerConfig(lr=3e-4), "grad_scaler": None},
             "num_floating_point_operations_so_far": 12345}
    root = tmp_path / "ckpt"
    path = mcore_layout.write_rank(root, 80, 0, 0, 0, {"tp": 1}, [{"w": torch.arange(4.0)}], vars(args))
    saved = torch.load(path, weights_only=False)
    saved.update(extra)
    torch.save(saved, path)
    mcore_layout.write_latest(root, 80)

    loaded = mcore_layout.load_rank_checkpoint(root, 0, 0, 0)
    assert vars(loaded["args"]) == vars(saved["args"])
    state = loaded["rng_state"][0]
    assert state["random_rng_state"] == rng[0]["random_rng_state"]
    np_saved, np_loaded = rng[0]["np_rng_state"], state["np_rng_state"]
    assert np_loaded[0] == np_saved[0] and numpy.array_equal(np_loaded[1], np_saved[1]) and np_loaded[2:] == np_saved[2:]
    numpy.random.set_state(np_loaded)  # numpy accepts it back
    assert torch.equal(state["torch_rng_state"], rng[0]["torch_rng_state"])
    assert loaded["rerun_state_machine"] == extra["rerun_state_machine"]
    assert loaded["optimizer"]["config"] == extra["optimizer"]["config"]
    assert torch.equal(loaded["optimizer"]["optimizer"]["state"][0]["exp_avg"], torch.ones(3))
    assert loaded["opt_param_scheduler"] == extra["opt_param_scheduler"]
    assert torch.equal(mcore_layout.model_chunks(loaded)[0]["w"], torch.arange(4.0))


def test_corrupt_checkpoint_files_are_one_line_errors(ckpts, tmp_path):
    """Not a payload, just damage: a `.pt` holding a list, a truncated `.metadata`, a garbage metadata.json."""
    src = tmp_path / "list_pt"
    shutil.copytree(ckpts["root"] / "torch", src)
    torch.save([1, 2, 3], src / "release/mp_rank_00/model_optim_rng.pt")
    with pytest.raises(UserError, match="holds a list, not a Megatron checkpoint"):
        mcore_layout.read_layout(src)
    dist = tmp_path / "cut_metadata"
    shutil.copytree(ckpts["root"] / "dist", dist)
    meta = dist / "release/.metadata"
    meta.write_bytes(meta.read_bytes()[:40])
    with pytest.raises(UserError, match="the file is corrupt"):
        safe_load.check_dist_checkpoint(dist / "release")
    (dist / "release/metadata.json").write_text("not json{")  # JSON, not a pickle; megatron's reader raised
    with pytest.raises(UserError, match="metadata.json cannot be read \\(Expecting value"):
        safe_load.check_dist_checkpoint(dist / "release")


def test_force_never_eats_an_input(ckpts, capsys):
    """--out that is, contains or lies inside an input is refused even with --force; the input is untouched."""
    root, hf = ckpts["root"], ckpts["hf"]
    cases = [
        (["convert", "hf2mcore", "--hf-path", str(hf), "--out", str(hf), "--force"], hf, "is the input"),
        (["convert", "hf2mcore", "--hf-path", str(hf), "--out", str(root), "--force"], hf, "contains the input"),
        (["convert", "mcore2hf", "--mcore-path", str(root / "torch"), "--out", str(root / "torch" / "hf"), "--force"],
         root / "torch", "is inside the input"),
        (["convert", "reshard", "--mcore-path", str(root / "dist"), "--out", str(root / "dist"), "--force",
          "--tp", "1", "--pp", "1", "--ep", "1"], root / "dist", "is the input"),
        (["convert", "fp8-to-bf16", "--in", str(hf), "--out", str(hf), "--force"], hf, "is the input"),
    ]
    for argv, source, relation in cases:
        before = _snapshot(source)
        capsys.readouterr()
        assert main(argv) == 2, argv
        first = capsys.readouterr().err.strip().splitlines()[-1]
        assert first.startswith("error: output") and relation in first, (argv, first)
        assert _snapshot(source) == before, argv


def test_preprocess_and_train_save_never_eat_an_input(ckpts, tmp_path, capsys):
    from megatron_patch.training.arguments import build_parser, validate

    hf = str(ckpts["hf"])
    text = tmp_path / "docs.txt"
    text.write_text("hello world\n\nsecond document here\n")
    prefix = tmp_path / "data" / "corpus"
    pre = ["preprocess", "--input", str(text), "--tokenizer", hf, "--output-prefix"]
    assert main([*pre, str(prefix)]) == 0
    idx = (prefix.parent / "corpus.idx").read_bytes()
    capsys.readouterr()
    assert main([*pre, str(prefix)]) == 2 and "already exists (pass --force" in capsys.readouterr().err
    assert main([*pre, str(prefix), "--force"]) == 0 and (prefix.parent / "corpus.idx").read_bytes() == idx
    (tmp_path / "x.bin").write_text("someone's file")
    assert main([*pre, str(tmp_path / "x"), "--force"]) == 2
    assert "not a Megatron indexed dataset" in capsys.readouterr().err and (tmp_path / "x.bin").read_text() == "someone's file"
    (tmp_path / "y.idx").write_text("text to tokenize")
    assert main(["preprocess", "--input", str(tmp_path / "y.idx"), "--tokenizer", hf, "--output-prefix",
                 str(tmp_path / "y"), "--force"]) == 2
    assert "is the input" in capsys.readouterr().err and (tmp_path / "y.idx").read_text() == "text to tokenize"

    base = ["--hf-config", hf, "--data-path", str(prefix), "--train-iters", "2", "--seq-length", "8"]
    for extra, message in ((["--save", str(prefix.parent)], "contains the input --data-path"),
                           (["--save", str(ckpts["root"]), "--load", str(ckpts["root"] / "torch")], "contains the input --load"),
                           (["--save", str(ckpts["hf"] / "run"), "--load-hf", hf], "is inside the input --load-hf")):
        with pytest.raises(UserError, match=message):
            validate(build_parser().parse_args([*base, *extra]))
    validate(build_parser().parse_args([*base, "--save", str(tmp_path / "run"), "--load", str(tmp_path / "run")]))


def _edit_rank_file(src, dst, edit):
    shutil.copytree(src, dst)
    path = dst / "release/mp_rank_00/model_optim_rng.pt"
    ck = torch.load(path, weights_only=False)
    edit(ck)
    torch.save(ck, path)
    return dst


@pytest.fixture(scope="module")
def mismatched(ckpts):
    """Checkpoints that do not fit their config: each converts to exit 2 with nothing written."""
    root, norm = ckpts["root"], "decoder.final_layernorm.weight"
    hf4 = make_mini("qwen2", root / "hf4", layers=4)
    hf2mcore(str(hf4), str(root / "torch4"), ParallelLayout(), fmt="torch", dtype="fp32")
    shutil.rmtree(root / "torch4" / "hf_config")  # a Megatron-LM checkpoint: the user passes --hf-config
    huge = root / "hf_huge"
    shutil.copytree(ckpts["hf"], huge)
    config = json.loads((huge / "config.json").read_text())
    (huge / "config.json").write_text(json.dumps({**config, "hidden_size": 10**12}))

    def no_args(ck):
        ck.pop("args")

    def drop_config(ck):
        shutil.rmtree(root / "no_args_2" / "hf_config", ignore_errors=True)

    cases = {
        "4 layers, 2-layer config": (root / "torch4", ckpts["hf"], "saved with num_layers=4, but"),
        "4 layers without args": (_edit_rank_file(root / "torch4", root / "no_args_4", no_args), ckpts["hf"],
                                  "holds decoder.layers.2, a layer the config does not have"),
        "wrong shape": (_edit_rank_file(root / "torch", root / "shape", lambda ck: ck["model"].__setitem__(norm, torch.ones(7))),
                        None, "model.norm.weight read from the checkpoint has shape [7], but"),
        "int64 tensor": (_edit_rank_file(root / "torch", root / "int64", lambda ck: ck["model"].__setitem__(norm, ck["model"][norm].long())),
                         None, f"{norm} is int64, not floating point"),
        "stray fp16": (_edit_rank_file(root / "torch", root / "fp16", lambda ck: ck["model"].__setitem__(norm, ck["model"][norm].half())),
                       None, f"{norm} is float16 while the others are float32"),
        "another model's --hf-config": (root / "torch", make_mini("qwen2", root / "hf96", layers=2, hidden=96),
                                        "is another model than the checkpoint's own"),
        "unbuildable config": (_edit_rank_file(root / "torch", root / "no_args_2", lambda ck: (no_args(ck), drop_config(ck))),
                               huge, "transformers cannot build a model from this config.json"),
    }
    return cases


@pytest.mark.parametrize("case", ["4 layers, 2-layer config", "4 layers without args", "wrong shape", "int64 tensor",
                                  "stray fp16", "another model's --hf-config", "unbuildable config"])
def test_output_is_checked_against_the_config(ckpts, mismatched, capsys, case):
    src, hf_config, message = mismatched[case]
    out = ckpts["root"] / "out-mismatch"
    config = ["--hf-config", str(hf_config)] if hf_config else []
    for argv in (["convert", "mcore2hf", "--mcore-path", str(src), "--out", str(out), *config],
                 ["convert", "reshard", "--mcore-path", str(src), "--out", str(out), "--tp", "1", "--pp", "1", "--ep", "1",
                  "--format", "torch_dist", *config]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        first = capsys.readouterr().err.strip().splitlines()[-1]
        assert first.startswith("error: ") and message in first, (argv, first)
        assert not out.exists() and not list(out.parent.glob(f".{out.name}*")), argv


def test_train_data_is_checked_against_the_vocabulary(tmp_path):
    """Token ids past the vocabulary, a truncated .bin and a garbage .idx: one line each, before any training."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_patch.data.gpt import check_tokens

    prefix = str(tmp_path / "corpus")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    for doc in ([5, 6, 7], [8, 600, 9]):  # 600: a token of a larger tokenizer
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(prefix + ".idx")
    check_tokens(prefix, 601)
    with pytest.raises(UserError, match="token id 600 is outside the model's vocabulary \\(512 tokens\\)"):
        check_tokens(prefix, 512)
    data = Path(prefix + ".bin").read_bytes()
    Path(prefix + ".bin").write_bytes(data[:-4])
    with pytest.raises(UserError, match="holds 8 bytes, its .idx describes 12"):
        check_tokens(prefix, 601)
    Path(prefix + ".idx").write_bytes(b"garbage")
    with pytest.raises(UserError, match="corpus.idx cannot be read"):
        check_tokens(prefix, 601)


def test_a_stopped_rank_ends_the_job_naming_it(tmp_path):
    """Rank 0's heartbeat watches rank 1, whose beat never changes again (a stopped process): rank 0 exits 3
    with one line naming rank 1 and its step, and records the code for the launcher."""
    import subprocess
    import sys
    import textwrap

    status = tmp_path / "status"
    script = textwrap.dedent("""
        import time, torch.distributed as dist
        from megatron_patch.runtime.heartbeat import Heartbeat
        from megatron_patch.runtime.distributed_init import record_exit_code
        store = dist.TCPStore("127.0.0.1", 0, 2, True, wait_for_workers=False)
        store.set("mp_heartbeat/1", "1 7")  # rank 1 beat once, at step 7, then stopped
        hb = Heartbeat(store, 0, 2, timeout=1.0, on_abort=record_exit_code)
        hb.step = 12
        time.sleep(30)
    """)
    env = dict(os.environ, MP_EXIT_STATUS_FILE=str(status), RANK="0")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 3, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: rank 1 stopped responding (no heartbeat for 1 s, the last one at step 7; seen by "
                      "rank 0); rank 0 (step 12) exits with code 3"]
    assert status.read_text() == "0 3\n"


def test_a_dead_rank_is_named_with_its_last_step(tmp_path, monkeypatch):
    """A new step beats at once (the last beat names the step the rank died in, not one an interval old) and is
    recorded for torchrun's agent; after a collective fails, the survivor names the ranks whose beat stopped."""
    import time

    import torch.distributed as dist

    from megatron_patch.runtime.heartbeat import Heartbeat

    def beat_of(rank, ends, within):
        deadline = time.monotonic() + within
        while not store.get(f"mp_heartbeat/{rank}").decode().endswith(ends) and time.monotonic() < deadline:
            time.sleep(0.01)
        return store.get(f"mp_heartbeat/{rank}").decode()

    monkeypatch.setenv("MP_RANK_STEPS_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "2")
    store = dist.TCPStore("127.0.0.1", 0, 3, True, wait_for_workers=False)
    ranks = [Heartbeat(store, rank, 3, timeout=1.0, watch=False) for rank in range(3)]  # beat every 0.2 s
    try:
        assert (tmp_path / "2").read_text() == "start-up"
        ranks[1].step, ranks[2].step = 7, 6
        assert beat_of(2, " 6", 1.0).endswith(" 6") and beat_of(1, " 7", 1.0).endswith(" 7")
        ranks[2].stop()  # rank 2 dies after its step 6
        assert (tmp_path / "2").read_text() == "6"
        start = time.monotonic()
        assert ranks[0].gone_ranks() == {2: "6"}
        assert ranks[0].describe_gone() == "rank 2 is gone (last heartbeat at step 6)"
        assert time.monotonic() - start < 2 * (2 * ranks[0].interval + 0.5) + 1.0  # a few beats, not the timeout
    finally:
        for rank in ranks:
            rank.stop()
    two = Heartbeat(store, 0, 2, timeout=60.0, watch=False)  # beats every 5 s, and at once for a new step
    try:
        two.step = 9
        assert beat_of(0, " 9", 2.0).endswith(" 9")
        assert two.gone_ranks() == {1: "7"}  # of two ranks, the peer that dropped is the other
    finally:
        two.stop()


@pytest.mark.parametrize("verbose", [False, True])
def test_a_survivor_names_the_dead_rank_not_gloos_socket(monkeypatch, capsys, verbose):
    """The collective that fails when a peer dies: one line naming the rank and its last step from the beats, and
    the survivor's own step, exit 3; gloo's socket text only with --verbose."""
    import megatron_patch.training.arguments as arguments
    import megatron_patch.training.trainer as trainer_module
    from megatron_patch.training.pretrain import run

    class Beats:
        def describe_gone(self):
            return "rank 1 is gone (last heartbeat at step 6)"

    class Dying:
        heartbeat, iteration = Beats(), 7

        def __init__(self, args):
            pass

        def train(self):
            raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:33485")

        def close(self):
            pass

    monkeypatch.setattr(arguments, "validate", lambda args: None)
    monkeypatch.setattr(trainer_module, "Trainer", Dying)
    monkeypatch.setenv("RANK", "0")
    assert run(argparse.Namespace(verbose=verbose)) == 3
    gloo = " [[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:33485]" if verbose else ""
    assert capsys.readouterr().err.splitlines() == [
        f"error: rank 1 is gone (last heartbeat at step 6){gloo}; rank 0 (step 7) exits with code 3"]


def test_a_rank_missing_at_start_up_ends_the_job_within_the_heartbeat_timeout(tmp_path):
    """The heartbeat starts on the rendezvous store, before the process group (whose start-up waits for every rank
    for the whole --distributed-timeout-minutes): rank 0 hosting the store and rank 1 on torchrun's agent store
    each exit 3 within seconds with one line naming the rank that never came and the phase."""
    import subprocess
    import sys
    import time

    import torch.distributed as dist

    from megatron_patch.runtime.multirank import free_port

    script = ("from megatron_patch.runtime import get_accelerator\n"
              "from megatron_patch.runtime.distributed_init import record_exit_code\n"
              "from megatron_patch.runtime.distributed_init import init_distributed\n"
              "init_distributed(get_accelerator(), heartbeat_timeout=2.0, on_abort=record_exit_code)\n")
    agent_port = free_port()
    agent = dist.TCPStore("127.0.0.1", agent_port, 3, True, wait_for_workers=False)  # torchrun's agent store
    envs = {0: {"MASTER_PORT": str(free_port())},
            1: {"MASTER_PORT": str(agent_port), "TORCHELASTIC_USE_AGENT_STORE": "True"}}
    start = time.monotonic()
    procs = {rank: subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True, env=dict(
        os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MP_EXIT_STATUS_FILE=str(tmp_path / "st"),
        **env)) for rank, env in envs.items()}
    for rank, proc in procs.items():
        err = proc.communicate(timeout=120)[1]
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert proc.returncode == 3, err[-2000:]
        assert errors == [f"error: rank {1 - rank} stopped responding during start-up (no heartbeat for 2 s; seen by "
                          f"rank {rank}); rank {rank} (start-up) exits with code 3"], err[-2000:]
    assert time.monotonic() - start < 60  # not the process group's 30 minutes
    assert sorted((tmp_path / "st").read_text().splitlines()) == ["0 3", "1 3"]
    del agent


def test_killed_saves_are_cleaned_up_at_the_next_start(tmp_path):
    from megatron_patch.training.checkpointing import remove_stale_saves

    save = tmp_path / "save"
    (save / ".iter_0000010.tmp").mkdir(parents=True)  # a save killed while writing
    (save / ".iter_0000005.old" / "x").mkdir(parents=True)  # a re-save killed after moving iter 5 aside
    (save / ".iter_0000003.old").mkdir()  # ... and one killed after publishing (iter 3 exists)
    (save / "iter_0000003").mkdir()
    remove_stale_saves(save)
    assert sorted(p.name for p in save.iterdir()) == ["iter_0000003", "iter_0000005"]
    assert (save / "iter_0000005" / "x").is_dir()


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(num_hidden_layers=0), "transformers cannot read"),
    (lambda c: c.update(num_attention_heads=8.5), "num_attention_heads"),
    (lambda c: [c], "holds a JSON list"),
])
def test_bad_config_values_are_one_line_errors(ckpts, tmp_path, capsys, edit, message):
    """Config values transformers rejects (0 layers, 8.5 heads, a JSON list) are one `error:` line and exit 2
    for convert and compare, not a traceback; nothing is written."""
    bad = tmp_path / "bad"
    shutil.copytree(ckpts["hf"], bad)
    config = json.loads((bad / "config.json").read_text())
    edited = edit(config)
    (bad / "config.json").write_text(json.dumps(config if edited is None else edited))
    for argv in (["convert", "hf2mcore", "--hf-path", str(bad), "--out", str(tmp_path / "out")],
                 ["compare", "--hf-path", str(bad)]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (argv, err)
    assert not (tmp_path / "out").exists()


def test_bad_launcher_environment_and_set_values(ckpts, tmp_path, capsys, monkeypatch):
    """`make-mini --set hidden_size=abc` and `MASTER_PORT=abc` are one-line errors with exit 2."""
    assert main(["make-mini", "--family", "qwen2", "--out", str(tmp_path / "m"), "--set", "hidden_size=abc"]) == 2
    assert "transformers rejects the config" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    from megatron_patch.runtime import get_accelerator
    from megatron_patch.runtime.distributed_init import init_distributed

    monkeypatch.setenv("MASTER_PORT", "abc")
    with pytest.raises(UserError, match="MASTER_PORT='abc' is not a number"):
        init_distributed(get_accelerator())  # before any process group is made


def test_megatron_import_warnings_hidden_unless_verbose(ckpts, tmp_path):
    """Bad input after megatron's optimizer is imported (MASTER_PORT=abc): the error line comes first, alone;
    `--verbose` shows the TE/Apex import notes (train silenced them whatever --verbose said). Fresh
    interpreters: the notes print once per process, at the first import."""
    import subprocess
    import sys

    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    data = str(tmp_path / "data")
    builder = IndexedDatasetBuilder(data + ".bin", dtype=numpy.uint16)
    builder.add_document(torch.arange(5, 100), [95])
    builder.finalize(data + ".idx")
    train = ["train", "--hf-config", str(ckpts["hf"]), "--data-path", data, "--seq-length", "8", "--micro-batch-size",
             "1", "--global-batch-size", "1", "--lr", "1e-3", "--train-iters", "1"]
    env = {**os.environ, "MASTER_PORT": "abc", "PYTHONWARNINGS": ""}
    procs = [subprocess.Popen([sys.executable, "-m", "megatron_patch.cli", *verbose, *train], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for verbose in ([], ["--verbose"])]
    (quiet, quiet_err), (loud, loud_err) = [p.communicate(timeout=120) for p in procs]
    error = "error: MASTER_PORT='abc' is not a number; fix the launcher environment"
    assert [p.returncode for p in procs] == [2, 2]
    assert quiet_err.splitlines() == [error], quiet_err
    assert "Transformer Engine and Apex are not installed" in loud_err and loud_err.splitlines()[-1] == error, loud_err


def test_rank_scratch_of_a_killed_run_is_removed_at_the_next_run(tmp_path, monkeypatch):
    """compare/run_ranks scratch directories carry the parent's pid; one whose process is gone is removed by the
    next run, a live one is left alone."""
    import subprocess
    import sys
    import tempfile

    from megatron_patch.runtime.multirank import SCRATCH_PREFIX, clean_stale_scratch

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{SCRATCH_PREFIX}{int(dead.stdout)}-abc"
    live = tmp_path / f"{SCRATCH_PREFIX}{os.getpid()}-def"
    for d in (stale, live):
        (d / "rank0.err").parent.mkdir()
        (d / "rank0.err").write_text("x")
    clean_stale_scratch()
    assert not stale.exists() and live.exists()


def _training_checkpoint(ckpts, name, tamper):
    """The torch_dist checkpoint laid out as a LoRA training run's (iter_0000001, tracker, scheduler state and
    lora args in common.pt, which is what train --load and lora2peft look for), then tampered."""
    dst = ckpts["root"] / name
    shutil.copytree(ckpts["root"] / "dist", dst)
    os.rename(dst / "release", dst / "iter_0000001")
    (dst / mcore_layout.TRACKER_NAME).write_text("1")
    common = dst / "iter_0000001" / "common.pt"
    state = torch.load(common, weights_only=False)
    args = state["args"] if isinstance(state["args"], dict) else vars(state["args"])
    state.update(opt_param_scheduler={"num_steps": 1}, args={**args, "lora_rank": 4, "lora_target": "q_proj"})
    torch.save(state, common)
    tamper(dst / "iter_0000001")
    return dst


@pytest.fixture(scope="module")
def bad_training_checkpoints(ckpts):
    marker = ckpts["marker"]
    return {"train_metadata": _training_checkpoint(ckpts, "train_metadata", lambda d: _tamper_metadata(d, marker)),
            "train_common_pt": _training_checkpoint(ckpts, "train_common_pt", lambda d: _tamper_pt(d / "common.pt", marker)),
            **{name: ckpts["bad"][name] for name in ("legacy_pt", "dist_metadata", "dist_common_pt")}, "marker": marker}


def test_train_load_and_lora2peft_refuse_tampered_checkpoints(ckpts, bad_training_checkpoints, tmp_path, capsys,
                                                              monkeypatch):
    """train --load (model-only and training checkpoints) and lora2peft read no payload: exit 2, one line naming
    the file, the payload never runs, --save gets nothing (no lock left either), the input is unchanged."""
    from megatron_patch.runtime.multirank import free_port

    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    bad = bad_training_checkpoints
    save, data = tmp_path / "save", str(tmp_path / "data")
    builder = IndexedDatasetBuilder(data + ".bin", dtype=numpy.uint16)
    builder.add_document(torch.arange(5, 100), [95])
    builder.finalize(data + ".idx")
    runs = [(["train", "--hf-config", str(ckpts["hf"]), "--load", str(bad[name]), "--data-path", data, "--seq-length", "8",
              "--micro-batch-size", "1", "--train-iters", "1", "--save", str(save), "--no-load-optim"], name)
            for name in ("legacy_pt", "dist_metadata", "dist_common_pt", "train_metadata", "train_common_pt")]
    runs += [(["convert", "lora2peft", "--mcore-path", str(bad[name]), "--hf-config", str(ckpts["hf"]), "--out",
               str(tmp_path / "adapter")], name) for name in ("train_metadata", "train_common_pt")]
    for argv, name in runs:
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
        before = _snapshot(bad[name])
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("error: ") and REFUSED in err[0] and str(bad[name]) in err[0], (argv, err)
        assert not bad["marker"].exists(), f"{argv}: the payload ran"
        assert _snapshot(bad[name]) == before
        assert not list(save.glob("*")) and not list(tmp_path.glob(".save*")) and not list(tmp_path.glob("*adapter*")), argv


def test_lora2peft_names_a_converted_checkpoint_as_such(ckpts, tmp_path, capsys):
    """A release checkpoint (convert hf2mcore's output) has a tracker but no adapters: one line saying so (it
    read "no training checkpoint (latest_checkpointed_iteration.txt) there", next to that very file)."""
    for name in ("torch", "dist"):
        out = tmp_path / f"adapter-{name}"
        capsys.readouterr()
        assert main(["convert", "lora2peft", "--mcore-path", str(ckpts["root"] / name), "--hf-config",
                     str(ckpts["hf"]), "--out", str(out)]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert err == [f"error: --mcore-path {ckpts['root'] / name}: a converted (release) checkpoint holds no LoRA "
                       "adapters; give the --save directory of a `train --lora-rank` run"], err
        assert not list(tmp_path.glob(f"*adapter-{name}*"))


def test_full_read_only_and_size_limited_disks_are_one_line(ckpts, tmp_path, capsys, monkeypatch):
    """A full disk (torch's 'unexpected pos' and a plain ENOSPC), a read-only directory and `ulimit -f` (EFBIG:
    main() ignores SIGXFSZ, which would kill the writer silently) each end hf2mcore with exit 2 and one line
    naming the path and the bytes the output needs; nothing is left next to it."""
    import errno
    import resource

    hf = ckpts["hf"]
    needed = sum(p.stat().st_size for p in hf.rglob("*") if p.is_file())
    out = tmp_path / "out" / "ckpt"

    def convert():
        capsys.readouterr()
        assert main(["convert", "hf2mcore", "--hf-path", str(hf), "--out", str(out)]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("error: "), err
        assert not out.exists() and not [p for p in out.parent.iterdir()], list(out.parent.iterdir())
        return err[0]

    real_save = torch.save
    for failure in (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
                    OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))):
        def full(*args, failure=failure, **kwargs):
            raise failure
        monkeypatch.setattr(torch, "save", full)
        line = convert()
        assert f"no space left on the device of {out.parent} (the output needs about {needed} bytes, " in line, line
        assert line.endswith("bytes free); free space there or choose another output path"), line
    monkeypatch.setattr(torch, "save", real_save)

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        line = convert()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert f"cannot write to {out.parent}: a file would exceed the file size limit of 65536 bytes (ulimit -f)" in line
    assert f"needs about {needed} bytes" in line

    if os.getuid() != 0:
        out.parent.chmod(0o555)
    else:  # root writes through chmod: the filesystem refuses instead
        real_write = Path.write_text

        def read_only(self, *args, **kwargs):
            if self.parent == out.parent:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
            return real_write(self, *args, **kwargs)
        monkeypatch.setattr(Path, "write_text", read_only)
    try:
        line = convert()
    finally:
        out.parent.chmod(0o755)
    reason = os.strerror(errno.EROFS if os.getuid() == 0 else errno.EACCES)
    assert line == (f"error: cannot write to {out.parent} ({reason}); choose a writable output path with about "
                    f"{needed} bytes free"), line


def test_train_save_that_fails_in_megatrons_writer_is_one_line_and_leaves_nothing(ckpts, tmp_path, capsys, caplog):
    """A save that passes the free-space check but fails in megatron's writer processes (here `ulimit -f`: the
    checkpoint's shard is larger than the limit): our one line only (megatron logs the worker's failure first
    otherwise), exit 2, and neither the --save directory this run made nor its lock is left."""
    import logging
    import resource

    hf = str(ckpts["hf"])
    prefix = tmp_path / "corpus"
    assert main(["preprocess", "--input", str(Path(__file__).parents[1] / "examples/data/corpus.txt"), "--tokenizer", hf,
                 "--output-prefix", str(prefix)]) == 0
    out = tmp_path / "out"
    out.mkdir()
    capsys.readouterr()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))  # the shard is ~6 MB, the data index caches < 1 MB
    try:
        code = main(["train", "--hf-config", hf, "--data-path", str(prefix), "--micro-batch-size", "1", "--seq-length",
                     "8", "--train-iters", "1", "--save", str(out / "run"), "--data-cache-path", str(tmp_path / "cache")])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]  # (stderr outside pytest)
    assert err[0].startswith(f"error: cannot write to {out / 'run'}: a file would exceed the file size limit of "
                             f"{1 << 20} bytes (ulimit -f)"), err
    assert list(out.iterdir()) == []


def test_torchrun_ends_with_the_ranks_exit_code(tmp_path):
    """torchrun exits 1 for any failed worker; our `torchrun.handlers` entry point (pyproject.toml) makes it
    return the ranks' code for megatron-patch jobs: bad input at 2 ranks is exit 2 and one `error:` line."""
    import subprocess
    import sys
    import tomllib

    from megatron_patch.runtime.multirank import free_port
    from megatron_patch.training.torchrun_exit import exit_code_of

    assert exit_code_of([3, -15]) == 3 and exit_code_of([-15, 2]) == 2 and exit_code_of([2, 3]) == 3
    assert exit_code_of([-9, -15]) == 3  # a dead rank; the agent SIGTERMs the rest
    from megatron_patch.training.torchrun_exit import _describe

    assert (_describe(-9), _describe(-15), _describe(3)) == ("-9 (SIGKILL)", "-15 (SIGTERM)", "3")  # in its one line
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from megatron_patch.training.torchrun_exit import _code, _excepthook

    steps = tmp_path / "steps"
    steps.mkdir()
    (steps / "0").write_text("7")  # what the ranks recorded (the test above); rank 1 died before its first record
    failures = {rank: ProcessFailure(rank, 1000 + rank, code, str(tmp_path / "none")) for rank, code in ((0, -15), (1, -9))}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MP_RANK_STEPS_DIR", str(steps))
        env.setattr(sys, "stderr", io.StringIO())
        _excepthook(ChildFailedError, ChildFailedError("pretrain", failures), None)
        line = sys.stderr.getvalue()
    assert line == "torchrun: the ranks of pretrain exited (rank 0: -15 (SIGTERM) at step 7, rank 1: -9 (SIGKILL)); " \
                   "exit code 3\n" and _code.pop() == 3
    assert exit_code_of([1, -15]) is None and exit_code_of([]) is None  # a traceback stays torchrun's 1
    from megatron_patch.training.pretrain import peer_is_gone

    assert peer_is_gone(RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:51085: Connection reset "
                                     "by peer. This is typically caused by a remote worker hanging"))
    assert not peer_is_gone(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    from torch.distributed.checkpoint.api import CheckpointException

    closed = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:33485")
    assert peer_is_gone(CheckpointException("save", {0: (closed, None)})) is closed  # a peer died during a save

    # the entry point as `pip install` records it (the venv may hold an older install of the project)
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    plugins = project["entry-points"]["torchrun.handlers"]
    info = tmp_path / "megatron_patch_under_test-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: megatron-patch-under-test\nVersion: 0\n")
    (info / "entry_points.txt").write_text("[torchrun.handlers]\n" + "".join(f"{k} = {v}\n" for k, v in plugins.items()))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), str(tmp_path)]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), "-m", "megatron_patch.training.pretrain", "--hf-config",
                           str(tmp_path / "missing"), "--data-path", str(tmp_path / "data"), "--train-iters", "1",
                           "--seq-length", "8", "--micro-batch-size", "1"],
                          capture_output=True, text=True, timeout=120, env=env)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and f"{tmp_path / 'data'}.bin not found" in errors[0], proc.stderr[-3000:]  # one line, not one a rank


def test_torchrun_agent_ends_a_stopped_rank_at_once(monkeypatch, tmp_path):
    """torchrun's agent ends the ranks with SIGTERM and waits 30 s before SIGKILL; a stopped rank that handles
    SIGTERM (a rank under torchrun does) cannot act on it until continued: our agent hook continues it."""
    import signal
    import sys
    import time

    from torch.distributed.elastic.multiprocessing.subprocess_handler import subprocess_handler

    from megatron_patch.training.torchrun_exit import _wake_stopped_workers

    handler_class = subprocess_handler.SubprocessHandler
    monkeypatch.setattr(handler_class, "close", handler_class.close)  # put back after the test
    _wake_stopped_workers()
    ready = tmp_path / "ready"
    rank = ("import signal, sys, time, pathlib; signal.signal(signal.SIGTERM, lambda *a: sys.exit(7)); "
            f"pathlib.Path({str(ready)!r}).touch(); time.sleep(30)")
    handler = handler_class(sys.executable, ("-c", rank), {}, None, None, 0, None)
    try:
        for _ in range(1000):
            if ready.exists():
                break
            time.sleep(0.01)
        os.kill(handler.proc.pid, signal.SIGSTOP)
        handler.close(signal.SIGTERM)
        assert handler.proc.wait(timeout=10) == 7  # its SIGTERM handler ran
    finally:
        handler.proc.kill()
        handler.proc.wait()


def test_save_that_cannot_fit_is_refused_before_megatron_writes(tmp_path, monkeypatch):
    """A rank's own state is a lower bound of the checkpoint: with less free space the save is one line (before
    megatron's writers print their own failure), with enough it goes ahead."""
    import shutil
    from collections import namedtuple

    import torch

    from megatron_patch.errors import UserError
    from megatron_patch.training import checkpointing

    state = {"model": {"w": torch.zeros(100)}, "optimizer": [torch.zeros(50, dtype=torch.float64)]}
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 799, 799))
    with pytest.raises(UserError, match=rf"no space left on the device of {tmp_path} \(the checkpoint needs at "
                                        r"least 800 bytes, 799 bytes free\)"):
        checkpointing._check_room(tmp_path, state)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 800, 800))
    checkpointing._check_room(tmp_path, state)
