"""Build megatron-core GPTModel chunks for this rank under a parallel layout."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


from megatron_patch.errors import UserError


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None  # expert tensor parallel; None = same as TP (megatron's default)
    vpp: int | None = None  # virtual pipeline chunks per stage
    sp: bool | None = None  # sequence parallel; None = on when TP > 1 (MoE with TP needs it)
    # Uneven pipeline stages, Megatron-LM's flags of the same names (megatron-core's TransformerConfig
    # num_layers_in_first/last_pipeline_stage, pipeline_model_parallel_layout, account_for_*_in_pipeline_split);
    # models/pipeline.py turns them into each stage's layers.
    decoder_first_pipeline_num_layers: int | None = None
    decoder_last_pipeline_num_layers: int | None = None
    pipeline_model_parallel_layout: str | None = None  # e.g. "Et*3|(tt|)*29m|L"; implies VPP = stages / PP
    account_for_embedding_in_pipeline_split: bool = False
    account_for_loss_in_pipeline_split: bool = False
    cp: int = 1  # context parallel (sequence split in 2 x CP load-balanced chunks)

    def __post_init__(self):
        """Validated and normalised here, once, for every command: sizes >= 1, VPP 1 is no VPP (Megatron's
        None), VPP only with PP > 1."""
        for name in ("tp", "pp", "ep", "cp"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} {getattr(self, name)}: must be >= 1")
        for name in ("etp", "vpp"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"--{name} {getattr(self, name)}: must be >= 1")
        if self.vpp == 1:
            object.__setattr__(self, "vpp", None)
        if self.vpp and self.pp == 1:
            raise UserError(f"--vpp {self.vpp} needs pipeline parallelism: pass --pp > 1 (virtual stages split a stage)")
        if self.pipeline_model_parallel_layout and self.vpp is None:
            from megatron_patch.models.pipeline import layout_stages

            stages = layout_stages(self.pipeline_model_parallel_layout)
            if stages % self.pp == 0 and stages // self.pp > 1:  # Megatron-LM derives VPP the same way
                object.__setattr__(self, "vpp", stages // self.pp)

    @property
    def uneven(self) -> bool:
        """Whether stages are not the even split of the decoder layers."""
        return bool(self.decoder_first_pipeline_num_layers or self.decoder_last_pipeline_num_layers
                    or self.pipeline_model_parallel_layout or self.account_for_embedding_in_pipeline_split
                    or self.account_for_loss_in_pipeline_split)

    def describe_split(self) -> str:
        """The uneven split in Megatron-LM's flag terms ("" when even)."""
        if self.pipeline_model_parallel_layout:
            return f"layout {self.pipeline_model_parallel_layout}"
        parts = []
        if self.decoder_first_pipeline_num_layers:
            parts.append(f"first {self.decoder_first_pipeline_num_layers}")
        if self.decoder_last_pipeline_num_layers:
            parts.append(f"last {self.decoder_last_pipeline_num_layers}")
        if self.account_for_embedding_in_pipeline_split:
            parts.append("embedding counted")
        if self.account_for_loss_in_pipeline_split:
            parts.append("loss counted")
        return ", ".join(parts)

    def split_fields(self) -> dict:
        """The split as Megatron-LM's args (the names a checkpoint's `args` and convert_meta.json store)."""
        return {name: getattr(self, name) for name in SPLIT_FIELDS}

    def pipeline_overrides(self) -> dict:
        """megatron-core TransformerConfig fields of the pipeline split."""
        return dict(
            pipeline_model_parallel_size=self.pp,
            virtual_pipeline_model_parallel_size=self.vpp,
            num_layers_in_first_pipeline_stage=self.decoder_first_pipeline_num_layers,
            num_layers_in_last_pipeline_stage=self.decoder_last_pipeline_num_layers,
            pipeline_model_parallel_layout=self.pipeline_model_parallel_layout,
            account_for_embedding_in_pipeline_split=self.account_for_embedding_in_pipeline_split,
            account_for_loss_in_pipeline_split=self.account_for_loss_in_pipeline_split,
        )

    @property
    def sequence_parallel(self) -> bool:
        return self.tp > 1 if self.sp is None else self.sp

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    def describe(self) -> str:
        parts = [f"TP{self.tp}", f"PP{self.pp}", f"EP{self.ep}", f"ETP{self.expert_tp}"]
        if self.vpp:
            parts.append(f"VPP{self.vpp}")
        if self.cp > 1:
            parts.append(f"CP{self.cp}")
        if self.sequence_parallel:
            parts.append("SP")
        split = self.describe_split()
        return "x".join(parts) + (f" ({split})" if split else "")

    def config_overrides(self) -> dict:
        return dict(
            tensor_model_parallel_size=self.tp,
            expert_model_parallel_size=self.ep,
            expert_tensor_parallel_size=self.expert_tp,
            sequence_parallel=self.sequence_parallel,
            **self.pipeline_overrides(),
            context_parallel_size=self.cp,
        )


SPLIT_FIELDS = ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers",
                "pipeline_model_parallel_layout", "account_for_embedding_in_pipeline_split",
                "account_for_loss_in_pipeline_split")


def add_layout_args(parser, vpp: bool = True, cp: bool = True, split: bool = True) -> None:
    """The layout flags of the commands: --tp --pp --ep --etp, then (where the command takes them) --vpp, --cp
    and Megatron-LM's uneven-pipeline flags."""
    for flag, what in (("--tp", "tensor"), ("--pp", "pipeline"), ("--ep", "expert")):
        parser.add_argument(flag, type=int, default=1, help=f"{what} parallel size (default 1)")
    parser.add_argument("--etp", type=int, default=None,
                        help="expert tensor parallel size (default: the TP size, as megatron)")
    if vpp:
        parser.add_argument("--vpp", type=int, default=None, help="virtual pipeline chunks per stage")
    if cp:
        parser.add_argument("--cp", type=int, default=1,
                            help="context parallel size (the sequence split in 2 x CP load-balanced chunks)")
    if split:
        from megatron_patch.models.pipeline import add_split_args

        add_split_args(parser)


def layout_from_args(args) -> ParallelLayout:
    """The layout of add_layout_args' flags (one the command does not take: its default)."""
    from megatron_patch.models.pipeline import split_kwargs

    return ParallelLayout(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, vpp=getattr(args, "vpp", None),
                          cp=getattr(args, "cp", 1), **split_kwargs(args))


def check_layout(layout: ParallelLayout, config, world_size: int | None = None) -> None:
    """Fail early with a one-line message instead of an assertion deep inside megatron."""
    heads = config.num_attention_heads
    if heads % layout.tp:
        raise UserError(f"TP={layout.tp} does not divide num_attention_heads={heads}; pick a TP that divides it")
    groups = getattr(config, "num_query_groups", None) or heads
    if groups % layout.tp:
        raise UserError(f"TP={layout.tp} does not divide num_query_groups={groups}; pick a TP that divides it")
    if config.ffn_hidden_size % layout.tp:
        raise UserError(f"TP={layout.tp} does not divide ffn_hidden_size={config.ffn_hidden_size}")
    experts = config.num_moe_experts or 0
    if experts and experts % layout.ep:
        raise UserError(f"EP={layout.ep} does not divide num_experts={experts}; pick an EP that divides it")
    if not experts and layout.ep > 1:
        raise UserError(f"EP={layout.ep} given for a dense model; use EP=1")
    from megatron_patch.models.pipeline import check_pipeline_split

    check_pipeline_split(layout, config.num_layers, getattr(config, "mtp_num_layers", None))
    if world_size is not None:
        model_parallel = layout.tp * layout.pp * layout.cp
        expert_parallel = layout.expert_tp * layout.ep * layout.pp
        if world_size % model_parallel or world_size % expert_parallel:
            raise UserError(f"world size {world_size} is not a multiple of TPxPPxCP={model_parallel} and "
                            f"ETPxEPxPP={expert_parallel}; change the layout or the number of ranks")


def minimal_world_size(layout: ParallelLayout) -> int:
    """The fewest ranks megatron accepts for the layout: a multiple of TPxPP (dense part) and of
    ETPxEPxPP (experts). E.g. TP2xPP2xEP2 with ETP1 -> 4; TP1xEP2 -> 2 (data-parallel 2)."""
    dense = layout.tp * layout.pp * layout.cp
    expert = layout.expert_tp * layout.ep * layout.pp
    return dense * expert // math.gcd(dense, expert)


def initialize_parallel(layout: ParallelLayout, seed: int = 1234) -> None:
    """megatron parallel_state + the model-parallel RNG tracker for this layout."""
    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.expert_tp,
        context_parallel_size=layout.cp,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def apply_layout(config, layout: ParallelLayout):
    """A copy of the megatron config with the layout's parallel fields and device settings."""
    from megatron_patch.runtime import get_accelerator
    from megatron_patch.runtime.settings import settings_for

    acc = get_accelerator()
    fields = layout.config_overrides()
    fields["batch_p2p_comm"] = settings_for(acc.type).batch_p2p_comm
    fields["use_cpu_initialization"] = acc.type == "cpu" or config.use_cpu_initialization
    if layout.pp > 1:
        fields["pipeline_dtype"] = config.params_dtype
    if layout.vpp:
        # Interleaved schedule: micro-batches are taken PP at a time per virtual stage.
        fields["microbatch_group_size_per_vp_stage"] = layout.pp
    return dataclasses.replace(config, **fields)


def build_gpt_chunks(config, layer_spec_fn, vocab_size: int, max_sequence_length: int,
                     layout: ParallelLayout, untie: bool = True, rotary_base: int | float = 10000,
                     position_embedding_type: str = "rope", mtp_block_spec_fn=None, device=None) -> list:
    """One GPTModel per virtual pipeline chunk of this rank (a single one without VPP), on `device`
    (default: the accelerator's)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from megatron_patch.runtime import get_accelerator

    device = device or get_accelerator().current_device()
    chunks = []
    for vp_stage in range(layout.vpp or 1):
        vpp_arg = vp_stage if layout.vpp else None
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vpp_arg)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vpp_arg)
        spec = layer_spec_fn(config, vp_stage=vpp_arg)
        kwargs = {}
        if mtp_block_spec_fn is not None:
            kwargs["mtp_block_spec"] = mtp_block_spec_fn(config, spec, vp_stage=vpp_arg)
        model = GPTModel(
            config=config, transformer_layer_spec=spec, vocab_size=vocab_size,
            max_sequence_length=max_sequence_length, pre_process=pre, post_process=post,
            share_embeddings_and_output_weights=not untie,
            position_embedding_type="none" if config.multi_latent_attention else position_embedding_type,
            rotary_base=rotary_base, vp_stage=vpp_arg, **kwargs,
        )
        chunks.append(model.to(device))
    return chunks


def fuse_swiglu_on_cpu(config, device_type: str) -> None:
    """Megatron-LM's --bias-swiglu-fusion (its default) on CPU: the MLPs' SwiGLU goes through
    bias_swiglu_impl, which the runtime points at the portable kernel (autograd's bits without the
    concatenation of the two gradient halves the unfused chunk makes). Only read at forward time."""
    import torch.nn.functional as F

    if device_type == "cpu" and config.gated_linear_unit and config.activation_func is F.silu \
            and not config.add_bias_linear and not config.glu_linear_offset \
            and config.activation_func_clamp_value is None and not config.use_te_activation_func:
        config.bias_activation_fusion = True


def build_family_model(hf_config, layout: ParallelLayout, vocab_size: int | None = None, device=None,
                       transformer_impl: str = "local", **config_overrides):
    """The GPTModel chunks of this rank for an HF config: (chunks, megatron config, ModelArgs).
    Parallel state must be initialised for `layout` (initialize_parallel). `vocab_size`: embedding rows
    other than the layout's padding (a torch_dist checkpoint keeps the padding it was written with).
    `transformer_impl`: local, transformer_engine or auto (models/impl.py; the config records the spec built)."""
    from megatron_patch.models.families import family_for_config, model_args, mtp_block_spec
    from megatron_patch.models.impl import resolve_impl
    from megatron_patch.runtime import get_accelerator

    family = family_for_config(hf_config)
    impl = resolve_impl(transformer_impl, get_accelerator().type)
    config = apply_layout(family.to_mcore_config(hf_config, transformer_impl=impl, **config_overrides), layout)
    fuse_swiglu_on_cpu(config, get_accelerator().type)
    check_layout(layout, config)
    args = model_args(hf_config)
    kw = args.gpt_model_kwargs(layout.tp)
    chunks = build_gpt_chunks(
        config, family.layer_spec, vocab_size or kw["vocab_size"], kw["max_sequence_length"], layout,
        untie=not kw["share_embeddings_and_output_weights"], rotary_base=kw["rotary_base"],
        position_embedding_type=kw["position_embedding_type"],
        mtp_block_spec_fn=mtp_block_spec if getattr(config, "mtp_num_layers", None) else None, device=device,
    )
    return chunks, config, args
