"""MoE engine: grouped experts (one grouped GEMM) equal SequentialMLP; static-shape dispatch."""
import pytest
import torch

from megatron_patch.models.builder import ParallelLayout
from megatron_patch.runtime.kernels import moe
from megatron_patch.testing.equivalence import layout_run, over_bound, reference_run
from megatron_patch.runtime.multirank import run_ranks

# Same bounds as test_parallel_layouts: fp32, only the reduction order differs from the reference.
LOSS_TOL = 1e-6
GRAD_TOL = 1e-7
STEP_ULPS = 4
GROUPED = {"moe_grouped_gemm": True}


# ----------------------------------------------------------------------------------------------------------------
# the grouped GEMM kernels, forward and backward, against per-expert matmuls
# ----------------------------------------------------------------------------------------------------------------
def _gmm_case(counts, k=8, n=16, dtype=torch.float32, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts), k, generator=g).to(dtype).requires_grad_()
    w = torch.randn(len(counts), n, k, generator=g).to(dtype).requires_grad_()  # TE layout [E, out, in]
    dy = torch.randn(sum(counts), n, generator=g).to(dtype)
    return x, w, dy


def _per_expert(x, w, counts, dy):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = torch.cat([xs @ we.T for xs, we in zip(torch.split(x, counts), w)])
    y.backward(dy)
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_path_matches_per_expert_matmuls(dtype, monkeypatch):
    counts = [5, 0, 7, 4]
    x, w, dy = _gmm_case(counts, dtype=dtype)
    calls = []
    real = torch.nn.functional.grouped_mm
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    y = moe.grouped_matmul(x, w.transpose(1, 2), torch.tensor(counts))
    y.backward(dy)
    assert calls, "aligned fp32/bf16 shapes must take torch.nn.functional.grouped_mm"
    ref_y, ref_dx, ref_dw = _per_expert(x, w, counts, dy)
    # the same products summed in another order: a few ulps of the magnitudes (k = 8 terms)
    tol = 8 * torch.finfo(dtype).eps * 8
    for got, ref in ((y, ref_y), (x.grad, ref_dx), (w.grad, ref_dw)):
        torch.testing.assert_close(got.float(), ref.float(), atol=tol * ref.abs().max().item(), rtol=0)


def test_grouped_mm_unaligned_falls_back_to_a_loop():
    counts = [3, 2]
    x, w, dy = _gmm_case(counts, k=6, n=5)  # 24- and 20-byte rows: grouped_mm refuses them
    y = moe.grouped_matmul(x, w.transpose(1, 2), torch.tensor(counts))
    y.backward(dy)
    ref_y, ref_dx, ref_dw = _per_expert(x, w, counts, dy)
    torch.testing.assert_close(y, ref_y)
    torch.testing.assert_close(w.grad, ref_dw)


def test_npu_grouped_matmul_has_its_own_backward(npu_double):
    counts = [4, 0, 3]
    x, w, dy = _gmm_case(counts, k=4, n=6)
    # the op itself (like the real torch_npu 2.13) has no derivative
    raw = npu_double.npu_grouped_matmul([x], [w.transpose(1, 2)], group_list=torch.tensor([4, 4, 7]),
                                        split_item=3, group_type=0, group_list_type=0)[0]
    with pytest.raises(RuntimeError, match="derivative for 'npu_grouped_matmul' is not implemented"):
        raw.backward(dy)
    x.grad = w.grad = None
    y = moe.grouped_matmul_npu(x, w.transpose(1, 2), torch.tensor(counts))
    y.backward(dy)
    ref_y, ref_dx, ref_dw = _per_expert(x, w, counts, dy)
    for got, ref in ((y, ref_y), (x.grad, ref_dx), (w.grad, ref_dw)):
        torch.testing.assert_close(got, ref, atol=1e-6 * max(1.0, ref.abs().max().item()), rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# grouped experts in a model: loss, gradients and post-step weights of the SequentialMLP reference (TP1)
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe-reference")
    (result,) = run_ranks(reference_run, 1, timeout=240, args=(str(out),))
    return str(out), result


def _assert_matches_reference(reference, results):
    ref_dir, ref = reference
    for rank, res in enumerate(results):
        assert abs(res["loss"] - ref["loss"]) <= LOSS_TOL, (rank, res["loss"], ref["loss"])
        assert abs(res["grad_norm"] - ref["grad_norm"]) <= 1e-5 * max(1.0, ref["grad_norm"])
        assert not over_bound(res["grad_diff"], GRAD_TOL, STEP_ULPS), (rank, over_bound(res["grad_diff"], GRAD_TOL))
        assert not over_bound(res["step_diff"], GRAD_TOL, STEP_ULPS), (rank, over_bound(res["step_diff"], GRAD_TOL))
        assert any(".mlp.experts.linear_fc1.weight" in k for k in res["grad_diff"]), "no grouped expert compared"


GROUPED_LAYOUTS = {
    "EP2": (2, ParallelLayout(ep=2)),
    "TP2xEP2xETP2": (4, ParallelLayout(tp=2, ep=2, etp=2)),
}


@pytest.mark.parametrize("name", list(GROUPED_LAYOUTS))
def test_grouped_experts_match_sequential_mlp(reference, name):
    """The grouped model loads the SequentialMLP reference's torch_dist weights (same keys) and gives its
    loss, gradients and post-step weights (the reference run's are SequentialMLP's at TP1)."""
    world, layout = GROUPED_LAYOUTS[name]
    results = run_ranks(layout_run, world, timeout=240, args=(layout, reference[0], False, GROUPED))
    _assert_matches_reference(reference, results)


# ----------------------------------------------------------------------------------------------------------------
# static-shape dispatch: no data-dependent shapes or host syncs in a MoE layer's forward and backward
# ----------------------------------------------------------------------------------------------------------------
STATIC = {"moe_grouped_gemm": True, "moe_expert_capacity_factor": 4.0, "moe_pad_expert_input_to_capacity": True}


def moe_layer_ops_run(rank, world, variants):
    """Per variant (TransformerConfig overrides): the data-dependent ops a MoE layer's forward+backward ran,
    and its output and input gradient for one fixed input."""
    from megatron_patch.models.builder import ParallelLayout, apply_layout, build_gpt_chunks, initialize_parallel
    from megatron_patch.models.spec import local_block_spec
    from megatron_patch.testing.equivalence import SEQ, VOCAB, tiny_deepseek_config
    from megatron_patch.testing.static_shapes import DataDependentOps

    from megatron_patch.checkpoint.key_map import te_name

    initialize_parallel(ParallelLayout())
    out, weights = {}, None
    for name, overrides in variants.items():
        config = apply_layout(tiny_deepseek_config(**overrides), ParallelLayout())
        (model,) = build_gpt_chunks(config, local_block_spec, VOCAB, SEQ, ParallelLayout())
        layer = model.decoder.layers[1].mlp  # the first MoE layer
        if weights is None:  # every variant runs the first one's weights (SequentialMLP names -> grouped)
            weights = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        grouped = bool(overrides.get("moe_grouped_gemm"))
        result = model.load_state_dict({te_name(k, (), grouped=grouped): v for k, v in weights.items()},
                                       strict=False)
        assert not [k for k in result.missing_keys + result.unexpected_keys if not k.endswith("_extra_state")]
        x = torch.randn(SEQ, 2, config.hidden_size, generator=torch.Generator().manual_seed(1)).requires_grad_()
        with DataDependentOps() as ops:
            y, _ = layer(x)
            forward_ops = ops.count
            y.sum().backward()
        assert ops.count > forward_ops + 10, "the backward must run inside the detecting mode"
        out[name] = {"ops": ops.seen, "y": y.detach(), "dx": x.grad}
    return out


def _close(got, ref):
    torch.testing.assert_close(got, ref, atol=4 * torch.finfo(torch.float32).eps * max(1.0, ref.abs().max().item()),
                               rtol=0)


DROP = {"moe_expert_capacity_factor": 1.0}
VARIANTS = {
    "dynamic": {},
    "static": STATIC,  # capacity 4x an even share at top-2 of 8 experts = the tokens: nothing dropped
    "static_f8": dict(STATIC, moe_expert_capacity_factor=8.0),  # capacity > tokens: filler rows
    "drop_probs": DROP, "static_drop_probs": dict(STATIC, **DROP),
    "drop_position": dict(DROP, moe_token_drop_policy="position"),
    "static_drop_position": dict(STATIC, **DROP, moe_token_drop_policy="position"),
}


def test_static_dispatch_has_no_data_dependent_ops():
    (res,) = run_ranks(moe_layer_ops_run, 1, timeout=300, args=(VARIANTS,))
    assert res["dynamic"]["ops"], "the detector must see the dynamic path's masked_select / host syncs"
    for name in VARIANTS:
        if name.startswith("static"):
            assert not res[name]["ops"], (name, res[name]["ops"])
    for key in ("y", "dx"):
        _close(res["static"][key], res["dynamic"][key])
        _close(res["static_f8"][key], res["dynamic"][key])
        for policy in ("probs", "position"):
            # with drops: megatron's (dynamic, unpadded) token dropping, and something was dropped
            _close(res[f"static_drop_{policy}"][key], res[f"drop_{policy}"][key])
            assert (res[f"drop_{policy}"][key] - res["dynamic"][key]).abs().max() > 1e-4


def checkpoint_both_ways_run(rank, world, ckpt_dir):
    """A grouped model's torch_dist checkpoint (all of its sharded state dict, `_extra_state` included) loads
    into a SequentialMLP model asking for all of its own keys, and back into a grouped model (strict)."""
    import os

    from megatron.core import dist_checkpointing

    from megatron_patch.checkpoint.key_map import te_name
    from megatron_patch.models.builder import ParallelLayout, apply_layout, build_gpt_chunks, initialize_parallel
    from megatron_patch.models.spec import local_block_spec
    from megatron_patch.testing.equivalence import SEQ, VOCAB, tiny_deepseek_config

    initialize_parallel(ParallelLayout())

    def build(grouped):
        config = apply_layout(tiny_deepseek_config(moe_grouped_gemm=grouped), ParallelLayout())
        return build_gpt_chunks(config, local_block_spec, VOCAB, SEQ, ParallelLayout())[0]

    import logging

    alarms = []  # megatron's "CPU RNG state changed" check: a false alarm on CPU, once per expert and linear
    handler = logging.Handler()
    handler.emit = lambda record: alarms.append(record.getMessage())
    logging.getLogger("megatron.core.tensor_parallel.random").addHandler(handler)
    grouped = build(True)
    assert not alarms, alarms[:2]
    os.makedirs(ckpt_dir)
    dist_checkpointing.save(grouped.sharded_state_dict(), ckpt_dir)
    sequential, again = build(False), build(True)
    for model in (sequential, again):
        loaded = dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir)
        model.load_state_dict(loaded, strict=True)
    want = {te_name(k, (), grouped=True): v for k, v in sequential.state_dict().items() if "_extra_state" not in k}
    saved = {k: v for k, v in grouped.state_dict().items() if "_extra_state" not in k}
    reloaded = {k: v for k, v in again.state_dict().items() if "_extra_state" not in k}
    assert sorted(want) == sorted(saved) == sorted(reloaded)
    assert any(".experts.linear_fc2.weight7" in k for k in saved)
    return {k: max(float((want[k] - saved[k]).abs().max()), float((reloaded[k] - saved[k]).abs().max()))
            for k in saved if saved[k].is_floating_point()}


def test_grouped_checkpoint_loads_into_sequential_mlp(tmp_path):
    (diffs,) = run_ranks(checkpoint_both_ways_run, 1, timeout=240, args=(str(tmp_path / "ckpt"),))
    assert diffs and not {k: d for k, d in diffs.items() if d != 0.0}
