"""Context parallelism (all-gather K/V in PortableCoreAttention, megatron's load-balanced split): the same loss,
gradients and post-step weights as the single-rank run at CP2, CP2xTP2 (SP), CP2xPP2, CP2xEP2, with the
distributed optimizer and with SFT loss masks; `compare --cp 2` PASSes against HF for every family."""
import pytest

from megatron_patch.models.builder import ParallelLayout
from megatron_patch.runtime.context_parallel import causal_chunks, restore_sequence
from megatron_patch.runtime.multirank import run_ranks
from megatron_patch.testing.equivalence import cases_run, references_run

# the bounds of tests/test_parallel_layouts.py
from test_parallel_layouts import assert_matches_reference

P2P = {"cp_comm_type": "p2p"}

# name -> (world, layout_run keywords). One spawn of 4 ranks runs them one after the other; CP2 without TP/PP
# leaves DP2 beside it (the distributed optimizer shards over DP x CP).
CASES = {
    "DP2xCP2": (4, dict(layout=ParallelLayout(cp=2))),
    "TP2xCP2+SP": (4, dict(layout=ParallelLayout(tp=2, cp=2, sp=True))),
    "CP2xPP2": (4, dict(layout=ParallelLayout(pp=2, cp=2))),
    "DP2xCP2xEP2": (4, dict(layout=ParallelLayout(ep=2, cp=2))),
    "CP2xPP2xEP2": (4, dict(layout=ParallelLayout(pp=2, ep=2, cp=2))),
    "DP2xCP2+distopt": (4, dict(layout=ParallelLayout(cp=2), dist_opt=True)),
    "TP2xCP2+SP+SFT-mask": (4, dict(layout=ParallelLayout(tp=2, cp=2, sp=True), sft=True)),
    "CP4": (4, dict(layout=ParallelLayout(cp=4))),
    # the ring (--cp-comm-type p2p): CP2 passes one hop between two peers, CP4 three hops around four ranks
    "TP2xCP2+SP p2p": (4, dict(layout=ParallelLayout(tp=2, cp=2, sp=True), overrides=P2P)),
    "CP4 p2p": (4, dict(layout=ParallelLayout(cp=4), overrides=P2P)),
}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """The single-rank runs of the plain and the SFT-masked batch (one spawn): sft -> (dir, result)."""
    dirs = {sft: str(tmp_path_factory.mktemp("sft-reference" if sft else "reference")) for sft in (False, True)}
    (results,) = run_ranks(references_run, 1, timeout=240, args=([(dirs[s], s) for s in dirs],))
    return {sft: (dirs[sft], res) for sft, res in zip(dirs, results)}


@pytest.fixture(scope="module")
def cp_runs(references):
    """name -> per-rank layout_run results, lazily one spawn per world size; ("ring", world) -> per-rank
    ring_against_full_attention results of that spawn."""
    done = {}

    def get(name, world=None):
        world = world or CASES[name][0]
        if world not in done:
            names = [n for n, (w, _) in CASES.items() if w == world]
            cases = [dict(CASES[n][1], ref_dir=references[CASES[n][1].get("sft", False)][0]) for n in names]
            per_rank = run_ranks(cases_and_ring_run, world, timeout=400, args=(cases,))
            done[world] = {n: [results[i] for results, _ in per_rank] for i, n in enumerate(names)}
            done[world]["ring"] = [ring for _, ring in per_rank]
        return done[world][name]
    return get


def cases_and_ring_run(rank, world, cases):
    return cases_run(rank, world, cases), ring_against_full_attention(rank, world)


def ring_against_full_attention(rank, world) -> dict:
    """ring_attention on this rank's chunks against fp64 causal attention over the whole sequence, GQA
    (4 query heads over 2 K/V heads) with MLA's head dims (q/k 24, v 16), on CP groups of 2 and of `world`:
    case -> {tensor: (max diff on this rank's rows, max |reference|)}."""
    import torch
    import torch.distributed as dist

    from megatron_patch.runtime.context_parallel import chunk_ids
    from megatron_patch.runtime.ring_attention import ring_attention

    pairs = [dist.new_group([r, r + 1]) for r in range(0, world, 2)]
    groups = {f"cp{world}": dist.group.WORLD} if world > 2 else {}
    groups["cp2"] = pairs[rank // 2]
    gen = torch.Generator().manual_seed(11)
    b, h, hk, seq, d, dv, scale = 2, 4, 2, 32, 24, 16, 0.3
    full = {"q": torch.randn(b, h, seq, d, generator=gen, dtype=torch.float64),
            "k": torch.randn(b, hk, seq, d, generator=gen, dtype=torch.float64),
            "v": torch.randn(b, hk, seq, dv, generator=gen, dtype=torch.float64)}
    dout = torch.randn(b, h, seq, dv, generator=gen, dtype=torch.float64)
    ref = {n: t.clone().requires_grad_() for n, t in full.items()}
    ref_out = torch.nn.functional.scaled_dot_product_attention(ref["q"], ref["k"], ref["v"], is_causal=True,
                                                               scale=scale, enable_gqa=True)
    ref_out.backward(dout)
    out = {}
    for name, group in groups.items():
        cp, chunk = group.size(), seq // (2 * group.size())
        rows = torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in chunk_ids(cp, group.rank())])
        local = {n: t[:, :, rows].float().requires_grad_() for n, t in full.items()}
        result = ring_attention(local["q"], local["k"], local["v"], scale, group)
        result.backward(dout[:, :, rows].float())
        diff = lambda mine, theirs: ((mine.double() - theirs).abs().max().item(), theirs.abs().max().item())
        out[name] = {"out": diff(result.detach(), ref_out.detach()[:, :, rows]),
                     **{f"d{n}": diff(local[n].grad, ref[n].grad[:, :, rows]) for n in full}}
    return out


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


# fp32 against fp64 (values ~1-3): blocks merged by log-sum-exp; measured worst 3.2 ulps of the magnitude
RING_ULPS = 8


@pytest.mark.parametrize("cp", [2, 4])
def test_masked_and_blocked_gathered_attention_equal_full_attention(cp):
    """The two all_gather paths on every CP rank's chunks (MLA head dims), single process: the [chunk, prefix]
    mask path (NPU) and the blocked path (CPU: prefix whole + diagonal causally, custom backward) against fp64
    causal attention over the whole sequence, outputs and (blocked) gradients."""
    import torch

    from megatron_patch.runtime.blocked_attention import gathered_causal_attention
    from megatron_patch.runtime.context_parallel import chunk_ids, masked_chunk_attention
    from megatron_patch.runtime.kernels.attention import core_attention
    from megatron_patch.testing.equivalence import FP32_EPS

    gen = torch.Generator().manual_seed(5)
    seq, scale = 32, 0.3
    q, k = (torch.randn(2, 4, seq, 24, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 4, seq, 16, generator=gen, dtype=torch.float64)
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out = torch.nn.functional.scaled_dot_product_attention(*ref, is_causal=True, scale=scale)
    ref_out.sum().backward()
    chunk = seq // (2 * cp)
    dk = dv = 0  # every rank's key/value gradients add up to the whole sequence's (what reduce-scatter does)
    for rank in range(cp):
        rows = torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in chunk_ids(cp, rank)])
        want = ref_out.detach()[:, :, rows]
        bound = RING_ULPS * FP32_EPS * want.abs().max().item()
        q32, k32, v32 = (t.float().requires_grad_() for t in (q[:, :, rows], k, v))
        masked = masked_chunk_attention(q32, k32, v32, scale, cp, rank, core_attention)
        assert (masked.double() - want).abs().max().item() <= bound, (cp, rank, "masked")
        blocked = gathered_causal_attention(q32, k32, v32, scale, cp, rank)
        assert (blocked.double() - want).abs().max().item() <= bound, (cp, rank, "blocked")
        blocked.sum().backward()
        assert (q32.grad.double() - ref[0].grad[:, :, rows]).abs().max() <= RING_ULPS * FP32_EPS * \
            ref[0].grad.abs().max(), (cp, rank, "dq")
        dk, dv = dk + k32.grad.double(), dv + v32.grad.double()
    for name, got, want in (("dk", dk, ref[1].grad), ("dv", dv, ref[2].grad)):
        assert (got - want).abs().max() <= RING_ULPS * FP32_EPS * want.abs().max(), (cp, name)


@pytest.mark.parametrize("path", ["cpu_flash", "math"])
def test_attention_blocks_merge_to_full_attention(path):
    """Two key blocks (a full one and a causal diagonal one) merged by log-sum-exp, and their backward given
    the merged output and log-sum-exp, equal fp64 causal attention over all keys (MLA head dims)."""
    import torch

    from megatron_patch.runtime.blocked_attention import merge_lse
    from megatron_patch.runtime.kernels import attention_blocks as blocks
    from megatron_patch.testing.equivalence import FP32_EPS

    fwd, bwd = ((blocks.attention_lse, blocks.attention_lse_backward) if path == "cpu_flash" else
                (blocks.attention_lse_math, blocks.attention_lse_backward_math))
    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, 4, 16, 24, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 4, 16, 16, generator=gen, dtype=torch.float64)
    dout = torch.zeros(2, 4, 16, 16, dtype=torch.float64)
    dout[:, :, 8:] = torch.randn(2, 4, 8, 16, generator=gen, dtype=torch.float64)  # rows 8..15 are ours
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out = torch.nn.functional.scaled_dot_product_attention(*ref, is_causal=True, scale=0.3)
    ref_out.backward(dout)
    q32, k32, v32, g32 = q[:, :, 8:].float(), k.float(), v.float(), dout[:, :, 8:].float()
    keys = {0: (slice(0, 8), False), 1: (slice(8, 16), True)}  # keys 0..7 seen whole, 8..15 causally
    out = lse = None
    for cols, causal in keys.values():
        o, s = fwd(q32, k32[:, :, cols], v32[:, :, cols], scale=0.3, causal=causal)
        out, lse = merge_lse(out, lse, o.float(), s)
    grads = [bwd(g32, q32, k32[:, :, cols], v32[:, :, cols], out, lse, scale=0.3, causal=causal)
             for cols, causal in keys.values()]
    got = {"out": out, "dq": grads[0][0] + grads[1][0], "dk": torch.cat([grads[0][1], grads[1][1]], dim=2),
           "dv": torch.cat([grads[0][2], grads[1][2]], dim=2)}
    want = {"out": ref_out[:, :, 8:], "dq": ref[0].grad[:, :, 8:], "dk": ref[1].grad, "dv": ref[2].grad}
    for name in got:
        diff, scale = (got[name].double() - want[name]).abs().max().item(), want[name].abs().max().item()
        assert diff <= RING_ULPS * FP32_EPS * scale, (name, diff, scale)


def test_ring_attention_against_full_attention(cp_runs):
    from megatron_patch.testing.equivalence import FP32_EPS

    for rank, cases in enumerate(cp_runs("ring", 4)):
        assert set(cases) == {"cp2", "cp4"}
        for case, tensors in cases.items():
            for name, (diff, scale) in tensors.items():
                assert diff <= RING_ULPS * FP32_EPS * scale, (rank, case, name, diff, scale)


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
    from megatron_patch.convert.mini import make_mini
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
