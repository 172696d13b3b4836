"""Re-run the fault cases of issue 14 as a user would (tiny make-mini models, the real CLI, torchrun and the
Pai launcher) and print one markdown row per case: case, command, exit code, first stderr line, what was
left behind or lost.

    python toolkits/faults/fault_table.py WORKDIR [--only SUBSTRING ...]

Needs nothing but this repository's venv; the read-only and disk-full rows mount small tmpfs when run as
root (otherwise they use chmod / `ulimit -f`). Takes several minutes on 2 cores.
"""
from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PY = os.environ.get("PY", sys.executable)
MP = [PY, "-m", "megatron_patch.cli"]
TORCHRUN = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
ENV = dict(os.environ, PYTHONPATH=str(REPO), TORCHDYNAMO_DISABLE="1", CUDA_VISIBLE_DEVICES="")


def expose_entry_points(where):
    """pyproject's torchrun.handlers entry point as `pip install -e .` records it, for a venv installed from an
    older checkout (the rows then show what a fresh `make venv` gives)."""
    import tomllib
    from importlib import metadata

    plugins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["torchrun.handlers"]
    if all(metadata.entry_points(group="torchrun.handlers").select(name=name) for name in plugins):
        return
    info = where / "entry_points" / "megatron_patch_table-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: megatron-patch-table\nVersion: 0\n")
    (info / "entry_points.txt").write_text("[torchrun.handlers]\n" + "".join(f"{k} = {v}\n" for k, v in plugins.items()))
    ENV["PYTHONPATH"] += os.pathsep + str(info.parent)
ROWS: list[tuple] = []


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def sh(argv, env=None, timeout=600, cwd=None):
    start = time.time()
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                          env={**ENV, **(env or {})}, cwd=cwd)
    return proc.returncode, proc.stdout, proc.stderr, time.time() - start


TORCHRUN_BANNER = ("*****", "Setting OMP_NUM_THREADS")


def first_line(text):
    """The first stderr line, torchrun's own OMP_NUM_THREADS banner skipped."""
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith(TORCHRUN_BANNER)]
    return lines[0][:220] if lines else "(none)"


def counts(text):
    errors = sum(1 for line in text.splitlines() if line.startswith("error:"))
    tracebacks = sum(1 for line in text.splitlines() if "Traceback (most recent call last)" in line)
    return f"{errors} error: line(s), {tracebacks} traceback(s)"


def snapshot(path):
    path = Path(path)
    return {p: p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()} if path.exists() else {}


def leftovers(out):
    out = Path(out)
    return sorted(p.name for p in out.parent.glob(f".{out.name}*")) + (["OUT exists"] if out.exists() else [])


def row(case, cmd, rc, err, notes):
    cmd_text = " ".join(str(c) for c in cmd).replace(str(W), "W").replace(PY, "python")[:160]
    ROWS.append((case, cmd_text, rc, first_line(err).replace("|", "/").replace(str(W), "W"), notes))
    print(f"| {case} | `{cmd_text}` | {rc} | {ROWS[-1][3]} | {notes} |", flush=True)


def case(name, argv, out=None, inputs=(), marker=None, env=None, timeout=600, expect=None):
    if ONLY and not any(o in name for o in ONLY):
        return None
    if out is not None and Path(out).is_dir() and W in Path(out).parents:
        shutil.rmtree(out)  # an earlier table run's output
    before = [snapshot(p) for p in inputs]
    rc, stdout, stderr, secs = sh(argv, env=env, timeout=timeout)
    notes = []
    if marker is not None:
        notes.append("PAYLOAD RAN" if Path(marker).exists() else "payload did not run")
        Path(marker).unlink(missing_ok=True)
    if out is not None:
        left = leftovers(out)
        notes.append(f"left: {', '.join(left)}" if left else "nothing left")
    lost = [str(p) for p, b in zip(inputs, before) if snapshot(p) != b]
    if inputs:
        notes.append(f"LOST/CHANGED: {', '.join(lost)}" if lost else "inputs intact")
    notes.append(counts(stderr + stdout))
    if expect:
        notes.append(expect(rc, stdout, stderr, secs))
    row(name, argv, rc, stderr or stdout, "; ".join(n for n in notes if n))
    return rc, stdout, stderr


def port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def setup():
    import torch

    sys.path.insert(0, str(REPO))
    W.mkdir(parents=True, exist_ok=True)
    for name, layers in (("hf", 2), ("hf4", 4)):
        if not (W / name).exists():
            sh([*MP, "make-mini", "--family", "qwen2", "--out", W / name, "--layers", layers])
    for name, src, fmt in (("torch", "hf", "torch"), ("dist", "hf", "torch_dist"), ("torch4", "hf4", "torch")):
        if not (W / name).exists():
            sh([*MP, "convert", "hf2mcore", "--hf-path", W / src, "--out", W / name, "--format", fmt])
    shutil.rmtree(W / "torch4" / "hf_config", ignore_errors=True)  # a Megatron-LM checkpoint: --hf-config needed
    if not (W / "data.bin").exists():
        sh([*MP, "preprocess", "--input", REPO / "examples/data/corpus.txt", "--tokenizer", W / "hf",
            "--output-prefix", W / "data", "--append-eod"])
    marker = W / "PAYLOAD_RAN"

    def tamper_pt(path):
        ck = torch.load(path, weights_only=False)
        ck["args"].note = Payload(marker)
        torch.save(ck, path)

    def tamper_md(path):
        md = pickle.load(open(path, "rb"))
        md.mcore_data = {"x": Payload(marker)}
        pickle.dump(md, open(path, "wb"))

    def as_training_run(d):  # iter_0000001 + tracker + scheduler state + LoRA args: what train --load / lora2peft read
        os.rename(d / "release", d / "iter_0000001")
        (d / "latest_checkpointed_iteration.txt").write_text("1")
        state = torch.load(d / "iter_0000001/common.pt", weights_only=False)
        args = state["args"] if isinstance(state["args"], dict) else vars(state["args"])
        state.update(opt_param_scheduler={"num_steps": 1}, args={**args, "lora_rank": 4, "lora_target": "q_proj"})
        torch.save(state, d / "iter_0000001/common.pt")

    def tamper_common(path):
        state = torch.load(path, weights_only=False)
        state["args"]["note"] = Payload(marker)
        torch.save(state, path)

    for name, src, rel, fn in (("bad_pt", "torch", "release/mp_rank_00/model_optim_rng.pt", tamper_pt),
                               ("bad_metadata", "dist", "release/.metadata", tamper_md),
                               ("bad_common", "dist", "release/common.pt", tamper_pt),
                               ("bad_run_metadata", "dist", "iter_0000001/.metadata", tamper_md),
                               ("bad_run_common", "dist", "iter_0000001/common.pt", tamper_common)):
        if not (W / name).exists():
            shutil.copytree(W / src, W / name)
            if "run" in name:
                as_training_run(W / name)
            fn(W / name / rel)
    return marker


def edited_pt(name, edit, src="torch"):
    import torch

    dst = W / name
    if not dst.exists():
        shutil.copytree(W / src, dst)
        path = dst / "release/mp_rank_00/model_optim_rng.pt"
        ck = torch.load(path, weights_only=False)
        edit(ck)
        torch.save(ck, path)
    return dst


TRAIN = ["--micro-batch-size", "2", "--global-batch-size", "2", "--seq-length", "32", "--lr", "1e-3"]


def main():
    import json

    import torch

    expose_entry_points(W)
    marker = setup()
    hf, hf4, data = W / "hf", W / "hf4", W / "data"
    norm = "decoder.final_layernorm.weight"
    readers = {
        "mcore2hf": lambda src, out: [*MP, "convert", "mcore2hf", "--mcore-path", src, "--out", out],
        "reshard": lambda src, out: [*MP, "convert", "reshard", "--mcore-path", src, "--out", out, "--tp", 1, "--pp", 1,
                                     "--ep", 1],
        "compare": lambda src, out: [*MP, "compare", "--hf-path", hf, "--mcore-path", src],
        "train --load": lambda src, out: [*MP, "train", "--hf-config", hf, "--load", src, "--data-path", data, *TRAIN,
                                          "--train-iters", 1, "--save", out, "--no-load-optim"],
        "lora2peft": lambda src, out: [*MP, "convert", "lora2peft", "--mcore-path", src, "--hf-config", hf, "--out", out],
    }
    for bad in ("bad_pt", "bad_metadata", "bad_common", "bad_run_metadata", "bad_run_common"):
        for reader, argv in readers.items():
            if "run" in bad and reader not in ("train --load", "lora2peft"):
                continue  # mcore2hf/reshard/compare read the same files in release/ above
            out = W / f"out-{bad}-{reader.split()[0]}"
            case(f"pickle payload in {bad[4:]}: {reader}", argv(W / bad, out), out, [W / bad], marker)

    # data loss
    m = W / "M"
    if not m.exists():
        shutil.copytree(hf, m / "qwen2")
        (m / "unrelated.txt").write_text("keep me")
    case("hf2mcore --out = parent of --hf-path --force", [*MP, "convert", "hf2mcore", "--hf-path", m / "qwen2", "--out", m,
                                                          "--force"], None, [m])
    case("hf2mcore --out = --hf-path --force", [*MP, "convert", "hf2mcore", "--hf-path", hf, "--out", hf, "--force"], None, [hf])
    case("reshard --out = --mcore-path --force", [*MP, "convert", "reshard", "--mcore-path", W / "torch", "--out", W / "torch",
                                                  "--force", "--tp", 1, "--pp", 1, "--ep", 1], None, [W / "torch"])

    # silent wrong output
    for cmd in ("mcore2hf", "reshard"):
        out = W / f"out-4l-{cmd}"
        case(f"{cmd}: 4-layer ckpt, 2-layer --hf-config", [*readers[cmd](W / "torch4", out)[:-0 or None], "--hf-config", hf],
             out, [W / "torch4"])
    for name, edit in (("wrong-shape tensor", lambda ck: ck["model"].__setitem__(norm, torch.ones(7))),
                       ("int64 tensor", lambda ck: ck["model"].__setitem__(norm, ck["model"][norm].long())),
                       ("stray int32 tensor", lambda ck: ck["model"].__setitem__(norm, ck["model"][norm].int())),
                       ("stray fp16 tensor", lambda ck: ck["model"].__setitem__(norm, ck["model"][norm].half())),
                       (".pt = [1,2,3]", None)):
        src = W / name.replace(" ", "_").replace("[", "").replace("]", "").replace(",", "").replace("=", "")
        if edit is None:
            if not src.exists():
                shutil.copytree(W / "torch", src)
                torch.save([1, 2, 3], src / "release/mp_rank_00/model_optim_rng.pt")
        else:
            edited_pt(src.name, edit)
        out = W / f"out-{src.name}"
        case(f"mcore2hf: {name}", readers["mcore2hf"](src, out), out, [src])
    huge = W / "hf_huge"
    if not huge.exists():
        shutil.copytree(hf, huge)
        cfg = json.loads((huge / "config.json").read_text())
        (huge / "config.json").write_text(json.dumps({**cfg, "hidden_size": 10**12}))
    out = W / "out-huge"
    case("mcore2hf --hf-config hidden_size 1e12", [*readers["mcore2hf"](W / "torch", out), "--hf-config", huge], out,
         [W / "torch"])
    other = W / "hf_h96"
    if not other.exists():
        sh([*MP, "make-mini", "--family", "qwen2", "--out", other, "--layers", 2, "--hidden", 96])
    out = W / "out-hidden"
    case("mcore2hf --hf-config of another hidden size", [*readers["mcore2hf"](W / "torch", out), "--hf-config", other],
         out, [W / "torch"])

    big = W / "bigvocab"
    if not Path(str(big) + ".bin").exists():
        import numpy
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        builder = IndexedDatasetBuilder(str(big) + ".bin", dtype=numpy.int32)
        for _ in range(20):
            builder.add_document(torch.tensor(list(range(5, 60)) + [100000]), [56])
        builder.finalize(str(big) + ".idx")
    for launch in ("torchrun TP2",):
        out = W / "out-bigvocab"
        case(f"train, data from a larger vocabulary ({launch})",
             [*TORCHRUN, port(), "-m", "megatron_patch.training.pretrain", "--hf-config", hf, "--data-path", big, *TRAIN,
              "--train-iters", 2, "--tensor-model-parallel-size", 2, "--save", out], out, [hf])

    # bad config values
    for name, edit in (("num_hidden_layers 0", lambda c: {**c, "num_hidden_layers": 0}),
                       ("num_attention_heads 8.5", lambda c: {**c, "num_attention_heads": 8.5}),
                       ("config.json a JSON list", lambda c: [c])):
        bad = W / ("cfg_" + name.split()[0] + name.split()[-1].replace(".", ""))
        if not bad.exists():
            shutil.copytree(hf, bad)
            (bad / "config.json").write_text(json.dumps(edit(json.loads((hf / "config.json").read_text()))))
        out = W / f"out-{bad.name}"
        case(f"hf2mcore: {name}", [*MP, "convert", "hf2mcore", "--hf-path", bad, "--out", out], out, [bad])
    case("make-mini --set hidden_size=abc", [*MP, "make-mini", "--family", "qwen2", "--out", W / "m_abc", "--set",
                                             "hidden_size=abc"], W / "m_abc")
    # outputs
    (W / "afile").write_text("x")
    case("hf2mcore --out under a file", [*MP, "convert", "hf2mcore", "--hf-path", hf, "--out", W / "afile" / "out"], None,
         [W / "afile"])
    ro, small = W / "ro", W / "small"
    for d in (ro, small):
        d.mkdir(exist_ok=True)
        subprocess.run(["umount", d], capture_output=True)
    if os.getuid() == 0:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", ro], check=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", small], check=True)
    else:
        ro.chmod(0o555)
    try:
        case("hf2mcore --out on a read-only fs", [*MP, "convert", "hf2mcore", "--hf-path", hf, "--out", ro / "out"],
             ro / "out", [hf])
        if os.getuid() == 0:
            case("hf2mcore --out on a full disk (256 KiB tmpfs)", [*MP, "convert", "hf2mcore", "--hf-path", hf, "--out",
                                                                  small / "out"], small / "out", [hf])
            case("mcore2hf --out on a full disk", [*MP, "convert", "mcore2hf", "--mcore-path", W / "torch", "--out",
                                                   small / "hfout"], small / "hfout", [W / "torch"])
            case("train --save on a full disk", [*MP, "train", "--hf-config", hf, "--load-hf", hf, "--data-path", data,
                                                 *TRAIN, "--train-iters", 1, "--save", small / "run"], small / "run", [hf])
            # room for a rank's state (the up-front check passes) but not for the whole checkpoint: megatron's
            # writer fails, on DCP's coordinator only
            subprocess.run(["mount", "-o", "remount,size=6000k", small], check=True)
            case("train --save at 2 ranks on a nearly full disk (6000 KiB tmpfs)",
                 [*TORCHRUN, port(), "-m", "megatron_patch.training.pretrain", "--hf-config", hf, "--data-path", data,
                  *TRAIN[:2], "--global-batch-size", 4, *TRAIN[4:], "--train-iters", 1, "--save", small / "run2"],
                 small / "run2", [hf])
        case("hf2mcore under ulimit -f 64 (EFBIG)", ["bash", "-c", f"ulimit -f 64; exec {PY} -m megatron_patch.cli convert "
                                                     f"hf2mcore --hf-path {hf} --out {W / 'out-fsize'}"],
             W / "out-fsize", [hf])
    finally:
        for d in (ro, small):
            subprocess.run(["umount", d], capture_output=True)
    meta = W / "cut_metadata"
    if not meta.exists():
        shutil.copytree(W / "dist", meta)
        p = meta / "release/.metadata"
        p.write_bytes(p.read_bytes()[:40])
    case("mcore2hf: truncated .metadata", readers["mcore2hf"](meta, W / "out-cut"), W / "out-cut", [meta])
    (W / "garbage.jsonl").write_text('{"text": "ok"}\nnot json at all\n')
    case("preprocess: garbage .jsonl", [*MP, "preprocess", "--input", W / "garbage.jsonl", "--tokenizer", hf,
                                         "--output-prefix", W / "garbage_out"], W / "garbage_out.bin")
    case("preprocess: existing prefix, no --force", [*MP, "preprocess", "--input", REPO / "examples/data/corpus.txt",
                                                     "--tokenizer", hf, "--output-prefix", data], None,
         [Path(str(data) + ".bin"), Path(str(data) + ".idx")])
    for name, damage in (("corrupt .idx", lambda p: Path(p + ".idx").write_bytes(b"garbage")),
                         ("empty .bin", lambda p: Path(p + ".bin").write_bytes(b"")),
                         ("empty .idx", lambda p: Path(p + ".idx").write_bytes(b""))):
        prefix = str(W / ("data_" + name.replace(" ", "").replace(".", "")))
        for ext in (".bin", ".idx"):
            shutil.copy(str(data) + ext, prefix + ext)
        damage(prefix)
        case(f"train TP2 (torchrun): {name}", [*TORCHRUN, port(), "-m", "megatron_patch.training.pretrain", "--hf-config",
                                                hf, "--data-path", prefix, *TRAIN, "--train-iters", 1,
                                                "--tensor-model-parallel-size", 2],
             expect=lambda rc, so, se, s: f"{sum(1 for line in se.splitlines() if line.startswith('error:'))} error: lines,"
                                          f" {sum(1 for line in se.splitlines() if 'Traceback' in line)} tracebacks")
    case("train --load: checkpoint of another shape (4 layers, 2-layer config)",
         [*TORCHRUN, port(), "-m", "megatron_patch.training.pretrain", "--hf-config", hf, "--load", W / "torch4",
          "--data-path", data, *TRAIN, "--train-iters", 1, "--tensor-model-parallel-size", 2],
         expect=lambda rc, so, se, s: f"{sum(1 for line in se.splitlines() if 'Traceback' in line)} tracebacks")
    if not (W / "dist4").exists():
        sh([*MP, "convert", "hf2mcore", "--hf-path", hf4, "--out", W / "dist4", "--format", "torch_dist"])
        shutil.rmtree(W / "dist4" / "hf_config")
    case("train --load: torch_dist of 4 layers, 2-layer config (torchrun TP2)",
         [*TORCHRUN, port(), "-m", "megatron_patch.training.pretrain", "--hf-config", hf, "--load", W / "dist4",
          "--data-path", data, *TRAIN, "--train-iters", 1, "--tensor-model-parallel-size", 2])
    case("compare --mcore-path: torch_dist of 4 layers, 2-layer --hf-path", [*MP, "compare", "--hf-path", hf,
                                                                             "--mcore-path", W / "dist4"])
    case("train --load: checkpoint of another hidden size", [*MP, "train", "--hf-config", other, "--load", W / "torch",
                                                             "--data-path", data, *TRAIN, "--train-iters", 1])
    case("train: MASTER_PORT=abc", [*MP, "train", "--hf-config", hf, "--data-path", data, *TRAIN, "--train-iters", 1],
         env={"MASTER_PORT": "abc", "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"})
    case("compare: bad input (--tp 3)", [*MP, "compare", "--hf-path", hf, "--tp", 3])
    case("compare: --hf-path missing", [*MP, "compare", "--hf-path", W / "nope"])
    case("pretrain module: bad input (first stderr line)", [PY, "-m", "megatron_patch.training.pretrain", "--hf-config",
                                                            W / "nope", "--data-path", data, *TRAIN, "--train-iters", 1])
    case("torchrun pretrain: bad input", [*TORCHRUN, port(), "-m", "megatron_patch.training.pretrain", "--hf-config",
                                          W / "nope", "--data-path", data, *TRAIN, "--train-iters", 1])
    nan = ["--hf-config", hf, "--data-path", data, "--micro-batch-size", 2, "--global-batch-size", 4, "--seq-length", 32,
           "--lr", "1e30", "--clip-grad", "0", "--train-iters", 4]
    case("NaN stop: megatron-patch train (1 process)", [*MP, "train", *nan])
    case("NaN stop: torchrun -m megatron_patch.training.pretrain", [*TORCHRUN, port(), "-m",
                                                                    "megatron_patch.training.pretrain", *nan])
    case("NaN stop: torchrun megatron-patch train", [*TORCHRUN, port(), str(Path(PY).parent / "megatron-patch"), "train",
                                                     *nan])
    launcher = ["bash", REPO / "examples/qwen2/run_mcore_qwen2.sh", "local", "mini", 2, 2, "1e30", "1e29", 32, 32, "fp32",
                2, 1, 1, 1, 1, "false", "false", "false", "false", "none", "false", 100, data, "none", hf, 256, 0]
    case("NaN stop: examples/qwen2/run_mcore_qwen2.sh (TP2)", [*launcher, W / "launch-nan"], env={"PY": PY},
         expect=lambda rc, so, se, s: "")
    case("bad input: run_mcore_qwen2.sh (VALID_DATASET_PATH missing)", [*launcher[:-4], W / "nodata", *launcher[-3:], W / "launch-bad"],
         env={"PY": PY})
    hang(data, hf)
    exclusion(hf, data)
    leaks(hf, data)


def hang(data, hf):
    """Rank 1 of a 2-rank training is stopped (SIGSTOP) or killed (SIGKILL) during start-up (1 s after it started,
    in its imports) or mid-training (3 steps in, saving every step); then the same for `compare`'s ranks."""
    if ONLY and not any(o in "hung dead rank (SIGSTOP SIGKILL rank 1) start-up mid-training while running compare"
                        for o in ONLY):
        return
    import psutil

    for phase, label, sig in (("mid-training", "hung rank (SIGSTOP rank 1)", signal.SIGSTOP),
                              ("mid-training", "dead rank (SIGKILL rank 1)", signal.SIGKILL),
                              ("start-up", "hung rank (SIGSTOP rank 1)", signal.SIGSTOP),
                              ("start-up", "dead rank (SIGKILL rank 1)", signal.SIGKILL)):
        metrics = W / f"metrics-{sig.name}.jsonl"
        metrics.unlink(missing_ok=True)
        shutil.rmtree(W / "hang-save", ignore_errors=True)
        argv = [*TORCHRUN, port(), "-m", "megatron_patch.training.pretrain", "--hf-config", hf, "--data-path", data,
                *TRAIN[:2], "--global-batch-size", 4, *TRAIN[4:], "--train-iters", 400, "--heartbeat-timeout", 10,
                "--metrics-file", metrics, "--save", W / "hang-save", "--save-interval", 1]

        def ready(rank):
            if phase == "start-up":
                return time.time() - rank.create_time() > 1
            return (len(metrics.read_text().splitlines()) if metrics.exists() else 0) >= 3

        def victim(proc):  # the agent's own children (a rank's forked checkpoint writers carry its RANK too)
            kids = [c for c in psutil.Process(proc.pid).children() if "pretrain" in " ".join(c.cmdline())]
            return {c.environ().get("RANK"): c for c in kids if "RANK" in c.environ()}.get("1")

        signalled(f"{label} {phase}, torchrun, --heartbeat-timeout 10", argv, sig, victim, ready)
    for phase in ("start-up", "while running"):
        for label, sig in (("hung rank (SIGSTOP rank 1)", signal.SIGSTOP), ("dead rank (SIGKILL rank 1)", signal.SIGKILL)):
            argv = [*MP, "compare", "--hf-path", W / "hf4", "--tp", 2, "--seq-length", 512, "--heartbeat-timeout", 10]

            def victim(proc):  # the spawned ranks, in the order they were started
                kids = sorted((c for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())),
                              key=lambda c: (c.create_time(), c.pid))
                return kids[1] if len(kids) == 2 else None

            signalled(f"compare: {label} {phase}, --heartbeat-timeout 10", argv, sig, victim,
                      (lambda rank: time.time() - rank.create_time() > 1) if phase == "start-up" else in_group())


def in_group():
    """ready(rank): 1 s after the rank's process group started (its gloo threads exist): on a quiet box a
    compare rank finished its part within 2.5 s, so a later signal found nothing left to stop (exit 0)."""
    first = {}

    def ready(rank):
        names = [Path(f"/proc/{rank.pid}/task/{t.id}/comm").read_text() for t in rank.threads()]
        if any("gloo" in n for n in names):
            first.setdefault(rank.pid, time.time())
        return time.time() - first.get(rank.pid, time.time()) > 1.0

    return ready


def signalled(case_name, argv, sig, victim, ready):
    """Run argv, send `sig` to victim(proc) once ready(victim) holds; one row: exit code, the first `error:` line,
    seconds from the signal to the end, counts, and processes of the run left behind (then killed)."""
    import tempfile

    import psutil

    if ONLY and not any(o in case_name for o in ONLY):
        return
    with tempfile.TemporaryFile("w+") as errf:
        proc = subprocess.Popen([str(a) for a in argv], stdout=subprocess.DEVNULL, stderr=errf, text=True, env=ENV,
                                start_new_session=True)  # a timeout kills the agent and its ranks alike
        start, stopped, seen = time.time(), None, {}
        while proc.poll() is None and time.time() - (stopped or start) < 300:
            try:
                seen.update((c.pid, c) for c in psutil.Process(proc.pid).children(recursive=True))
                rank = victim(proc) if stopped is None else None
                if rank is not None and ready(rank):
                    rank.send_signal(sig)
                    stopped = time.time()
            except psutil.Error:
                pass
            time.sleep(0.2)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        secs = time.time() - (stopped or start)
        time.sleep(1)
        left = [c for c in seen.values() if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        for c in left:
            c.kill()
        errf.seek(0)
        err = errf.read()
    errs = [line for line in err.splitlines() if line.startswith("error:")]
    row(case_name, argv, proc.returncode, errs[0] if errs else err,
        f"ended {secs:.0f} s after the signal; {counts(err)}; {len(left)} process(es) of the run left behind")


def race(argv):
    """Start the same command twice at once: (sorted exit codes, stderr of one that failed)."""
    procs = [subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**ENV, "MASTER_PORT": port()}) for _ in range(2)]
    results = [p.communicate() + (p.returncode,) for p in procs]
    return sorted(r[2] for r in results), next((r[1] for r in results if r[2] != 0), "(none)")


def exclusion(hf, data):
    if ONLY and not any(o in "two writers exclusion" for o in ONLY):
        return
    out, save = W / "two-writers", W / "two-trainings"
    for path in (out, save):
        shutil.rmtree(path, ignore_errors=True)
    argv = [*MP, "convert", "hf2mcore", "--hf-path", hf, "--out", out]
    row("two hf2mcore to one --out at once", argv, *race(argv), f"left: {leftovers(out)}")
    argv = [*MP, "train", "--hf-config", hf, "--load-hf", hf, "--data-path", data, *TRAIN, "--train-iters", 3, "--save", save]
    row("two trainings on one --save at once", argv, *race(argv), f"save holds {sorted(p.name for p in save.iterdir())}")


def leaks(hf, data):
    if ONLY and not any(o in "killed leaks" for o in ONLY):
        return
    out = W / "killed-out"
    shutil.rmtree(out, ignore_errors=True)
    argv = [*MP, "convert", "hf2mcore", "--hf-path", W / "hf4", "--out", out]
    proc = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    while not list(out.parent.glob(f".{out.name}.tmp-*")) and proc.poll() is None:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    left = leftovers(out)
    rc, _, err, _ = sh(argv)
    row("hf2mcore SIGKILLed while writing, then run again", argv, f"-9, then {rc}", err,
        f"after kill: {left}; after the rerun: {leftovers(out)}")
    save = W / "stale-save"
    shutil.rmtree(save, ignore_errors=True)
    (save / ".iter_0000005.tmp").mkdir(parents=True)
    (save / ".iter_0000005.tmp" / "half").write_bytes(b"x" * 1000)
    argv = [*MP, "train", "--hf-config", hf, "--load-hf", hf, "--data-path", data, *TRAIN, "--train-iters", 1, "--save", save]
    rc, _, err, _ = sh(argv)
    row("train --save holding a killed save's .iter_0000005.tmp", argv, rc, err,
        f"save holds {sorted(p.name for p in save.iterdir())}")
    import tempfile

    before = set(Path(tempfile.gettempdir()).glob("mp-ranks-*"))
    argv = [*MP, "compare", "--hf-path", hf, "--tp", 2]
    proc = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    deadline = time.time() + 120
    while not (set(Path(tempfile.gettempdir()).glob("mp-ranks-*")) - before) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2)
    proc.kill()
    proc.wait()
    after_kill = set(Path(tempfile.gettempdir()).glob("mp-ranks-*")) - before
    time.sleep(3)  # its ranks notice the parent is gone
    rc, _, err, _ = sh(argv)
    still = {p for p in after_kill if p.exists()}
    row("compare SIGKILLed, then run again", argv, f"-9, then {rc}", err,
        f"scratch after kill: {len(after_kill)}; after the rerun: {len(still)}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path, help="where the models, data and outputs go (reused by a rerun)")
    parser.add_argument("--only", nargs="+", default=[], metavar="SUBSTRING", help="run the cases whose name has one")
    cli = parser.parse_args()
    W, ONLY = cli.workdir.absolute(), cli.only
    print("| case | command | exit | first stderr line | left / lost |\n|---|---|---|---|---|", flush=True)
    main()
