"""Context parallelism (all-gather K/V in PortableCoreAttention, megatron's load-balanced split):
the same loss, gradients and post-step weights as the single-rank run, and `compare --cp` PASSes vs HF."""
import pytest

from megatron_patch.models.builder import ParallelLayout
from megatron_patch.runtime.context_parallel import causal_chunks, restore_sequence
from megatron_patch.testing.equivalence import layout_run
from megatron_patch.runtime.multirank import run_ranks

# the single-rank reference and the bounds of tests/test_parallel_layouts.py
from test_parallel_layouts import assert_matches_reference, reference  # noqa: F401 - a module-scoped fixture

LAYOUTS = {
    "CP2": (2, ParallelLayout(cp=2)),
    "TP2xCP2+SP": (4, ParallelLayout(tp=2, cp=2, sp=True)),
    "CP2xPP2xEP2": (4, ParallelLayout(pp=2, ep=2, cp=2)),
}


def test_chunk_order_and_masks():
    import torch

    # CP2: 4 chunks; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2 -> gathered order 0, 3, 1, 2
    gathered = torch.tensor([0, 3, 1, 2]).repeat_interleave(2)
    assert restore_sequence(gathered, 2).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    (rows0, seen0, mask0), (rows3, seen3, mask3) = causal_chunks(2, 0, 2, "cpu")
    assert (rows0, seen0, rows3, seen3) == (slice(0, 2), 2, slice(2, 4), 8)
    assert mask0.tolist() == [[False, True], [False, False]]
    assert mask3.tolist() == [[False] * 7 + [True], [False] * 8]  # positions 6 and 7 see keys 0..6 / 0..7


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_context_parallel_matches_single_rank(reference, name):
    ref_dir, ref = reference
    world, layout = LAYOUTS[name]
    results = run_ranks(layout_run, world, timeout=240, args=(layout, ref_dir, False))
    for rank, res in enumerate(results):
        assert "grad_diff" in res  # no distributed optimizer here: every rank holds whole gradients
        assert_matches_reference(res, ref, (name, rank))


COMPARE = [
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
