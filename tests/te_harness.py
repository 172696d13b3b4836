"""Megatron-core's Transformer Engine spec on CPU, over the TE test double (tests/te_double), for tests
that check what Megatron-LM / Pai-Megatron-Patch users meet: TE-spec GPTModels built for an HF model,
loaded from our checkpoints the way Megatron-LM 0.16 loads them, compared with HF, saved Pai-style.

In the test process (spawns ranks):
    with te_double_on_path():                 # or the `te_double` fixture (tests/conftest.py)
        run_ranks(fn, world_size, args=...)   # spawned ranks inherit sys.path, so import the double
    run_te_ranks(fn, world_size, args=...)    # the same in one call
    subprocess.run([...], env=te_double_env())  # torchrun / CLI subprocesses: the double first on PYTHONPATH
    minis = make_minis(tmp_dir)               # tiny random HF models (DeepSeek-V3 with MTP, Qwen3-MoE, ...)

Inside a rank (`fn(rank, world, ...)`, runtime already set up by run_ranks):
    require_te_double()                                   # fails loudly if megatron did not see the double
    chunks, config, args = build_te_chunks(hf_dir, layout, grouped_gemm=True)
    fill_nan(chunks)
    load_torch_dist(chunks, ckpt_root)                    # or load_legacy(chunks, ckpt_root)
    assert_no_nan(chunks)
    logits = forward_logits(chunks, tokens)               # [b, s, vocab] on the last PP stage, else None
    save_pai_legacy(chunks, out_root, layout, config)     # TE names, _extra_state None, rank dirs, args

In the test process: hf_logits(hf_dir, tokens) for the reference.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
import sys
from pathlib import Path

import torch

TE_DOUBLE = Path(__file__).resolve().parent / "te_double"
MINI_FAMILIES = ("deepseek_v3", "qwen3_moe")


# --- the double on the import path ---------------------------------------------------------------------
@contextlib.contextmanager
def te_double_on_path():
    """Put the double first on sys.path while the block runs. Spawned processes (run_ranks) copy the
    parent's sys.path, so ranks started inside the block import it before megatron does."""
    sys.path.insert(0, str(TE_DOUBLE))
    try:
        yield TE_DOUBLE
    finally:
        sys.path.remove(str(TE_DOUBLE))


def te_double_env(env: dict | None = None) -> dict:
    """An environment for a subprocess (torchrun, the CLI) that must import the double: PYTHONPATH first."""
    import os

    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TE_DOUBLE), env.get("PYTHONPATH", "")) if p)
    return env


def run_te_ranks(fn, world_size: int, timeout: float = 300.0, args: tuple = (), env: dict | None = None) -> list:
    """megatron_patch.runtime.multirank.run_ranks with the double importable in every rank."""
    from megatron_patch.runtime.multirank import run_ranks

    with te_double_on_path():
        return run_ranks(fn, world_size, timeout=timeout, args=args, env=env)


def require_te_double():
    """Inside a rank: the double must be what megatron-core imported as transformer_engine (a rank
    started without it on sys.path would silently build nothing TE-like, or fail far away)."""
    import transformer_engine

    import megatron.core.extensions.transformer_engine as mte

    if not getattr(transformer_engine, "IS_TEST_DOUBLE", False):
        raise RuntimeError(f"transformer_engine is {transformer_engine.__file__}, not the test double; start the "
                           "ranks with run_te_ranks / te_double_on_path")
    if not mte.HAVE_TE:
        raise RuntimeError("megatron-core was imported before the TE double was on sys.path")
    return transformer_engine


# --- tiny HF models ------------------------------------------------------------------------------------
def make_minis(out_dir, families=MINI_FAMILIES, seed: int = 1) -> dict:
    """family -> directory of a tiny random HF model (make-mini's 'mini' preset; DeepSeek-V3 has a dense
    first layer, MoE layers and MTP weights; Qwen3-MoE has GQA with q/k norms)."""
    from megatron_patch.convert.mini import make_mini

    return {f: make_mini(f, Path(out_dir) / f, seed=seed) for f in families}


# --- building ------------------------------------------------------------------------------------------
def te_block_spec(config, vp_stage: int | None = None):
    """megatron-core's TE decoder block spec (Megatron-LM's default --transformer-impl)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    return get_gpt_decoder_block_spec(config, use_transformer_engine=True, normalization=config.normalization,
                                      vp_stage=vp_stage)


def te_mtp_block_spec(config, spec=None, vp_stage: int | None = None):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

    if spec is None:
        spec = te_block_spec(config, vp_stage=vp_stage)
    return get_gpt_mtp_block_spec(config, spec, use_transformer_engine=True, vp_stage=vp_stage)


def build_te_chunks(hf, layout, grouped_gemm: bool = False, vocab_size: int | None = None, **overrides):
    """This rank's TE-spec GPTModel chunks for an HF model (directory or config) at `layout`:
    (chunks, megatron config, ModelArgs). Initialises megatron's parallel state for the layout.
    `grouped_gemm`: TEGroupedMLP (experts `linear_fc1.weight{e}`) instead of SequentialMLP."""
    from transformers import AutoConfig

    from megatron_patch.models.builder import apply_layout, build_gpt_chunks, check_layout, initialize_parallel
    from megatron_patch.models.families import family_for_config, model_args

    require_te_double()
    hf_config = hf if hasattr(hf, "to_dict") else AutoConfig.from_pretrained(hf)
    initialize_parallel(layout)
    config = apply_layout(family_for_config(hf_config).to_mcore_config(hf_config, **overrides), layout)
    config = dataclasses.replace(config, transformer_impl="transformer_engine",
                                 moe_grouped_gemm=bool(grouped_gemm and config.num_moe_experts))
    check_layout(layout, config)
    args = model_args(hf_config)
    kw = args.gpt_model_kwargs(layout.tp)
    chunks = build_gpt_chunks(
        config, te_block_spec, vocab_size or kw["vocab_size"], kw["max_sequence_length"], layout,
        untie=not kw["share_embeddings_and_output_weights"], rotary_base=kw["rotary_base"],
        position_embedding_type=kw["position_embedding_type"],
        mtp_block_spec_fn=te_mtp_block_spec if getattr(config, "mtp_num_layers", None) else None)
    return chunks, config, args


def loadable_tensors(chunk) -> dict:
    """What a checkpoint load must set: parameters and persistent buffers (e.g. the router's expert_bias),
    by state-dict name, floating point only (`_extra_state` and integer counters are not weights)."""
    return {name: t for name, t in chunk.state_dict(keep_vars=True).items()
            if torch.is_tensor(t) and t.is_floating_point() and not name.endswith("_extra_state")}


def fill_nan(chunks) -> None:
    """Every parameter and persistent buffer NaN, so a load that leaves one untouched shows."""
    with torch.no_grad():
        for chunk in chunks:
            for t in loadable_tensors(chunk).values():
                t.fill_(float("nan"))


def nan_tensors(chunks) -> list[str]:
    return [f"chunk{i}.{name}" for i, chunk in enumerate(chunks)
            for name, t in loadable_tensors(chunk).items() if torch.isnan(t).any()]


def assert_no_nan(chunks) -> None:
    bad = nan_tensors(chunks)
    assert not bad, f"{len(bad)} tensor(s) not loaded (still NaN), first: {bad[:5]}"


# --- loading as Megatron-LM 0.16 does -------------------------------------------------------------------
def _chunk_keys(chunks) -> list[str]:
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def checkpoint_dir(root) -> Path:
    """ROOT/<iter_XXXXXXX|release> named by ROOT's tracker file; ROOT itself when it has none."""
    from megatron_patch.checkpoint import mcore_layout

    root = Path(root)
    if (root / mcore_layout.TRACKER_NAME).is_file():
        return root / mcore_layout.iteration_dir_name(mcore_layout.read_iteration(root))
    return root


def load_torch_dist(chunks, root, strict: bool = True):
    """megatron/training/checkpointing.py (core_v0.16.1) for --ckpt-format torch_dist: sharded_state_dict
    with the checkpoint's content metadata (+ dp_cp_group), dist_checkpointing.load at the default
    --dist-ckpt-strictness assume_ok_unexpected, then module.load_state_dict(strict=True). strict=False
    is Megatron-LM's fallback after a failed strict load; it returns the per-chunk load results."""
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.validation import StrictHandling

    path = str(checkpoint_dir(root))
    common = dist_checkpointing.load_common_state_dict(path)
    metadata = dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {}
    metadata["dp_cp_group"] = parallel_state.get_data_parallel_group(with_context_parallel=True)
    keys = _chunk_keys(chunks)
    sharded = {k: c.sharded_state_dict(metadata=metadata) for k, c in zip(keys, chunks)}
    state = dist_checkpointing.load(sharded, path, get_default_load_sharded_strategy(path),
                                    strict=StrictHandling.ASSUME_OK_UNEXPECTED)
    return [c.load_state_dict(state[k], strict=strict) for k, c in zip(keys, chunks)]


def load_legacy(chunks, root, strict: bool = True):
    """--ckpt-format torch as Megatron-LM reads it: the tracker's iteration, then this rank's own
    mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt named from the run's layout (no other rank file is looked at),
    one load_state_dict(strict=True) per chunk (strict=False: Megatron-LM's fallback; returns the results)."""
    from megatron.core import parallel_state as ps

    from megatron_patch.checkpoint import mcore_layout

    sizes = {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
             "ep": ps.get_expert_model_parallel_world_size()}
    checkpoint = mcore_layout.load_rank_checkpoint(
        root, ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
        ps.get_expert_model_parallel_rank(), sizes, mcore_layout.read_iteration(root))
    state = mcore_layout.model_chunks(checkpoint)
    assert len(state) == len(chunks), f"checkpoint holds {len(state)} chunk(s) per rank, the model {len(chunks)}"
    return [c.load_state_dict(sd, strict=strict) for c, sd in zip(chunks, state)]


# --- forward -------------------------------------------------------------------------------------------
def forward_logits(chunks, tokens: torch.Tensor, all_heads: bool = False):
    """Run megatron's forward-only pipeline schedule on `tokens` [b, s] and return the logits [b, s, vocab]
    gathered over TP on the last pipeline stage (None elsewhere; vocab still padded). One micro-batch, or
    PP of them with VPP (the interleaved schedule needs that many; b must divide). all_heads: a list with
    every output_layer call's logits (the MTP heads first, the main logits last)."""
    from megatron.core import parallel_state as ps

    from megatron_patch.verify.compare import megatron_forward
    from megatron_patch.verify.normalize import gather

    num_micro = ps.get_pipeline_model_parallel_world_size() if len(chunks) > 1 else 1
    calls = []
    last = chunks[-1]
    handle = None
    if ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=getattr(last, "vp_stage", None)):
        handle = last.output_layer.register_forward_hook(lambda m, i, o: calls.append(o[0].detach().clone()))
    try:
        megatron_forward(chunks, tokens, num_micro=num_micro)
    finally:
        if handle is not None:
            handle.remove()
    if handle is None:
        return None
    group, size = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
    per = len(calls) // num_micro  # output_layer calls per micro-batch: MTP heads, then the main head
    heads = [torch.cat([calls[m * per + h] for m in range(num_micro)], dim=1) for h in range(per)]
    heads = [gather(x.float(), 2, group, size).transpose(0, 1).contiguous() for x in heads]
    return heads if all_heads else heads[-1]


def hf_logits(hf_dir, tokens: torch.Tensor) -> torch.Tensor:
    """transformers' AutoModelForCausalLM on the same directory, fp32: logits [b, s, vocab]."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # DeepSeek-V3 MTP tensors transformers does not use
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits.float()


# --- saving as Pai-Megatron-Patch does -----------------------------------------------------------------
_MLA_DOWN_PROJ = re.compile(r"\.self_attention\.linear_(q|kv)_down_proj\.weight$")


def pai_args(config, args, layout, **extra) -> dict:
    """A Megatron-LM style `args` for the checkpoint: the model-shape fields Pai-Megatron-Patch's loaders
    read, TE and grouped-GEMM flags. (Not the full Megatron-LM namespace.)"""
    fields = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
              "kv_channels", "normalization", "num_moe_experts", "moe_ffn_hidden_size", "moe_router_topk",
              "moe_grouped_gemm", "moe_shared_expert_intermediate_size", "q_lora_rank", "kv_lora_rank",
              "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "multi_latent_attention", "mtp_num_layers",
              "qk_layernorm", "add_qkv_bias", "moe_layer_freq")
    out = {f: getattr(config, f, None) for f in fields}
    out.update(transformer_impl="transformer_engine", padded_vocab_size=args.padded_vocab_size(layout.tp),
               vocab_size=args.vocab_size, max_position_embeddings=args.max_position_embeddings,
               untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
               num_experts=getattr(config, "num_moe_experts", None), ckpt_format="torch")
    out.update(extra)
    return out


def save_pai_legacy(chunks, root, layout, args: dict, iteration="release", split_mla_down_proj: bool = True):
    """Write this rank's chunks as Pai-Megatron-Patch's hf2mcore does (toolkits/model_checkpoints_convertor,
    save_mgmodel): the TE model's own state dict (TE names; grouped experts `linear_fc1.weight{e}` with the
    local expert index), every `_extra_state` set to None, Megatron-LM's rank directories
    (mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt), an `args` Namespace and latest_checkpointed_iteration.txt.
    split_mla_down_proj: Pai splits MLA's linear_q/kv_down_proj weights by TP rank (rows) where megatron's
    TE spec replicates them. One writer per (TP, PP, EP) rank (expert-data-parallel rank 0), as Megatron-LM:
    only the (TP, PP, EP) combinations that occur in the run get a file (TP2 x EP2 x ETP1 on 2 ranks writes
    mp_rank_00_000 and mp_rank_01_001), as Pai's generate_rank_group does. Returns the file written, or None
    on ranks that do not write."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_patch.checkpoint import mcore_layout

    tp, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    state_dicts = []
    for chunk in chunks:
        sd = {}
        for key, value in chunk.state_dict_for_save_checkpoint().items():
            if key.endswith("_extra_state"):
                value = None
            elif value is None:
                continue
            elif split_mla_down_proj and tp_size > 1 and _MLA_DOWN_PROJ.search(key):
                value = value.chunk(tp_size, dim=0)[tp].clone()
            sd[key] = value
        state_dicts.append(sd)
    path = None
    if ps.get_expert_data_parallel_rank() == 0:
        sizes = {"tp": tp_size, "pp": layout.pp, "ep": layout.ep, "etp": layout.expert_tp, "vpp": layout.vpp or 1}
        path = mcore_layout.write_rank(root, iteration, tp, ps.get_pipeline_model_parallel_rank(),
                                       ps.get_expert_model_parallel_rank(), sizes, state_dicts, args)
    if dist.get_rank() == 0:
        mcore_layout.write_latest(root, iteration)
    dist.barrier()
    return path
