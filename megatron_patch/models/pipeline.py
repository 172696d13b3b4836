"""Which global layers live on which (pipeline rank, virtual stage): the one place that answers it.

The answer comes from megatron-core's own functions (transformer_block.get_num_layers_to_build,
transformer_layer.get_transformer_layer_offset, multi_token_prediction.get_mtp_num_layers_to_build,
and PipelineParallelLayerLayout behind them) on a TransformerConfig carrying the layout's pipeline
fields, so an even split, Megatron-LM's --decoder-first/last-pipeline-num-layers,
--account-for-embedding/loss-in-pipeline-split and --pipeline-model-parallel-layout all place layers
exactly as the model megatron builds. Those functions read the pipeline rank (and, with a layout
string, the virtual pipeline size) from parallel_state; `_as_rank` sets them for one question and
restores them, so a converter on one process can ask about every rank.

Convert (engine.ShardPlan), compare, training and the checkpoint readers all ask `stage_map`.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

from megatron_patch.errors import UserError

Stage = tuple[int, int]  # (pipeline rank, virtual stage)


@dataclass(frozen=True)
class StageMap:
    pp: int
    vpp: int
    decoder: dict[Stage, range]      # global decoder layers of each stage (empty range: none)
    mtp: Stage | None                # the stage that builds the MTP block (megatron: all MTP layers in one)
    final_norm: Stage                # decoder.final_layernorm (with MTP: the stage of the last decoder layer)

    first: Stage = (0, 0)            # embedding (pre_process)

    @property
    def last(self) -> Stage:         # output layer (post_process)
        return (self.pp - 1, self.vpp - 1)

    def locate(self, layer: int) -> tuple[int, int, int]:
        """(pp rank, virtual stage, stage-local index) of a global decoder layer."""
        for (pp, vp), layers in self.decoder.items():
            if layer in layers:
                return pp, vp, layer - layers.start
        raise KeyError(f"layer {layer} is on no stage")

    def lines(self) -> list[str]:
        """One line per stage: what it holds (the dry run's listing)."""
        out = []
        for (pp, vp), layers in sorted(self.decoder.items()):
            parts = []
            if (pp, vp) == self.first:
                parts.append("embedding")
            if len(layers):
                parts.append(f"layers {layers.start}-{layers.stop - 1} ({len(layers)})")
            if (pp, vp) == self.final_norm:
                parts.append("final norm")
            if (pp, vp) == self.mtp:
                parts.append("MTP")
            if (pp, vp) == self.last:
                parts.append("output layer")
            where = f"pp rank {pp}" + (f" vp stage {vp}" if self.vpp > 1 else "")
            out.append(f"{where}: {', '.join(parts) or '(empty)'}")
        return out


@contextlib.contextmanager
def _as_rank(pp_rank: int, pp_size: int, vpp: int | None):
    """parallel_state answers as pipeline rank `pp_rank` of `pp_size` (vpp chunks) inside the block."""
    from megatron.core import parallel_state as ps

    saved = (ps._MPU_PIPELINE_MODEL_PARALLEL_RANK, ps._MPU_PIPELINE_MODEL_PARALLEL_WORLD_SIZE,
             ps._VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE)
    ps.set_pipeline_model_parallel_rank(pp_rank)
    ps.set_pipeline_model_parallel_world_size(pp_size)
    ps.set_virtual_pipeline_model_parallel_world_size(vpp)
    try:
        yield
    finally:
        ps._MPU_PIPELINE_MODEL_PARALLEL_RANK, ps._MPU_PIPELINE_MODEL_PARALLEL_WORLD_SIZE, \
            ps._VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE = saved


def pipeline_config(config, layout):
    """A copy of a megatron config with only the layout's pipeline fields (megatron validates them)."""
    from megatron_patch.models.builder import check_pipeline_split

    check_pipeline_split(layout, config.num_layers, getattr(config, "mtp_num_layers", None))
    fields = layout.pipeline_overrides()
    if layout.pp > 1 and config.pipeline_dtype is None:
        fields["pipeline_dtype"] = config.params_dtype
    try:
        return dataclasses.replace(config, **fields)
    except (ValueError, AssertionError) as err:  # megatron's own check of a split ours let through
        raise UserError(f"pipeline split {layout.describe_split() or layout.describe()} is invalid for "
                        f"num_layers={config.num_layers}: {' '.join(str(err).split())}") from None


def stage_map(config, layout) -> StageMap:
    """Every stage's decoder layers (and where MTP and the final norm go) for `layout`."""
    from megatron.core.transformer.multi_token_prediction import get_mtp_num_layers_to_build
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    cfg = pipeline_config(config, layout)
    vpp = cfg.virtual_pipeline_model_parallel_size
    decoder, mtp = {}, None
    for pp in range(layout.pp):
        with _as_rank(pp, layout.pp, vpp):
            for vp in range(vpp or 1):
                vp_stage = vp if vpp else None
                count = get_num_layers_to_build(cfg, vp_stage=vp_stage, pp_rank=pp)
                offset = get_transformer_layer_offset(cfg, vp_stage=vp_stage, pp_rank=pp)
                decoder[(pp, vp)] = range(offset, offset + count)
                if getattr(cfg, "mtp_num_layers", None) and get_mtp_num_layers_to_build(cfg, vp_stage, pp):
                    mtp = (pp, vp)
    built = sorted(i for r in decoder.values() for i in r)
    if built != list(range(cfg.num_layers)):  # never expected: megatron's functions disagree with themselves
        raise UserError(f"pipeline split {layout.describe_split()} places layers {built[:8]}... not 0..{cfg.num_layers - 1}")
    last = max(decoder, key=lambda s: (decoder[s].stop if len(decoder[s]) else -1))
    # TransformerBlock.has_final_layernorm_in_this_stage: with MTP on the stage of the last decoder layer
    final_norm = last if getattr(cfg, "mtp_num_layers", None) else (layout.pp - 1, (vpp or 1) - 1)
    return StageMap(layout.pp, vpp or 1, decoder, mtp, final_norm)


# --- the command-line flags (Megatron-LM's names and meaning) --------------------------------------
def add_split_args(parser) -> None:
    """Megatron-LM's uneven-pipeline flags on an argparse parser (or group)."""
    parser.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None, metavar="N",
                        help="decoder layers on the first pipeline stage (the rest split evenly)")
    parser.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None, metavar="N",
                        help="decoder layers on the last pipeline stage")
    parser.add_argument("--pipeline-model-parallel-layout", default=None, metavar="STR",
                        help="every stage's layers, Megatron-LM syntax: E embedding, t decoder layer, m MTP, "
                             "L loss, | between stages (PP x VPP of them), e.g. 'Et|(tt|)*30mL'")
    parser.add_argument("--account-for-embedding-in-pipeline-split", action="store_true",
                        help="count the embedding as a layer of the first stage when splitting")
    parser.add_argument("--account-for-loss-in-pipeline-split", action="store_true",
                        help="count the loss as a layer of the last stage when splitting")


def split_kwargs(args) -> dict:
    """ParallelLayout fields from parsed add_split_args flags (missing ones: the even split)."""
    from megatron_patch.models.builder import SPLIT_FIELDS

    defaults = {name: False if name.startswith("account_for") else None for name in SPLIT_FIELDS}
    return {name: getattr(args, name, default) for name, default in defaults.items()}
