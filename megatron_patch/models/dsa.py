"""DeepSeek sparse attention (DSA, DeepSeek-V3.2) on megatron-core 0.16.1's own DSA modules.

The spec is megatron's (`get_dsa_module_spec_for_backend`: DSAttention with a DSAIndexer of linear_wq_b,
linear_wk, k_norm, linear_weights_proj) built through a backend that gives the local spec what it lacks:
`linear()` (a replicated linear, TE's "duplicated" mode) and a LayerNorm with bias for the indexer's
k_norm. Two small subclasses make it portable:

* PortableDSAIndexer: with context parallelism the indexer's keys are all-gathered over CP (after RoPE,
  which megatron already applies at each chunk's positions), so every local query scores the whole
  sequence, as K/V in runtime/context_parallel.py.
* PortableDSAttention: causal masks carry each CP chunk's offset; top-k is taken over the full key
  length (megatron's caps it at the local length); the sparse attention runs on the device's fused
  attention kernel with the mask "causal and selected by the indexer". The selection passes through
  `index_selection` (an identity module) so `compare` can hook it.

megatron's DSAttention asserts CP == 1 (config) and builds its masks without CP offsets: both are
what these classes replace. The Hadamard rotation (`rotate_activation`) is runtime/adapters.py's patch.
"""
from __future__ import annotations

import torch
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.experimental_attention_variant.dsa import (DSAIndexer, DSAIndexerLossAutoScaler,
                                                                           DSAIndexerLossLoggingHelper, DSAttention,
                                                                           compute_dsa_indexer_loss)

from megatron_patch.runtime import kernels
from megatron_patch.runtime.accelerator import get_accelerator
from megatron_patch.runtime.context_parallel import chunk_ids, gather_sequence
from megatron_patch.runtime.modules import DuplicatedLinear


class IndexerLinear(DuplicatedLinear):
    """The indexer's replicated linears. Unlike MLA's down projections their input is gathered over the
    sequence first (DSAIndexer does it under SP), so every TP rank computes the full gradient: no TP sum."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight.sequence_parallel = False


class IndexerLayerNorm(torch.nn.Module):
    """k_norm: LayerNorm with bias over the indexer head dim (replicated, full sequence: no SP flag)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_ignored):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class IndexSelection(torch.nn.Module):
    """Identity on the [b, sq, skv] boolean selection (causal and in the indexer's top-k): a hook point."""

    def forward(self, selected: torch.Tensor) -> torch.Tensor:
        return selected


class _DSABackend(LocalSpecProvider):
    """megatron's local spec provider plus what its DSA spec asks for."""

    def linear(self) -> type:
        return IndexerLinear

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        return super().layer_norm(rms_norm, for_qk) if rms_norm or not for_qk else IndexerLayerNorm


def _cp_group(pg_collection, config):
    if config.context_parallel_size == 1:
        return None
    return pg_collection.cp


class PortableDSAIndexer(DSAIndexer):
    def _compute_index_scores(self, q, weights, k):
        group = _cp_group(self.pg_collection, self.config)
        if group is not None:
            k = gather_sequence(k, group)  # [S, b, d]: every key of the sequence, sequence order
        return super()._compute_index_scores(q, weights, k)


def causal_keep(sq: int, skv: int, cp_group, device) -> torch.Tensor:
    """[sq, skv] True where local query i may see key j: j <= i's position in the sequence (with CP the
    local rows are chunks r and 2CP-1-r of the sequence, megatron's load-balanced split)."""
    rows = torch.arange(sq, device=device)
    if cp_group is not None:
        chunk = sq // 2
        first, second = chunk_ids(cp_group.size(), cp_group.rank())
        rows = torch.where(rows < chunk, rows + first * chunk, rows - chunk + second * chunk)
    return torch.arange(skv, device=device)[None, :] <= rows[:, None]


class PortableDSAttention(DSAttention):
    def __init__(self, config, submodules, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, k_channels=None, v_channels=None,
                 cp_comm_type="p2p", pg_collection=None):
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        super().__init__(config, submodules, layer_number, attn_mask_type, attention_type, attention_dropout,
                         softmax_scale, k_channels, v_channels, cp_comm_type, pg_collection)
        self.cp_group = _cp_group(pg_collection, config)
        self.index_selection = IndexSelection()
        self.dense = False  # DSA's dense warm-up: attend to every causal key (set_dsa_stage)

    def forward(self, query, key, value, attention_mask, x, qr, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("DSA: packed sequences and attention bias are not supported")
        if attn_mask_type not in (None, AttnMaskType.causal):
            raise ValueError(f"DSA: causal attention only (got {attn_mask_type})")
        if self.cp_group is not None:
            key, value = gather_sequence(key, self.cp_group), gather_sequence(value, self.cp_group)
        sq, b = query.shape[:2]
        skv = key.shape[0]
        keep = causal_keep(sq, skv, self.cp_group, query.device)
        float_mask = torch.zeros(sq, skv, dtype=torch.float32, device=query.device).masked_fill(~keep, float("-inf"))
        # the indexer's input is detached: its loss trains it alone (megatron's DSAttention does the same)
        index_scores, topk = self.indexer.forward_with_scores(x.detach(), qr.detach(), mask=float_mask)
        k = min(self.indexer.index_topk, skv)
        if self.dense:  # warm-up: every key (the causal mask still applies)
            topk = torch.arange(skv, device=query.device).expand(b, sq, skv)
        elif topk.shape[-1] != k:  # megatron caps top-k at the local (CP) length
            topk = index_scores.topk(k, dim=-1)[1]
        selected = torch.zeros(b, sq, skv, dtype=torch.bool, device=query.device).scatter_(-1, topk, True)
        selected = self.index_selection(selected & keep)
        attention = kernels.get("core_attention", get_accelerator().type)
        q, kk, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, d]
        out = attention(q, kk, v, scale=self.softmax_scale, causal=False, attn_mask=~selected[:, None])
        out = out.permute(2, 0, 1, 3).reshape(sq, b, -1)  # [sq, b, n * dv]
        coeff = self.config.dsa_indexer_loss_coeff or 0.0
        if self.training and torch.is_grad_enabled() and coeff > 0:
            if self.cp_group is not None:
                raise ValueError("DSA indexer loss with context parallelism is not supported yet")
            loss = compute_dsa_indexer_loss(index_scores, topk, query.detach(), key.detach(), self.softmax_scale,
                                            coeff, self.config.dsa_indexer_use_sparse_loss,
                                            self.indexer.pg_collection)
            DSAIndexerLossLoggingHelper.save_loss_to_tracker(loss, self.layer_number, tracked_layers(self.config))
            out = DSAIndexerLossAutoScaler.apply(out, loss)
        return out


def tracked_layers(config) -> int:
    """Entries of megatron's DSA loss tracker: decoder and MTP layers (an MTP layer's layer_number follows the
    decoder's; megatron-core 0.16.1 sizes the tracker by num_layers alone and fails on MTP)."""
    return config.num_layers + (config.mtp_num_layers or 0)


def is_indexer_param(name: str) -> bool:
    return ".core_attention.indexer." in name


def set_dsa_stage(chunks, dense: bool) -> int:
    """DeepSeek-V3.2's training stages: dense (warm-up: every causal key attended, the indexer's KL against
    that dense attention) or sparse (top-k attention, the indexer's KL on the selected keys, megatron's
    dsa_indexer_use_sparse_loss). Returns the number of DSA layers set."""
    count = 0
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, PortableDSAttention):
                module.dense = dense
                module.config.dsa_indexer_use_sparse_loss = not dense
                count += 1
    return count


def dsa_core_attention_spec(config):
    """megatron's DSA core-attention spec (DSAttention + DSAIndexer with its submodules) on the portable
    backend, with the two portable classes above."""
    from megatron.core.models.gpt.experimental_attention_variant_module_specs import (
        get_dsa_module_spec_for_backend)

    core = get_dsa_module_spec_for_backend(config, backend=_DSABackend()).submodules.core_attention
    core.module = PortableDSAttention
    core.submodules.indexer.module = PortableDSAIndexer
    return core
