"""Context parallelism (all-gather K/V in PortableCoreAttention, megatron's load-balanced split): the same loss,
gradients and post-step weights as the single-rank run at CP2, CP2xTP2 (SP), CP2xPP2, CP2xEP2, with the
distributed optimizer and with SFT loss masks; `compare --cp 2` PASSes against HF for every family."""
import pytest

from megatron_patch.models.builder import ParallelLayout
from megatron_patch.runtime.context_parallel import causal_chunks, restore_sequence
from megatron_patch.testing.equivalence import cases_run, references_run
from megatron_patch.testing.multirank import run_ranks

# the bounds of tests/test_parallel_layouts.py
from test_parallel_layouts import assert_matches_reference

# name -> (world, layout_run keywords). One spawn per world size runs its cases one after the other. CP2
# alone leaves DP1 (distributed optimizer sharded over CP); at 4 ranks CP2 without TP/PP/EP runs beside DP2.
CASES = {
    "CP2": (2, dict(layout=ParallelLayout(cp=2))),
    "CP2+distopt": (2, dict(layout=ParallelLayout(cp=2), dist_opt=True)),
    "CP2+SFT-mask": (2, dict(layout=ParallelLayout(cp=2), sft=True)),
    "TP2xCP2+SP": (4, dict(layout=ParallelLayout(tp=2, cp=2, sp=True))),
    "CP2xPP2": (4, dict(layout=ParallelLayout(pp=2, cp=2))),
    "DP2xCP2xEP2": (4, dict(layout=ParallelLayout(ep=2, cp=2))),
    "CP2xPP2xEP2": (4, dict(layout=ParallelLayout(pp=2, ep=2, cp=2))),
    "DP2xCP2+distopt": (4, dict(layout=ParallelLayout(cp=2), dist_opt=True)),
    "TP2xCP2+SP+SFT-mask": (4, dict(layout=ParallelLayout(tp=2, cp=2, sp=True), sft=True)),
}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """The single-rank runs of the plain and the SFT-masked batch (one spawn): sft -> (dir, result)."""
    dirs = {sft: str(tmp_path_factory.mktemp("sft-reference" if sft else "reference")) for sft in (False, True)}
    (results,) = run_ranks(references_run, 1, timeout=240, args=([(dirs[s], s) for s in dirs],))
    return {sft: (dirs[sft], res) for sft, res in zip(dirs, results)}


@pytest.fixture(scope="module")
def cp_runs(references):
    """name -> per-rank layout_run results, lazily one spawn per world size."""
    done = {}

    def get(name):
        world = CASES[name][0]
        if world not in done:
            names = [n for n, (w, _) in CASES.items() if w == world]
            cases = [dict(CASES[n][1], ref_dir=references[CASES[n][1].get("sft", False)][0]) for n in names]
            per_rank = run_ranks(cases_run, world, timeout=400, args=(cases,))
            done[world] = {n: [results[i] for results in per_rank] for i, n in enumerate(names)}
        return done[world][name]
    return get


def test_chunk_order_and_masks():
    import torch

    # CP2: 4 chunks; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2 -> gathered order 0, 3, 1, 2
    gathered = torch.tensor([0, 3, 1, 2]).repeat_interleave(2)
    assert restore_sequence(gathered, 2).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    (rows0, seen0, mask0), (rows3, seen3, mask3) = causal_chunks(2, 0, 2, "cpu")
    assert (rows0, seen0, rows3, seen3) == (slice(0, 2), 2, slice(2, 4), 8)
    assert mask0.tolist() == [[False, True], [False, False]]
    assert mask3.tolist() == [[False] * 7 + [True], [False] * 8]  # positions 6 and 7 see keys 0..6 / 0..7


@pytest.mark.parametrize("name", list(CASES))
def test_context_parallel_matches_single_rank(references, cp_runs, name):
    world, case = CASES[name]
    sft = case.get("sft", False)
    ref = references[sft][1]
    if sft:  # the masked batch is another loss: a CP rank that mis-weights its masked chunk would show
        assert abs(ref["loss"] - references[False][1]["loss"]) > 1e-3
    for rank, res in enumerate(cp_runs(name)):
        # the distributed optimizer reduce-scatters: each rank holds only its gradient shard
        assert ("grad_diff" in res) != case.get("dist_opt", False)
        assert_matches_reference(res, ref, (name, rank))


COMPARE = [
    ("deepseek_v2", ParallelLayout(cp=2)),  # make-mini's deepseek_v2 is V2-Lite shaped (no q-LoRA)
    ("qwen2", ParallelLayout(cp=2)),
    ("deepseek_v3", ParallelLayout(cp=2)),
    ("deepseek_v3", ParallelLayout(tp=2, cp=2)),
    ("qwen3_moe", ParallelLayout(cp=2)),
    ("qwen3_moe", ParallelLayout(cp=2, ep=2)),
]


@pytest.fixture(scope="module")
def compare_reports(tmp_path_factory):
    from megatron_patch.models.mini import make_mini
    from megatron_patch.verify.compare import CompareSpec, run_specs_in_group

    root = tmp_path_factory.mktemp("cp-minis")
    minis = {f: str(make_mini(f, root / f, seed=5)) for f in {f for f, _ in COMPARE}}
    specs = [CompareSpec(hf_path=minis[f], layout=layout, seq_length=64) for f, layout in COMPARE]
    return run_ranks(run_specs_in_group, 4, timeout=600, args=(specs,), env={"TORCHDYNAMO_DISABLE": "1"})[0]


@pytest.mark.parametrize("index", range(len(COMPARE)), ids=[f"{f}-{lay.describe()}" for f, lay in COMPARE])
def test_compare_with_context_parallel_passes_against_hf(compare_reports, index):
    report = compare_reports[index]
    assert report["layout"]["cp"] == 2 and report["seq_length"] == 64
    failed = [(r["component"], r["layer"], r["max_abs"]) for r in report["rows"] if not r["passed"]]
    assert report["result"] == "PASS", failed
    assert report["logits"]["max_abs"] <= 1e-5 and report["logits"]["top1_agreement"] == 1.0
