"""Which global layers live on which (pipeline rank, virtual stage): the one place that answers it.

The answer comes from megatron-core's own functions (transformer_block.get_num_layers_to_build,
transformer_layer.get_transformer_layer_offset, multi_token_prediction.get_mtp_num_layers_to_build,
and PipelineParallelLayerLayout behind them) on a TransformerConfig carrying the layout's pipeline
fields, so an even split, Megatron-LM's --decoder-first/last-pipeline-num-layers,
--account-for-embedding/loss-in-pipeline-split and --pipeline-model-parallel-layout all place layers
exactly as the model megatron builds. Those functions read the pipeline rank (and, with a layout
string, the virtual pipeline size) from parallel_state; `_as_rank` sets them for one question and
restores them, so a converter on one process can ask about every rank.

Convert (engine.ShardPlan), compare, training and the checkpoint readers all ask `stage_map`. Also here:
the checks that turn a bad split into one line naming the numbers (check_pipeline_split, called by
builder.check_layout) and the flags themselves (add_split_args / split_kwargs for every command).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

from typing import TYPE_CHECKING

from megatron_patch.errors import UserError

if TYPE_CHECKING:
    from megatron_patch.models.builder import ParallelLayout

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


# --- checks: one-line errors naming the numbers ------------------------------------------------------
def _parse_layout(text: str) -> list[list]:
    """megatron-core's parse of a layout string (stage lists of LayerType), bad characters as UserError."""
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

    try:
        return PipelineParallelLayerLayout.parse_str_to_list(text)
    except (AssertionError, ValueError) as err:
        raise UserError(f"--pipeline-model-parallel-layout {text!r}: {' '.join(str(err).split())}; use E "
                        "(embedding), t (decoder layer), m (MTP), L (loss), | between stages") from None


def layout_stages(text: str) -> int:
    """PP x VPP stages of a Megatron-LM layout string."""
    return len(_parse_layout(text))


def check_pipeline_split(layout: ParallelLayout, num_layers: int, mtp_layers: int | None = None) -> None:
    """One-line errors naming the numbers for a split megatron-core would reject (or assert on)."""
    pp, vpp = layout.pp, layout.vpp or 1
    first, last = layout.decoder_first_pipeline_num_layers, layout.decoder_last_pipeline_num_layers
    counted = layout.account_for_embedding_in_pipeline_split or layout.account_for_loss_in_pipeline_split
    if layout.pipeline_model_parallel_layout:
        if first is not None or last is not None or counted:
            raise UserError("--pipeline-model-parallel-layout cannot be combined with --decoder-first/last-"
                            "pipeline-num-layers or --account-for-*-in-pipeline-split (it places every layer)")
        _check_layout_string(layout, num_layers, mtp_layers)
        return
    if first is None and last is None:
        total = num_layers + bool(layout.account_for_embedding_in_pipeline_split) + \
            bool(layout.account_for_loss_in_pipeline_split)
        what = f"num_layers={num_layers}" + (f" (+ embedding/loss = {total})" if total != num_layers else "")
        if total % (pp * vpp) or total < pp * vpp:
            raise UserError(f"PP={pp} x VPP={vpp} does not divide {what}; pass --decoder-first-pipeline-num-layers"
                            " / --decoder-last-pipeline-num-layers for uneven stages")
        if counted and total // (pp * vpp) < 2:
            raise UserError(f"--account-for-*-in-pipeline-split with {what} leaves a stage with no decoder layer "
                            f"at PP={pp} x VPP={vpp}; use fewer stages")
        return
    if counted:
        raise UserError("--decoder-first/last-pipeline-num-layers cannot be combined with "
                        "--account-for-*-in-pipeline-split (megatron-core refuses both)")
    if pp < 2:
        raise UserError("--decoder-first/last-pipeline-num-layers need pipeline parallelism: pass --pp > 1")
    for flag, value in (("first", first), ("last", last)):
        if value is not None and value < 1:
            raise UserError(f"--decoder-{flag}-pipeline-num-layers {value}: must be >= 1")
        if value is not None and value % vpp:
            raise UserError(f"--decoder-{flag}-pipeline-num-layers {value} is not a multiple of VPP={vpp}")
    middle_stages = pp - (first is not None) - (last is not None)
    middle = num_layers - (first or 0) - (last or 0)
    ends = " + ".join(f"{n} ({w})" for n, w in ((first, "first"), (last, "last")) if n is not None)
    if middle < 0 or (middle == 0) != (middle_stages == 0):
        raise UserError(f"uneven pipeline: {ends} leave {middle} of num_layers={num_layers} for {middle_stages} "
                        f"middle stage(s) at PP={pp}; each stage needs at least one layer")
    if middle_stages and middle % (middle_stages * vpp):
        raise UserError(f"uneven pipeline: {ends} leave {middle} of num_layers={num_layers}, which "
                        f"{middle_stages} middle stage(s) x VPP={vpp} do not divide")


def _check_layout_string(layout: ParallelLayout, num_layers: int, mtp_layers: int | None) -> None:
    from megatron.core.transformer.enums import LayerType

    text = layout.pipeline_model_parallel_layout
    stages = _parse_layout(text)
    if len(stages) % layout.pp:
        raise UserError(f"--pipeline-model-parallel-layout {text!r} has {len(stages)} stages, not a multiple of "
                        f"PP={layout.pp}")
    if layout.vpp and len(stages) != layout.pp * layout.vpp:
        raise UserError(f"--pipeline-model-parallel-layout {text!r} has {len(stages)} stages but PP={layout.pp} x "
                        f"--vpp {layout.vpp} = {layout.pp * layout.vpp}; drop --vpp (the layout implies it)")
    count = lambda kind: sum(stage.count(kind) for stage in stages)  # noqa: E731
    if count(LayerType.decoder) != num_layers:
        raise UserError(f"--pipeline-model-parallel-layout {text!r} places {count(LayerType.decoder)} decoder "
                        f"layers (t) but the model has num_layers={num_layers}")
    if count(LayerType.mtp) != (mtp_layers or 0):
        raise UserError(f"--pipeline-model-parallel-layout {text!r} places {count(LayerType.mtp)} MTP layers (m) "
                        f"but the model has {mtp_layers or 0}")
    # megatron-core builds the embedding with pre_process (stage 0) and the output layer with post_process
    # (the last stage), wherever the string puts E and L: accept only what it builds.
    if LayerType.embedding not in stages[0] or count(LayerType.embedding) != 1:
        raise UserError(f"--pipeline-model-parallel-layout {text!r}: E must appear once, in the first stage")
    if LayerType.loss not in stages[-1] or count(LayerType.loss) != 1:
        raise UserError(f"--pipeline-model-parallel-layout {text!r}: L must appear once, in the last stage")


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
