"""The patches that make megatron-core run beyond CUDA + Transformer Engine.

Each patch names its target, why it exists, the megatron-core versions and the devices it is for.
They are applied only by `megatron_patch.runtime.setup()`. See ../shared/notes/megatron-core-on-cpu.md
for the measurements behind each one.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import sys

import torch

from megatron_patch.runtime import kernels
from megatron_patch.runtime.accelerator import get_accelerator
from megatron_patch.runtime.kernels import cpu_gemm
from megatron_patch.runtime.patching import MISSING, Patch, PatchRegistry
from megatron_patch.runtime.torch_proxy import TORCH_PROXY

NON_CUDA = ("cpu", "npu")
ALL = ("cpu", "cuda", "npu")
TESTED = ">=0.16.1,<0.20"

REGISTRY = PatchRegistry()
patch = REGISTRY.add

# Importing these pulls in everything GPTModel, the schedules, DDP, the optimizer and
# dist_checkpointing use; the torch proxy is then installed in each loaded module that mentions CUDA.
ENTRY_MODULES = (
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.models.gpt.gpt_layer_specs",
    "megatron.core.transformer.multi_latent_attention",
    "megatron.core.transformer.experimental_attention_variant.dsa",
    "megatron.core.transformer.moe.moe_layer",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.experts",
    "megatron.core.transformer.moe.shared_experts",
    "megatron.core.transformer.multi_token_prediction",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer_param_scheduler",
    "megatron.core.dist_checkpointing",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.rerun_state_machine",
)


def import_entry_modules() -> None:
    for name in ENTRY_MODULES:
        importlib.import_module(name)


def register_torch_proxies(registry: PatchRegistry) -> None:
    """One patch per loaded megatron.core module whose source talks to CUDA through `torch`."""
    known = {p.target for p in registry.patches}
    for name, module in sorted(sys.modules.items()):
        if not name.startswith("megatron.core") or module is None or getattr(module, "torch", None) is not torch:
            continue
        try:
            source = inspect.getsource(module)
        except (OSError, TypeError):
            continue
        if "cuda" not in source or f"{name}.torch" in known:
            continue
        registry.register(Patch(
            f"{name}.torch", lambda original: TORCH_PROXY,
            "device='cuda' and torch.cuda.* answered by the accelerator (torch proxy)",
            TESTED, NON_CUDA))


# --- RNG -------------------------------------------------------------------------------------------
@patch("megatron.core.tensor_parallel.random._set_cuda_rng_state",
       "the RNG tracker sets the CUDA generator via torch.cuda._lazy_call; use the accelerator's", TESTED,
       NON_CUDA)
def _set_rng_state(original):
    def set_state(new_state, device=-1, graph_safe=False):
        get_accelerator().set_rng_state(new_state)

    return set_state


@patch("megatron.core.tensor_parallel.random._get_cuda_rng_state",
       "the RNG tracker reads the CUDA generator; use the accelerator's", TESTED, NON_CUDA)
def _get_rng_state(original):
    def get_state(device="cuda", clone=False, graph_safe=False):
        state = get_accelerator().get_rng_state()
        return state.clone() if clone else state

    return get_state


# --- MLA -------------------------------------------------------------------------------------------
def _absent(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def _no_transformer_engine() -> bool:
    return _absent("transformer_engine")


@patch("megatron.core.transformer.multi_latent_attention.HAVE_TE",
       "MLA thinks TE is present (its extension imports without TE) and calls isinstance(x, None)",
       TESTED, ALL, needed=_no_transformer_engine)
def _mla_without_te(original):
    return False


@patch("megatron.core.transformer.multi_latent_attention.Linear",
       "MLA accepts only TE/modelopt Linear as a replicated down-projection; let it accept ours "
       "(also with Transformer Engine installed: our local spec uses DuplicatedLinear there too)",
       TESTED, ALL)
def _mla_duplicated_linear(original):
    from megatron_patch.runtime.modules import DuplicatedLinear

    return DuplicatedLinear


# --- MoE -------------------------------------------------------------------------------------------
@patch("megatron.core.transformer.moe.moe_utils.te_general_gemm",
       "router gemm references te_general_gemm, undefined without Transformer Engine", TESTED, ALL,
       needed=lambda: not hasattr(sys.modules.get("megatron.core.transformer.moe.moe_utils"), "te_general_gemm"))
def _no_te_gemm(original):
    return None


@patch("megatron.core.transformer.moe.moe_utils.maybe_move_tensor_to_cpu",
       "alltoall split sizes must become host lists on every device, not only for CUDA tensors",
       TESTED, NON_CUDA)
def _move_to_host(original):
    def move(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor):
            tensor = tensor.to("cpu")
            if as_numpy:
                tensor = tensor.numpy()
        return tensor

    return move


@patch("megatron.core.transformer.moe.moe_utils.sort_chunks_by_idxs",
       "the alltoall dispatcher re-sorts tokens by local expert even when the order is already right (one "
       "expert-parallel rank): skip the copy for an identity order", TESTED, ALL)
def _sort_chunks_identity(original):
    @functools.wraps(original)
    def sort_chunks_by_idxs(input, split_sizes, sorted_idxs, probs=None, fused=False):
        if not fused and sorted_idxs.tolist() == list(range(sorted_idxs.numel())):
            return input, probs
        return original(input, split_sizes, sorted_idxs, probs=probs, fused=fused)

    return sort_chunks_by_idxs


@patch("megatron.core.tensor_parallel.mappings._gather_along_first_dim",
       "gloo's all_gather needs equal sizes: pad uneven splits to the max and trim", TESTED, ("cpu",))
def _gather_uneven(original):
    @functools.wraps(original)
    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or len(set(output_split_sizes)) <= 1 or group.size() == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        longest = max(output_split_sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        gathered = original(padded.contiguous(), group, None, False)
        pieces = gathered.split(longest, dim=0)
        return torch.cat([p[:n] for p, n in zip(pieces, output_split_sizes)], dim=0)

    return gather


# --- optimizer: tensor type-name checks ------------------------------------------------------------
@contextlib.contextmanager
def _cuda_type_names():
    """Inside megatron's optimizer set-up, CPU/NPU tensors report CUDA type names
    ('torch.cuda.FloatTensor') so the dtype checks written against those strings pass."""
    original = torch.Tensor.type

    def type_(self, *args, **kwargs):
        name = original(self, *args, **kwargs)
        if not args and not kwargs and isinstance(name, str) and not name.startswith("torch.cuda."):
            return "torch.cuda." + name[len("torch."):]
        return name

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


@contextlib.contextmanager
def _tensor_cuda_is_accelerator():
    """Inside megatron's embedding set-up, `tensor.cuda()` moves to the accelerator's device instead."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self.to(get_accelerator().current_device())
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _inside(context):
    """Patch maker: run the original function inside `context()`."""

    def make(original):
        @functools.wraps(original)
        def call(*args, **kwargs):
            with context():
                return original(*args, **kwargs)

        return call

    return make


for _target in (
    "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer._build_model_and_main_param_groups",
    "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer.__init__",
    "megatron.core.optimizer.optimizer.Float16OptimizerWithFloat16Params.__init__",
    "megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32",
):
    REGISTRY.register(Patch(_target, _inside(_cuda_type_names),
                            "dtype checks compare tensor.type() with 'torch.cuda.*' strings", TESTED, NON_CUDA))

REGISTRY.register(Patch(
    "megatron.core.models.common.language_module.language_module.LanguageModule.setup_embeddings_and_output_layer",
    _inside(_tensor_cuda_is_accelerator),
    "PP>1 syncs the last stage's embedding copy (tied embeddings, MTP) with weight.data.cuda()", TESTED, NON_CUDA))

for _module in ("rotary_pos_embedding", "yarn_rotary_pos_embedding"):
    REGISTRY.register(Patch(
        f"megatron.core.models.common.embeddings.{_module}.get_pos_emb_on_this_cp_rank",
        _inside(_tensor_cuda_is_accelerator),
        "CP>1 picks this rank's RoPE positions with an index tensor moved by .cuda()", TESTED, NON_CUDA))


# --- portable modules and kernels --------------------------------------------------------------------
@patch("megatron.core.models.backends.LocalSpecProvider.core_attention",
       "local DotProductAttention rejects MLA's k/v_channels and is unfused; use PortableCoreAttention",
       TESTED, ALL)
def _core_attention(original):
    def core_attention(self):
        from megatron_patch.runtime.modules import PortableCoreAttention

        return PortableCoreAttention

    return core_attention


@patch("megatron.core.models.common.embeddings.rope_utils._apply_rotary_pos_emb_bshd",
       "RoPE on the whole head without megatron's split into rotated and pass-through parts and their re-concat "
       "(two copies of q and k, forward and backward, when nothing passes through)", TESTED, ("cpu", "cuda"))
def _rope_whole_head(original):
    @functools.wraps(original)
    def apply(t, freqs, rotary_interleaved=False, multi_latent_attention=False, mscale=1.0):
        if rotary_interleaved or multi_latent_attention or freqs.shape[-1] != t.shape[-1]:
            return original(t, freqs, rotary_interleaved, multi_latent_attention, mscale)
        cos = (torch.cos(freqs) * mscale).to(t.dtype)  # megatron's own cos/sin and product order: same bits
        sin = (torch.sin(freqs) * mscale).to(t.dtype)
        return kernels.get("apply_rope", t.device.type)(t, cos, sin)

    return apply


@patch("megatron.core.fusions.fused_bias_swiglu.bias_swiglu_impl",
       "SwiGLU (bias_activation_fusion) via the portable kernel: autograd's bits in fewer passes (megatron's "
       "eager kernel recomputes the sigmoid backward in its own rounding)", TESTED, ("cpu",))
def _swiglu_cpu(original):
    @functools.wraps(original)
    def swiglu(input, bias, fp8_input_store=False, cpu_offload_input=False):
        if bias is not None or fp8_input_store or cpu_offload_input:
            return original(input, bias, fp8_input_store, cpu_offload_input)
        return kernels.get("swiglu", input.device.type)(input)

    return swiglu


@patch("megatron.core.fusions.fused_bias_swiglu.weighted_bias_swiglu_impl",
       "SwiGLU times the router probs (SequentialMLP experts with bias_activation_fusion) as the unfused path "
       "computes it, on the portable kernel", TESTED, ("cpu",))
def _weighted_swiglu_cpu(original):
    @functools.wraps(original)
    def weighted_swiglu(input, bias, weights, fp8_input_store=False):
        if bias is not None or fp8_input_store:
            return original(input, bias, weights, fp8_input_store)
        return (kernels.get("swiglu", input.device.type)(input) * weights).to(input.dtype)

    return weighted_swiglu


@patch("megatron.core.tensor_parallel.cross_entropy.vocab_parallel_cross_entropy",
       "with the vocabulary on one rank (TP 1), the loss as torch's fused cross_entropy (HF's kernel): megatron's "
       "vocab-parallel one makes ~8 passes over the logits and three all-reduces of one rank", TESTED, ("cpu",))
def _single_rank_cross_entropy(original):
    @functools.wraps(original)
    def cross_entropy(vocab_parallel_logits, target, label_smoothing=0.0):
        from megatron.core import parallel_state

        if label_smoothing or parallel_state.get_tensor_model_parallel_world_size() != 1:
            return original(vocab_parallel_logits, target, label_smoothing)
        logits = vocab_parallel_logits.reshape(-1, vocab_parallel_logits.shape[-1])
        return torch.nn.functional.cross_entropy(logits, target.reshape(-1), reduction="none").view_as(target)

    return cross_entropy


@patch("megatron.core.models.backends.LocalSpecProvider.grouped_mlp_modules",
       "local grouped experts (GroupedMLP) need the CUDA grouped_gemm package; use PortableGroupedMLP "
       "(TEGroupedMLP's names and checkpoint keys, one portable grouped GEMM)", TESTED, ALL)
def _grouped_mlp_modules(original):
    def grouped_mlp_modules(self, moe_use_grouped_gemm, moe_use_legacy_grouped_gemm):
        if not moe_use_grouped_gemm or moe_use_legacy_grouped_gemm:
            return original(self, moe_use_grouped_gemm, moe_use_legacy_grouped_gemm)
        from megatron.core.transformer.mlp import MLPSubmodules

        from megatron_patch.runtime.grouped_experts import (PortableColumnGroupedLinear, PortableGroupedMLP,
                                                            PortableRowGroupedLinear)

        return PortableGroupedMLP, MLPSubmodules(linear_fc1=PortableColumnGroupedLinear,
                                                 linear_fc2=PortableRowGroupedLinear)

    return grouped_mlp_modules


@patch("megatron.core.transformer.torch_norm.WrappedTorchNorm",
       "WrappedTorchNorm asserts sequence_parallel off; PortableNorm supports SP and device kernels",
       TESTED, ALL)
def _norm(original):
    from megatron_patch.runtime.modules import PortableNorm

    return PortableNorm



@patch("megatron.core.utils.local_multi_tensor_scale",
       "gradient clipping without Apex scales every gradient as dst.copy_(src * scale), a temporary and a "
       "copy per tensor; when src is dst, scale in place (the same multiply, the same bits)", TESTED, ALL)
def _scale_in_place(original):
    @functools.wraps(original)
    def local_multi_tensor_scale(chunk_size, noop_flag, tensor_lists, scale):
        src, dst = tensor_lists[0], tensor_lists[1]
        if len(src) == len(dst) and all(s is d for s, d in zip(src, dst)):
            for tensor in dst:
                tensor.mul_(scale)
            return
        original(chunk_size, noop_flag, tensor_lists, scale)

    return local_multi_tensor_scale


# --- weight-gradient accumulation ----------------------------------------------------------------------
class PortableWgradAccumulation:
    """Apex's fused_weight_gradient_mlp_cuda as one torch GEMM: main_grad += grad_output^T @ input. With it
    megatron's linears (gradient_accumulation_fusion) write weight gradients straight into DDP's buffer,
    not into a fresh tensor that a hook then adds (a write and a read of every weight per micro-batch)."""

    @staticmethod
    def wgrad_gemm_accum_fp32(total_input, grad_output, main_grad):
        if total_input.dtype == main_grad.dtype:
            cpu_gemm.addmm_(main_grad, grad_output.t(), total_input)
        else:  # bf16/fp16 activations, fp32 main_grad: as the unfused path (GEMM in their dtype, then add)
            main_grad.add_(grad_output.t().matmul(total_input))

    wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp32


def _no_apex_wgrad() -> bool:
    return _absent("fused_weight_gradient_mlp_cuda")


@patch("megatron.core.tensor_parallel.layers.fused_weight_gradient_mlp_cuda",
       "gradient_accumulation_fusion needs Apex's fused_weight_gradient_mlp_cuda; a torch addmm_ does the same",
       TESTED, ALL, needed=_no_apex_wgrad)
def _wgrad_accumulation(original):
    return PortableWgradAccumulation


@patch("megatron.core.tensor_parallel.layers._grad_accum_fusion_available",
       "with the portable fused_weight_gradient_mlp_cuda, gradient_accumulation_fusion is available",
       TESTED, ALL, needed=_no_apex_wgrad)
def _wgrad_available(original):
    return True


# --- fp32 GEMMs on CPU through oneDNN (kernels/cpu_gemm.py: MKL runs AVX2 code on AMD's AVX-512 cores) -----
def _linear_function_patch(target: str) -> None:
    @patch(target, "megatron's linear autograd Functions multiply with torch.matmul (MKL on CPU); oneDNN's "
           "fp32 GEMMs are up to 2x faster on AVX-512 CPUs", TESTED, ("cpu",), needed=cpu_gemm.enabled)
    def _through_onednn(original):
        return cpu_gemm.with_onednn_matmuls(original)


for _cls in ("LinearWithGradAccumulationAndAsyncCommunication", "LinearWithFrozenWeight"):
    for _step in ("forward", "backward"):
        _linear_function_patch(f"megatron.core.tensor_parallel.layers.{_cls}.{_step}")


@patch("megatron.core.transformer.experimental_attention_variant.dsa.rotate_activation",
       "DSA's indexer rotation needs fast_hadamard_transform (a CUDA extension) and bf16; a portable one "
       "serves any device and dtype", TESTED, ALL)
def _rotate_activation(original):
    def rotate_activation(x):
        from megatron.core.transformer.experimental_attention_variant import dsa

        if dsa.hadamard_transform is not None and x.dtype == torch.bfloat16 and x.is_cuda:
            return original(x)
        return kernels.get("hadamard_rotate", x.device.type)(x)

    return rotate_activation


__all__ = ["REGISTRY", "import_entry_modules", "register_torch_proxies", "MISSING"]
