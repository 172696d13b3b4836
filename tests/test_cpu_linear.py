"""The lean CPU linear (runtime/cpu_linear.py) against megatron-core's own LinearWithGradAccumulationAndAsync-
Communication on the same oneDNN GEMMs: the same bits for the output, input, bias and weight gradients, the same
main_grad accumulation and DDP flags; everything with TP communication still goes to megatron's Function."""
import pytest
import torch

from megatron_patch.runtime import adapters, cpu_linear  # noqa: F401  (cpu_linear registers its patch)

from test_cpu_gemm import OpNames, gen, onednn  # noqa: F401  (onednn: the fixture forcing oneDNN GEMMs on)

TARGET = "megatron.core.tensor_parallel.layers.linear_with_grad_accumulation_and_async_allreduce"


def registered(target):
    return next(p for p in adapters.REGISTRY.patches if p.target == target)


@pytest.fixture
def megatron_on_onednn(onednn, monkeypatch):
    """megatron's linear Function with the patch that sends its matmuls to oneDNN (adapters.py), and the
    original functional entry point (whatever this process has patched)."""
    from megatron.core.tensor_parallel import layers

    cls = layers.LinearWithGradAccumulationAndAsyncCommunication
    for step in ("forward", "backward"):
        patch = registered(f"megatron.core.tensor_parallel.layers.{cls.__name__}.{step}")
        original = getattr(cls.__dict__[step], "__func__", cls.__dict__[step])
        monkeypatch.setattr(cls, step, staticmethod(patch.make(getattr(original, "__wrapped__", original))))
    # gradient accumulation fusion's Apex kernel, as the runtime provides it without Apex
    monkeypatch.setattr(layers, "fused_weight_gradient_mlp_cuda", adapters.PortableWgradAccumulation, raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")  # its placeholder's device (runtime: proxied)
    entry = layers.linear_with_grad_accumulation_and_async_allreduce
    return getattr(entry, "__wrapped__", entry)


def run(linear, fusion, bias, accumulated):
    """(y, dx, dbias, main_grad after the backward, weight.grad, grad_added_to_main_grad) of one linear."""
    x = torch.randn(64, 2, 256, generator=gen(21)).requires_grad_()  # each GEMM 8.4 MFLOP: oneDNN
    w = torch.randn(128, 256, generator=gen(22)).requires_grad_()
    b = torch.randn(128, generator=gen(23)).requires_grad_() if bias else None
    if fusion:
        w.main_grad = accumulated.clone()
        w.grad_added_to_main_grad = False
    y = linear(x, w, b, fusion, False, False, tp_group=object())
    y.backward(torch.randn(64, 2, 128, generator=gen(24)))
    return (y.detach(), x.grad, b.grad if bias else None, getattr(w, "main_grad", None), w.grad,
            getattr(w, "grad_added_to_main_grad", None))


@pytest.mark.parametrize("fusion, bias", [(True, False), (False, True)])
def test_lean_linear_gives_megatrons_bits(megatron_on_onednn, fusion, bias):
    lean = registered(TARGET).make(megatron_on_onednn)
    accumulated = torch.randn(128, 256, generator=gen(25))  # an earlier micro-batch's gradient
    with OpNames() as seen:
        mine = run(lean, fusion, bias, accumulated)
    theirs = run(megatron_on_onednn, fusion, bias, accumulated)
    assert seen.names.count("_linear_pointwise") == 3  # y, dx, dW
    y, dx, dbias, main_grad, wgrad, added = mine
    for a, b in zip((y, dx, dbias, main_grad), theirs[:4]):
        assert (a is None and b is None) or torch.equal(a, b)
    if fusion:  # the weight gradient went into main_grad; .grad holds megatron's placeholder, DDP skips it
        assert added is True and theirs[5] is True
        assert not torch.equal(main_grad, accumulated)
        assert wgrad.shape == theirs[4].shape
    else:
        assert torch.equal(wgrad, theirs[4])


def test_tp_communication_and_other_dtypes_stay_with_megatron(megatron_on_onednn):
    calls = []
    lean = registered(TARGET).make(lambda *args: calls.append(args) or "megatron")
    x = torch.randn(64, 2, 256, generator=gen(26))
    w = torch.randn(128, 256, generator=gen(27))
    for kwargs in ({"allreduce_dgrad": True}, {"sequence_parallel": True}, {"dtype": torch.bfloat16}):
        dtype = kwargs.pop("dtype", torch.float32)
        flags = {"allreduce_dgrad": False, "sequence_parallel": False, **kwargs}
        assert lean(x.to(dtype), w.to(dtype), None, False, **flags) == "megatron"
    assert len(calls) == 3
