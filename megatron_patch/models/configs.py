"""megatron-core's config classes plus the fields our runtime patches read.

Real dataclass fields (not loose attributes) so they survive dataclasses.replace (apply_layout),
deepcopy and pickling, and can be given as overrides like any other field. Imported lazily: importing
megatron_patch.models does not import megatron.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron.core.transformer.transformer_config import MLATransformerConfig as _MLATransformerConfig
from megatron.core.transformer.transformer_config import TransformerConfig as _TransformerConfig


@dataclass
class _PatchFields:
    moe_router_group_score_topk: Optional[int] = None
    """Score an expert group by the sum of its top-n expert scores (DeepSeek-V2 group_limited_greedy: 1,
    DeepSeek-V3 noaux_tc: 2). None: megatron's own top-(moe_router_topk // moe_router_group_topk).
    Read by megatron_patch/runtime/routing.py."""


@dataclass
class TransformerConfig(_TransformerConfig, _PatchFields):
    pass


@dataclass
class MLATransformerConfig(_MLATransformerConfig, _PatchFields):
    pass


@dataclass
class DSATransformerConfig(MLATransformerConfig):
    """MLA with DeepSeek sparse attention (experimental_attention_variant="dsa").

    megatron-core 0.16.1 asserts context_parallel_size == 1 for DSA because its own DSAttention sees only
    the local keys; the DSA modules this layer builds (models/dsa.py) gather the indexer's keys and K/V over
    the CP group, so the assertion is skipped (every other check runs)."""

    def __post_init__(self):
        cp = self.context_parallel_size
        self.context_parallel_size = 1
        try:
            super().__post_init__()
        finally:
            self.context_parallel_size = cp
