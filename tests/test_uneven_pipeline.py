"""Uneven pipeline stages (Megatron-LM's --decoder-first/last-pipeline-num-layers, --pipeline-model-parallel-layout,
--account-for-*-in-pipeline-split): training equals the single-rank run, compare PASSes against HF, conversions
round-trip bit for bit, the real DeepSeek-V3 config is planned by a dry run, bad splits are one-line errors."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from megatron_patch.checkpoint import mcore_layout
from megatron_patch.convert.hf2mcore import hf2mcore
from megatron_patch.convert.mcore2hf import mcore2hf
from megatron_patch.convert.reshard import reshard
from megatron_patch.models.builder import SPLIT_FIELDS, ParallelLayout
from megatron_patch.runtime.multirank import run_ranks
from megatron_patch.testing.equivalence import layouts_run
from megatron_patch.verify.compare import CompareSpec, run_specs_in_group

from test_convert_roundtrip import assert_identical, read_all
from test_parallel_layouts import assert_matches_reference, reference  # noqa: F401 - a module-scoped fixture

REPO = Path(__file__).resolve().parents[1]
ENV = {"TORCHDYNAMO_DISABLE": "1"}
LOGITS_BAR = 1e-5  # as tests/test_compare.py
REAL_V3 = REPO / "tests" / "data" / "real_configs" / "deepseek-v3"


# ---------------------------------------------------------------------------------------------------
# training: loss, gradients, post-step weights equal the single-rank run (the 4-layer equivalence model)
# ---------------------------------------------------------------------------------------------------
# world size -> layouts run one after the other on those ranks (two spawns for four layouts)
UNEVEN = {
    2: [ParallelLayout(pp=2, decoder_first_pipeline_num_layers=1),                      # 1 | 3
        ParallelLayout(pp=2, pipeline_model_parallel_layout="Ett|t|t|L")],               # VPP2 from the string
    3: [ParallelLayout(pp=3, decoder_first_pipeline_num_layers=2),                      # 2 | 1 | 1
        ParallelLayout(pp=3, account_for_embedding_in_pipeline_split=True,               # 1 | 2 | 1
                       account_for_loss_in_pipeline_split=True)],
}


@pytest.mark.parametrize("world", list(UNEVEN))
def test_uneven_training_step_matches_single_rank(reference, world):
    ref_dir, ref = reference
    per_rank = run_ranks(layouts_run, world, timeout=300, args=(UNEVEN[world], ref_dir))
    for rank, results in enumerate(per_rank):
        for layout, res in zip(UNEVEN[world], results):
            assert_matches_reference(res, ref, (layout.describe(), rank))


# ---------------------------------------------------------------------------------------------------
# mini models with layer counts no even split takes
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minis(tmp_path_factory):
    from megatron_patch.convert.mini import make_mini

    root = tmp_path_factory.mktemp("uneven-minis")
    return {"v3": make_mini("deepseek_v3", root / "v3", layers=3, seed=5),        # odd, MTP on the last stage
            "v2lite": make_mini("deepseek_v2", root / "v2lite", layers=5, seed=5)}  # V2-Lite shape (no q_lora)


COMPARE = [
    ("v3", ParallelLayout(pp=2, decoder_first_pipeline_num_layers=1)),
    ("v3", ParallelLayout(pp=2, decoder_last_pipeline_num_layers=1)),
    ("v3", ParallelLayout(pp=2, pipeline_model_parallel_layout="Et|t|t|mL")),          # VPP2, MTP on the last stage
    ("v2lite", ParallelLayout(pp=2, decoder_last_pipeline_num_layers=2)),               # 3 | 2
    ("v2lite", ParallelLayout(pp=2, pipeline_model_parallel_layout="Et|tt|t|tL")),      # VPP2: 2 | 3 layers
]


# and the same split loaded from `convert hf2mcore` files (torch per-rank, torch_dist)
FROM_FILES = [("v3", COMPARE[0][1], "torch"), ("v3", COMPARE[1][1], "torch_dist")]


@pytest.fixture(scope="module")
def compare_reports(minis, tmp_path_factory):
    specs = [CompareSpec(hf_path=str(minis[m]), layout=layout) for m, layout in COMPARE]
    root = tmp_path_factory.mktemp("uneven-ckpts")
    for m, layout, fmt in FROM_FILES:
        hf2mcore(minis[m], root / fmt, layout, fmt=fmt)
        specs.append(CompareSpec(hf_path=str(minis[m]), layout=layout, mcore_path=str(root / fmt)))
    return run_ranks(run_specs_in_group, 2, timeout=600, args=(specs,), env=ENV)[0]


CASES = [(m, layout, "in memory") for m, layout in COMPARE] + FROM_FILES


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{m}-{l.describe()}-{how}" for m, l, how in CASES])
def test_compare_passes_at_uneven_pp(compare_reports, case):
    report = compare_reports[case]
    failed = [(r["component"], r["layer"], r["max_abs"]) for r in report["rows"] if not r["passed"]]
    assert report["result"] == "PASS", failed
    assert report["logits"]["max_abs"] <= LOGITS_BAR and report["logits"]["top1_agreement"] == 1.0
    assert {"embedding", "final_norm", "logits"} <= {r["component"] for r in report["rows"]}
    layers = {r["layer"] for r in report["rows"] if r["component"] == "attention"}
    assert layers == set(range(report["model"]["num_layers"]))  # every layer ran on some stage


def test_round_trips_and_reshard_are_bit_exact(minis, tmp_path):
    hf = read_all(minis["v3"])
    first = ParallelLayout(pp=2, decoder_first_pipeline_num_layers=1)
    hf2mcore(minis["v3"], tmp_path / "first1", first)
    # Megatron-LM's names and args: one directory per PP rank, the split in the stored args and our meta
    assert sorted(p.name for p in (tmp_path / "first1" / "release").iterdir()) == ["mp_rank_00_000", "mp_rank_00_001"]
    _, sizes = mcore_layout.read_layout(tmp_path / "first1")
    assert sizes["decoder_first_pipeline_num_layers"] == 1 and "decoder_last_pipeline_num_layers" not in sizes
    stage0 = mcore_layout.read_rank(tmp_path / "first1", 0, 0, 0)[0]
    assert {k.split(".")[2] for k in stage0 if k.startswith("decoder.layers.")} == {"0"}
    meta = json.loads((tmp_path / "first1" / "convert_meta.json").read_text())
    assert meta["layout"]["decoder_first_pipeline_num_layers"] == 1
    mcore2hf(tmp_path / "first1", tmp_path / "back")
    assert_identical(hf, tmp_path / "back")
    # args written before uneven PP existed (no split fields): the reader counts each stage's layers
    legacy = tmp_path / "legacy"
    shutil.copytree(tmp_path / "first1", legacy)
    for path in legacy.glob("release/*/model_optim_rng.pt"):
        ckpt = torch.load(path, weights_only=False)
        for name in SPLIT_FIELDS:
            delattr(ckpt["args"], name)
        torch.save(ckpt, path)
    (legacy / "convert_meta.json").unlink()
    assert mcore_layout.read_layout(legacy)[1]["decoder_first_pipeline_num_layers"] == 1
    mcore2hf(legacy, tmp_path / "back-legacy")
    assert_identical(hf, tmp_path / "back-legacy")
    # uneven -> even -> another uneven split (and the layout string), each back to the same bytes
    reshard(tmp_path / "first1", tmp_path / "even", ParallelLayout(pp=3))
    reshard(tmp_path / "even", tmp_path / "last1", ParallelLayout(pp=2, decoder_last_pipeline_num_layers=1))
    reshard(tmp_path / "last1", tmp_path / "str", ParallelLayout(pp=2, pipeline_model_parallel_layout="Et|t|t|mL"))
    for name in ("even", "last1", "str"):
        mcore2hf(tmp_path / name, tmp_path / f"back-{name}")
        assert_identical(hf, tmp_path / f"back-{name}")
    _, sizes = mcore_layout.read_layout(tmp_path / "str")
    assert sizes["vpp"] == 2 and sizes["pipeline_model_parallel_layout"] == "Et|t|t|mL"


# ---------------------------------------------------------------------------------------------------
# the command line: the real DeepSeek-V3 config planned by a dry run, one-line errors
# ---------------------------------------------------------------------------------------------------
def test_real_deepseek_v3_dry_run_and_invalid_splits(minis, tmp_path, capsys):
    from megatron_patch.convert.hf2mcore import plan_lines
    from megatron_patch.errors import UserError

    lines = plan_lines(REAL_V3, ParallelLayout(pp=16, decoder_first_pipeline_num_layers=4,
                                               decoder_last_pipeline_num_layers=1))
    assert lines[1] == "pp rank 0: embedding, layers 0-3 (4)  [mp_rank_00_000]"
    assert all(lines[1 + p].startswith(f"pp rank {p}: layers {4 * p}-{4 * p + 3} (4)") for p in range(1, 15))
    assert lines[16].startswith("pp rank 15: layers 60-60 (1), final norm, MTP, output layer")
    # Megatron-LM's DeepSeek-V3 layout string at PP8: VPP4, MTP and the loss on the last stage
    text = "\n".join(plan_lines(REAL_V3, ParallelLayout(pp=8, pipeline_model_parallel_layout="Et|(tt|)*30mL")))
    assert "pp rank 0 vp stage 0: embedding, layers 0-0 (1)" in text
    assert "pp rank 6 vp stage 3: layers 59-60 (2), final norm" in text
    assert "pp rank 7 vp stage 3: MTP, output layer" in text
    bad = [(dict(pp=8, decoder_first_pipeline_num_layers=4, decoder_last_pipeline_num_layers=1),
            "4 (first) + 1 (last) leave 56 of num_layers=61, which 6 middle stage(s) x VPP=1 do not divide"),
           (dict(pp=8, pipeline_model_parallel_layout="Ett|(tt|)*30mL"), "places 62 decoder layers (t) but the model "
            "has num_layers=61"),
           (dict(pp=8, pipeline_model_parallel_layout="Et|(tt|)*29mL"), "has 31 stages, not a multiple of PP=8"),
           (dict(pp=8, decoder_first_pipeline_num_layers=5, pipeline_model_parallel_layout="Et|(tt|)*30mL"),
            "cannot be combined")]
    for fields, text in bad:
        with pytest.raises(UserError, match=re.escape(text)):
            plan_lines(REAL_V3, ParallelLayout(**fields))
    # the command line: the dry run prints, writes nothing; a bad split is one line and exit 2
    from megatron_patch.cli import main

    cli = ["convert", "hf2mcore", "--hf-path", str(minis["v3"]), "--pp", "2"]
    assert main(cli + ["--out", str(tmp_path / "x"), "--decoder-first-pipeline-num-layers", "1", "--dry-run"]) == 0
    assert "pp rank 1: layers 1-2 (2), final norm, MTP, output layer" in capsys.readouterr().out
    assert main(cli + ["--out", str(tmp_path / "y"), "--decoder-first-pipeline-num-layers", "2",
                       "--decoder-last-pipeline-num-layers", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: uneven pipeline: 2 (first) + 2 (last) leave -1 of num_layers=3") and err.count("\n") == 1
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
