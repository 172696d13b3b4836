"""CPU test double for the few torch_npu ops used by megatron_patch.runtime.kernels.

Follows torch_npu 2.13.0 (wheel torch_npu-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl): the signatures are
copied from torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml (the op schemas behind torch.ops.npu.*),
the semantics from torch_npu/_op_plugin_docs.py and the output shapes from
torch_npu/op_plugin/meta/_meta_registrations.py.

The math is written from those docs in plain torch, independently of megatron_patch's own kernels, so a test
that runs a kernel's NPU path through this double checks our argument mapping against the documented op.
Options the kernels never use raise NotImplementedError instead of being guessed at.
"""

import torch

__version__ = "2.13.0"  # the wheel this double follows, not a real torch_npu

_COMPRESSED_MASK = 2048  # sparse_mode 2/3/4/7/8 take an optimised 2048x2048 upper-triangular mask


def _unsupported(what):
    raise NotImplementedError(f"torch_npu test double: {what} is not modelled")


# ----------------------------------------------------------------------------------------------------------------
# npu_fusion_attention
# ----------------------------------------------------------------------------------------------------------------
def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None,
                         scale=1., keep_prob=1., pre_tockens=2147483647, next_tockens=2147483647, inner_precise=0,
                         prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                         gen_mask_parallel=True, sync=False, softmax_layout="", sink=None, dropout_mask=None,
                         seed=0, offset=0):
    """y = Softmax(Mask(scale * (pse + q k^T), atten_mask)) v; atten_mask True = masked out.

    Returns (attention_out, softmax_max, softmax_sum, softmax_out, seed, offset, numels) like the real op.
    """
    for name, val in (("pse", pse), ("padding_mask", padding_mask), ("prefix", prefix),
                      ("actual_seq_qlen", actual_seq_qlen), ("actual_seq_kvlen", actual_seq_kvlen),
                      ("sink", sink), ("dropout_mask", dropout_mask)):
        if val is not None:
            _unsupported(f"npu_fusion_attention({name}=...)")
    if keep_prob != 1.0:
        _unsupported("npu_fusion_attention dropout (keep_prob < 1)")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError("npu_fusion_attention: query, key and value must share a dtype")

    if input_layout == "BNSD":
        q, k, v = query, key, value
    elif input_layout == "BSND":
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    else:
        _unsupported(f"npu_fusion_attention(input_layout={input_layout!r})")

    b, nq, sq, dq = q.shape
    _, nkv, skv, dk = k.shape
    dv = v.shape[-1]
    if nq != head_num:
        raise ValueError(f"npu_fusion_attention: head_num={head_num} but query has {nq} heads")
    if k.shape[:3] != v.shape[:3] or v.shape[0] != b:
        raise ValueError("npu_fusion_attention: key/value must agree on B, N, S")
    # Documented constraint: Dq = Dk and Dk >= Dv.
    if dq != dk or dv > dk:
        raise ValueError(f"npu_fusion_attention: needs Dq == Dk >= Dv, got Dq={dq} Dk={dk} Dv={dv}")
    if nkv == 0 or nq % nkv:
        raise ValueError("npu_fusion_attention: Nq must be a whole multiple of Nkv")
    group = nq // nkv
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)

    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    masked = _fa_mask(atten_mask, sparse_mode, pre_tockens, next_tockens, b, nq, sq, skv, q.device)
    if masked is not None:
        scores = scores.masked_fill(masked, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    # A fully masked row has max -inf; give it weight 0 everywhere instead of NaN.
    safe_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    expo = torch.exp(scores - safe_max)
    row_sum = expo.sum(dim=-1, keepdim=True)
    probs = expo / torch.where(row_sum == 0, torch.ones_like(row_sum), row_sum)
    out = torch.matmul(probs, v.float()).to(query.dtype)
    if input_layout == "BSND":
        out = out.transpose(1, 2).contiguous()

    # Per the meta registration: max/sum are fp32 [B, N, Sq, 8] (value repeated over the last axis).
    softmax_max = row_max.expand(b, nq, sq, 8).contiguous()
    softmax_sum = row_sum.expand(b, nq, sq, 8).contiguous()
    softmax_out = query.new_empty([0])
    return out, softmax_max, softmax_sum, softmax_out, 0, 0, 0


def _fa_mask(atten_mask, sparse_mode, pre_tockens, next_tockens, b, n, sq, skv, device):
    """Boolean [.., Sq, Skv] tensor, True where a score is masked, or None."""
    if atten_mask is None:
        # Documented: without atten_mask, sparse_mode/pre_tockens/next_tockens have no effect.
        return None
    if atten_mask.dtype not in (torch.bool, torch.uint8):
        raise TypeError("npu_fusion_attention: atten_mask must be bool or uint8")
    mask = atten_mask.bool()
    i = torch.arange(sq, device=device).unsqueeze(-1)
    j = torch.arange(skv, device=device).unsqueeze(0)

    if sparse_mode in (0, 1):
        shape = tuple(mask.shape)
        ok = (len(shape) == 2 and shape == (sq, skv)) or (
            len(shape) == 4 and shape[2:] == (sq, skv) and shape[0] in (1, b) and shape[1] in (1, n)
            and not (shape[0] == 1 and shape[1] != 1))
        if not ok:
            raise ValueError(f"npu_fusion_attention: atten_mask shape {shape} is not one of SS/11SS/B1SS/BNSS")
        if sparse_mode == 0:
            # defaultMask: only the band [i - pre_tockens, i + next_tockens] (top-left origin) is computed.
            mask = mask | (j - i > next_tockens) | (i - j > pre_tockens)
        return mask

    if sparse_mode in (2, 3):
        expected = torch.ones(_COMPRESSED_MASK, _COMPRESSED_MASK, dtype=torch.bool, device=mask.device).triu(1)
        if tuple(mask.shape) != (_COMPRESSED_MASK, _COMPRESSED_MASK) or not torch.equal(mask, expected):
            raise ValueError("npu_fusion_attention: sparse_mode 2/3 needs the 2048x2048 upper-triangular mask")
        if sparse_mode == 2:  # leftUpCausal: diagonal starts at the top-left corner
            return j > i
        return j - i > skv - sq  # rightDownCausal: diagonal ends at the bottom-right corner
    _unsupported(f"npu_fusion_attention(sparse_mode={sparse_mode})")


# ----------------------------------------------------------------------------------------------------------------
# npu_rms_norm
# ----------------------------------------------------------------------------------------------------------------
def npu_rms_norm(self, gamma, epsilon=1e-06):
    """(y, rstd): y = x * rsqrt(mean(x^2) + eps) * gamma over gamma's trailing dims; rstd is fp32."""
    if gamma.dtype != self.dtype:
        raise TypeError("npu_rms_norm: gamma must have the same dtype as self")
    nd = gamma.dim()
    if tuple(self.shape[-nd:]) != tuple(gamma.shape):
        raise ValueError("npu_rms_norm: gamma must match the trailing dims of self")
    dims = tuple(range(self.dim() - nd, self.dim()))
    x = self.float()
    rstd = torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + epsilon)
    y = (x * rstd * gamma.float()).to(self.dtype)
    return y, rstd


# ----------------------------------------------------------------------------------------------------------------
# npu_rotary_mul
# ----------------------------------------------------------------------------------------------------------------
def npu_rotary_mul(self, r1, r2, rotary_mode='half', rotate=None):
    """output = r1 * input + r2 * x_new, x_new per rotary_mode ('half': cat(-x2, x1) of the two halves)."""
    if self.dim() != 4 or r1.dim() != 4 or r2.dim() != 4:
        raise ValueError("npu_rotary_mul: input, r1 and r2 must be 4-D")
    d = self.shape[-1]
    if d % 2:
        raise ValueError("npu_rotary_mul: D must be even")
    torch.broadcast_shapes(self.shape, r1.shape, r2.shape)
    if rotate is not None:
        x_new = self @ rotate
    elif rotary_mode == 'half':
        first, second = self[..., : d // 2], self[..., d // 2:]
        x_new = torch.cat((-second, first), dim=-1)
    elif rotary_mode == 'interleave':
        even, odd = self[..., ::2], self[..., 1::2]
        x_new = torch.stack((-odd, even), dim=-1).flatten(-2)
    else:
        raise ValueError(f"npu_rotary_mul: unknown rotary_mode {rotary_mode!r}")
    return (r1 * self + r2 * x_new).to(self.dtype)


# ----------------------------------------------------------------------------------------------------------------
# npu_swiglu
# ----------------------------------------------------------------------------------------------------------------
def npu_swiglu(self, dim=-1):
    """swish(A) * B = A * sigmoid(A) * B, with A, B the first and second halves of x along dim."""
    a, b = self.chunk(2, dim=dim)
    return a * torch.sigmoid(a) * b


# ----------------------------------------------------------------------------------------------------------------
# npu_grouped_matmul (non-quantised paths only)
# ----------------------------------------------------------------------------------------------------------------
class _NoDerivative(torch.autograd.Function):
    """torch_npu 2.13 has no derivatives entry for npu_grouped_matmul (its docs: inference scenarios): a
    backward through it fails, so the double's must too (plain torch would otherwise let gradients flow)."""

    @staticmethod
    def forward(ctx, out, *inputs):
        return out.clone()

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("the derivative for 'npu_grouped_matmul' is not implemented")


def npu_grouped_matmul(x, weight, *, bias=None, **kwargs):
    """The op (see _grouped_matmul); outputs that depend on tensors requiring grad fail on backward."""
    with torch.no_grad():
        outs = _grouped_matmul(x, weight, bias=bias, **kwargs)
    inputs = [t for t in [*x, *weight, *(bias or [])] if t.requires_grad]
    if inputs and torch.is_grad_enabled():
        outs = [_NoDerivative.apply(o, *inputs) for o in outs]
    return outs


def _grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None,
                       antiquant_offset=None, per_token_scale=None, group_list=None, activation_input=None,
                       activation_quant_scale=None, activation_quant_offset=None, split_item=0, group_type=None,
                       group_list_type=0, act_type=0, tuning_config=None, output_dtype=None, x_dtype=None,
                       weight_dtype=None, scale_dtype=None, per_token_scale_dtype=None):
    """y_i = x_i @ weight_i (+ bias_i). Returns a list: one tensor per group (split_item 0/1) or one (2/3)."""
    for name, val in (("scale", scale), ("offset", offset), ("antiquant_scale", antiquant_scale),
                      ("antiquant_offset", antiquant_offset), ("per_token_scale", per_token_scale),
                      ("activation_input", activation_input), ("activation_quant_scale", activation_quant_scale),
                      ("activation_quant_offset", activation_quant_offset), ("output_dtype", output_dtype),
                      ("x_dtype", x_dtype), ("weight_dtype", weight_dtype)):
        if val is not None:
            _unsupported(f"npu_grouped_matmul({name}=...)")
    if act_type:
        _unsupported("npu_grouped_matmul activation (act_type != 0)")
    x, weight = list(x), list(weight)
    if not x or not weight or len(x) > 128 or len(weight) > 128:
        raise ValueError("npu_grouped_matmul: x and weight are lists of 1..128 tensors")

    if group_type is None or group_type == -1:
        # "multi-multi-multi": independent x_i @ w_i.
        if group_type == -1 and group_list is not None:
            raise ValueError("npu_grouped_matmul: group_type=-1 needs group_list=None")
        if split_item not in (0, 1):
            _unsupported(f"npu_grouped_matmul(group_type={group_type}, split_item={split_item})")
        if len(x) != len(weight):
            raise ValueError("npu_grouped_matmul: one weight per x")
        return [_mm(xi, wi, None if bias is None else bias[i]) for i, (xi, wi) in enumerate(zip(x, weight))]

    if group_type == 2:
        return [_grouped_on_k(x, weight, bias, group_list, split_item, group_list_type)]
    if group_type != 0:
        _unsupported(f"npu_grouped_matmul(group_type={group_type})")
    # group_type=0: split the M axis of the (single, 2-D) x into groups; one output tensor.
    if split_item not in (2, 3):
        raise ValueError("npu_grouped_matmul: group_type=0 needs split_item 2 or 3")
    if not isinstance(group_list, torch.Tensor) or group_list.dtype != torch.int64 or group_list.dim() != 1:
        raise TypeError("npu_grouped_matmul: group_list must be a 1-D int64 tensor here")
    if len(x) != 1 or x[0].dim() != 2:
        _unsupported("npu_grouped_matmul(group_type=0) with multiple x tensors")
    xs = x[0]
    values = [int(v) for v in group_list.tolist()]
    if group_list_type == 0:
        if any(v < 0 for v in values) or any(b < a for a, b in zip(values, values[1:])):
            raise ValueError("npu_grouped_matmul: group_list (type 0) must be non-negative and non-decreasing")
        if values[-1] != xs.shape[0]:
            raise ValueError("npu_grouped_matmul: last group_list value must equal x's first dim")
        sizes = [b - a for a, b in zip([0] + values[:-1], values)]
    elif group_list_type == 1:
        if any(v < 0 for v in values) or len(values) == 1:
            raise ValueError("npu_grouped_matmul: group_list (type 1) must be non-negative with length != 1")
        if sum(values) != xs.shape[0]:
            raise ValueError("npu_grouped_matmul: group_list (type 1) must sum to x's first dim")
        sizes = values
    else:
        raise ValueError(f"npu_grouped_matmul: bad group_list_type {group_list_type}")

    if len(weight) == 1 and weight[0].dim() == 3:
        ws = list(weight[0].unbind(0))  # "single-single-single": weight is [g, k, n]
    else:
        ws = weight  # "single-multi-single": one 2-D weight per group, equal N
        if any(w.dim() != 2 for w in ws) or len({w.shape[1] for w in ws}) != 1:
            raise ValueError("npu_grouped_matmul: weight list must hold 2-D tensors with equal N")
    if len(ws) != len(sizes):
        raise ValueError("npu_grouped_matmul: group_list length must equal the number of weight groups")
    outs, start = [], 0
    for i, (size, w) in enumerate(zip(sizes, ws)):
        outs.append(_mm(xs[start:start + size], w, None if bias is None else bias[i]))
        start += size
    return [torch.cat(outs, dim=0)]


def _grouped_on_k(x, weight, bias, group_list, split_item, group_list_type):
    """group_type=2 (the weight-gradient form MindSpeed uses): x [m, K] and weight [K, n] split along K by
    group_list (type 0: cumulative); out[g] = x[:, K_g] @ weight[K_g, :], shape [groups, m, n]."""
    if bias is not None or split_item != 3 or group_list_type != 0:
        _unsupported("npu_grouped_matmul(group_type=2) with bias, split_item != 3 or group_list_type != 0")
    if len(x) != 1 or len(weight) != 1 or x[0].dim() != 2 or weight[0].dim() != 2:
        raise ValueError("npu_grouped_matmul: group_type=2 takes one 2-D x and one 2-D weight")
    if not isinstance(group_list, torch.Tensor) or group_list.dtype != torch.int64 or group_list.dim() != 1:
        raise TypeError("npu_grouped_matmul: group_list must be a 1-D int64 tensor here")
    ends = [int(v) for v in group_list.tolist()]
    if ends[-1] != x[0].shape[1] or any(b < a for a, b in zip(ends, ends[1:])):
        raise ValueError("npu_grouped_matmul: group_list (type 0) must be non-decreasing and end at K")
    starts = [0] + ends[:-1]
    return torch.stack([_mm(x[0][:, a:b], weight[0][a:b], None) for a, b in zip(starts, ends)])


def _mm(x, w, b):
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"npu_grouped_matmul: K mismatch {tuple(x.shape)} @ {tuple(w.shape)}")
    y = x @ w
    return y if b is None else y + b


# ----------------------------------------------------------------------------------------------------------------
# npu_moe_token_permute / npu_moe_token_unpermute
# ----------------------------------------------------------------------------------------------------------------
def npu_moe_token_permute(tokens, indices, num_out_tokens=None, padded_mode=False):
    """Replicate each token topK times and sort the copies by expert id.

    indices: [num_tokens, topK] (or [num_tokens], topK = 1) expert ids. Returns
    (permuted_tokens [min(num_tokens*topK, num_out_tokens), H], sorted_indices int32 [num_tokens*topK]) where
    permuted_tokens[sorted_indices[i]] = tokens[i // topK]. The real op is documented as deterministic; this
    double sorts stably (copies of one expert keep token order), the same order as a CUDA/TE permute.
    """
    if padded_mode:
        _unsupported("npu_moe_token_permute(padded_mode=True)")  # documented: only False is supported
    if tokens.dim() != 2:
        raise ValueError("npu_moe_token_permute: tokens must be 2-D")
    if indices.dim() not in (1, 2) or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError("npu_moe_token_permute: indices must be 1-D/2-D int32/int64")
    topk = 1 if indices.dim() == 1 else indices.shape[1]
    flat = indices.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 16777215):
        raise ValueError("npu_moe_token_permute: indices must lie in [0, 16777215)")
    order = torch.sort(flat, stable=True).indices          # permuted row r holds flat slot order[r]
    sorted_indices = torch.empty_like(order)
    sorted_indices[order] = torch.arange(order.numel(), device=order.device)  # slot -> row
    n_out = 0 if num_out_tokens is None else int(num_out_tokens)
    n_out = min(n_out, flat.numel()) if n_out > 0 else n_out + flat.numel()  # as in the meta registration
    permuted = tokens.index_select(0, order[:n_out] // topk)
    return permuted, sorted_indices.to(torch.int32)


def npu_moe_token_unpermute(permuted_tokens, sorted_indices, probs=None, padded_mode=False, restore_shape=None):
    """out[t] = sum_k probs[t, k] * permuted_tokens[sorted_indices[t * topK + k]] (topK = probs.shape[1] or 1)."""
    if padded_mode or restore_shape is not None:
        _unsupported("npu_moe_token_unpermute padded mode")  # documented: only False / None supported
    if permuted_tokens.dim() != 2 or sorted_indices.dim() != 1:
        raise ValueError("npu_moe_token_unpermute: permuted_tokens 2-D, sorted_indices 1-D")
    topk = 1 if probs is None else probs.shape[1]
    if probs is not None and probs.dim() != 2:
        raise ValueError("npu_moe_token_unpermute: probs must be 2-D")
    idx = sorted_indices.long()
    if idx.numel() % topk:
        raise ValueError("npu_moe_token_unpermute: sorted_indices length must be num_tokens * topK")
    if idx.numel():
        if int(idx.min()) < 0 or int(idx.max()) >= permuted_tokens.shape[0]:
            raise ValueError("npu_moe_token_unpermute: sorted_indices out of range")
        if torch.unique(idx).numel() != idx.numel():
            raise ValueError("npu_moe_token_unpermute: sorted_indices must not repeat")
    num_tokens = idx.numel() // topk
    gathered = permuted_tokens.index_select(0, idx).view(num_tokens, topk, -1)
    if probs is None:
        out = gathered.sum(dim=1)
    else:
        if probs.shape[0] != num_tokens:
            raise ValueError("npu_moe_token_unpermute: probs must be [num_tokens, topK]")
        out = (gathered * probs.unsqueeze(-1)).sum(dim=1)
    return out.to(permuted_tokens.dtype)
