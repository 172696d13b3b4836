"""The CPU speed paths of the training step give what the plain paths give (bits where the same ops run,
ulps where the summation order changes): grouped expert weights read as one block, expert and linear weight
gradients accumulated straight into DDP's main_grad, the identity re-sort skipped, clipping in place, fused
AdamW. Single-process and small: the multi-rank equivalence lives in test_moe_engine / test_parallel_layouts."""
from types import SimpleNamespace

import pytest
import torch

from megatron_patch.runtime import adapters, grouped_experts
from megatron_patch.runtime.kernels import moe


def gen(seed):
    return torch.Generator().manual_seed(seed)


class _OneRank:
    def size(self):
        return 1

    def rank(self):
        return 0


def grouped_linear(num_gemms=3, in_size=8, out_size=4):
    config = SimpleNamespace(params_dtype=torch.float32, perform_initialization=False, expert_model_parallel_size=1)
    group = _OneRank()
    layer = grouped_experts.PortableColumnGroupedLinear(
        num_gemms, in_size, out_size, config=config, init_method=None, bias=False, skip_bias_add=False,
        is_expert=True, pg_collection=SimpleNamespace(ep=group, expt_tp=group, expt_dp=group))
    with torch.no_grad():
        for i, w in enumerate(layer.weights()):
            w.copy_(torch.randn(w.shape, generator=gen(i)))
    return layer


COUNTS = [3, 0, 5]


def test_grouped_weights_are_one_block_and_read_without_a_copy():
    layer = grouped_linear()
    weights = layer.weights()
    assert grouped_experts._one_block(weights)
    stacked = layer.stacked_weight()
    assert stacked.data_ptr() == weights[0].data_ptr()  # a view of the block, not a stack
    assert torch.equal(stacked, torch.stack([w.detach() for w in weights]).transpose(1, 2))
    # the block view hands each weight its own gradient
    x = torch.randn(sum(COUNTS), 8, generator=gen(5))
    grad = torch.randn(sum(COUNTS), 4, generator=gen(6))
    moe.grouped_matmul(x, layer.stacked_weight(), torch.tensor(COUNTS)).backward(grad)
    rows = x.split(COUNTS)
    for w, r, g in zip(weights, rows, grad.split(COUNTS)):
        torch.testing.assert_close(w.grad, g.t() @ r, rtol=1e-6, atol=1e-6)


def test_grouped_weights_are_regrouped_after_a_dtype_change():
    layer = grouped_linear()
    before = [w.detach().clone() for w in layer.weights()]
    params = list(layer.parameters())
    layer.double()
    assert [id(p) for p in layer.parameters()] == [id(p) for p in params]  # same Parameter objects
    assert grouped_experts._one_block(layer.weights()) and layer.weights()[0].dtype == torch.float64
    assert all(torch.equal(w, b.double()) for w, b in zip(layer.weights(), before))


def test_expert_weight_grads_go_straight_into_main_grad():
    layer = grouped_linear()
    x = torch.randn(sum(COUNTS), 8, generator=gen(7))
    grad = torch.randn(sum(COUNTS), 4, generator=gen(8))
    # the plain path: autograd's grouped GEMM gradients
    plain_x = x.clone().requires_grad_()
    moe.grouped_matmul(plain_x, layer.stacked_weight(), torch.tensor(COUNTS)).backward(grad)
    expected = [w.grad.clone() for w in layer.weights()]
    # the DDP path: an earlier micro-batch's gradient already in main_grad, the new one added to it
    earlier = [torch.randn(w.shape, generator=gen(20 + i)) for i, w in enumerate(layer.weights())]
    for w, e in zip(layer.weights(), earlier):
        w.grad, w.main_grad, w.grad_added_to_main_grad = None, e.clone(), False
    fused_x = x.clone().requires_grad_()
    out = layer.grouped_forward(fused_x, torch.tensor(COUNTS))
    assert out.grad_fn.name().startswith("_GroupedLinearIntoMainGrad")
    out.backward(grad)
    torch.testing.assert_close(fused_x.grad, plain_x.grad, rtol=1e-6, atol=1e-6)  # oneDNN per expert on AVX-512
    for w, e, g in zip(layer.weights(), earlier, expected):
        assert w.grad_added_to_main_grad
        torch.testing.assert_close(w.main_grad, e + g, rtol=1e-6, atol=1e-6)


def test_portable_wgrad_accumulation_is_main_grad_plus_the_weight_gradient():
    x = torch.randn(10, 6, generator=gen(1))
    dy = torch.randn(10, 4, generator=gen(2))
    main_grad = torch.randn(4, 6, generator=gen(3))
    expected = main_grad + dy.t() @ x
    adapters.PortableWgradAccumulation.wgrad_gemm_accum_fp32(x, dy, main_grad)
    torch.testing.assert_close(main_grad, expected, rtol=1e-6, atol=1e-6)


def _patched(target, original):
    patch = next(p for p in adapters.REGISTRY.patches if p.target == target)
    return patch.make(original)


def test_identity_sort_is_skipped_and_others_still_sort():
    from megatron.core.transformer.moe.moe_utils import sort_chunks_by_idxs as original

    sort = _patched("megatron.core.transformer.moe.moe_utils.sort_chunks_by_idxs", original)
    x = torch.randn(6, 3, generator=gen(4))
    probs = torch.rand(6, generator=gen(5))
    split = torch.tensor([2, 1, 3])
    out, out_probs = sort(x, split, torch.tensor([0, 1, 2]), probs=probs)
    assert out is x and out_probs is probs
    order = torch.tensor([2, 0, 1])
    for mine, theirs in zip(sort(x, split, order, probs=probs), original(x, split, order, probs=probs)):
        assert torch.equal(mine, theirs)


def test_clipping_scales_in_place_with_the_same_bits():
    from megatron.core.utils import local_multi_tensor_scale as original

    scale = _patched("megatron.core.utils.local_multi_tensor_scale", original)
    grads = [torch.randn(5, 3, generator=gen(i)) for i in range(3)]
    expected = [g.clone() for g in grads]
    original(None, None, [expected, expected], 0.37)
    storages = [g.data_ptr() for g in grads]
    scale(None, None, [grads, grads], 0.37)
    assert [g.data_ptr() for g in grads] == storages
    assert all(torch.equal(g, e) for g, e in zip(grads, expected))


def test_fused_adamw_tracks_the_per_tensor_loop():
    from megatron_patch.training.setup_model import use_fused_adam

    params = [torch.randn(s, generator=gen(i)) for i, s in enumerate([(7, 5), (5,), (3, 4)])]
    runs = []
    for fused in (False, True):
        ps = [p.clone().requires_grad_() for p in params]
        opt = torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)
        if fused:
            use_fused_adam(SimpleNamespace(optimizer=opt))
            assert opt.param_groups[0]["fused"]
        for step in range(3):
            for i, p in enumerate(ps):
                p.grad = torch.randn(p.shape, generator=gen(100 + 10 * step + i))
            opt.step()
        runs.append(ps)
    for plain, fused in zip(*runs):
        # a few ulps of the weights after 3 steps
        torch.testing.assert_close(fused, plain, rtol=0, atol=8 * torch.finfo(torch.float32).eps *
                                   plain.abs().max().item())


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
