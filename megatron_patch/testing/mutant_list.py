"""The curated mutants `make mutants` runs (see mutants.py): realistic one-line bugs, each with the tests
that must catch it. When a test is added for a new silent-failure mode, add its mutant here too.

A mutant names the file, an exact snippet of it (must occur exactly once), its replacement, and the pytest
arguments to run. Keep the test selections lean: the whole list should run in well under an hour."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]


SILENT = "tests/test_silent_failures.py"
DSA = "tests/test_deepseek_v32.py"
LOSS = f"{SILENT}::test_loss_is_the_masked_token_mean"
PADDED_COMPARE = f"{SILENT}::test_compare_passes_with_a_padded_vocab"
PADDED_EXPORT = f"{SILENT}::test_padding_added_on_import_and_stripped_on_export"
YARN = f"{SILENT}::test_yarn_with_distinct_mscale_values_matches_hf"
YARN_FACTOR = f"{SILENT}::test_yarn_attention_factor_checked_against_hf"
EXTRA_TENSOR = f"{SILENT}::test_hf2mcore_refuses_a_tensor_the_table_does_not_map"
MTP_COPY = f"{SILENT}::test_mtp_copy_that_differs_past_row_4096_is_refused"
NPU_FALLBACK = f"{SILENT}::test_npu_moe_fallbacks_pass_every_argument_to_megatron"
TRACKER = f"{SILENT}::test_tracker_survives_a_kill_between_write_and_rename"
MODEL_SIZE = f"{SILENT}::test_model_size_mismatch_refused_by_the_pai_wrapper"
EVALUATE = f"{SILENT}::test_load_torch_dist_and_evaluate_match_hf"
RESUME = f"{SILENT}::test_dropout_resume_is_bit_identical_with_warmup"
ROUTER = "tests/test_routing.py::test_router_module_with_family_config_matches_hf"
ROUTING = "tests/test_routing.py"
BROKEN = "tests/test_compare.py::test_broken_conversion_fails_at_the_first_wrong_row"
KERNELS = "tests/test_kernels.py"
IO = "tests/test_convert_io.py"
FAMILY_SHARDS = "tests/test_families.py::test_tp_shard_then_merge_gives_back_the_bytes"
EXPERT_LORA = "tests/test_lora_experts.py"

FAULTS = "tests/test_faults.py"
CP_EQUIV = "tests/test_context_parallel.py::test_context_parallel_matches_single_rank"
M = Mutant
MUTANTS: list[Mutant] = [
    # --- context parallelism (issue 12) ---------------------------------------------------------------
    M("step: CP loss not scaled against the DP x CP gradient average", "megatron_patch/training/step.py",
      "        loss_sum = loss_sum * cp\n", "", (f"{CP_EQUIV}[DP2xCP2]",)),
    M("context parallel: a query chunk sees its own position off by one", "megatron_patch/runtime/context_parallel.py",
      ".tril(diagonal=c * chunk)", ".tril(diagonal=c * chunk - 1)",
      ("tests/test_context_parallel.py", "-k", "chunk_order_and_masks or masked_and_blocked")),
    # --- DeepSeek-V3.2 (DSA) ----------------------------------------------------------------------------
    M("dsa: indexer rope rows not interleaved", "megatron_patch/models/families/base.py",
      "rope = [j for i in range(half) for j in (i, i + half)]", "rope = list(range(rope_dim))",
      (f"{DSA}::test_indexer_rope_rows_keep_every_indexer_score",)),
    M("dsa: CP query rows without their chunk offset", "megatron_patch/models/dsa.py",
      "rows = torch.where(rows < chunk, rows + first * chunk, rows - chunk + second * chunk)", "rows = rows",
      (DSA, "-k", "CP2")),
    M("dsa: top-k capped at the local CP length", "megatron_patch/models/dsa.py",
      "elif topk.shape[-1] != k:", "elif False:", (DSA, "-k", "CP2-24")),
    # --- the ten silent failures of issue 17 -----------------------------------------------------------
    M("step: loss mask dropped from the loss sum", "megatron_patch/training/step.py",
      "loss_sum = (output_tensor.float() * mask).sum()", "loss_sum = output_tensor.float().sum()", (LOSS,)),
    M("step: token count ignores the mask", "megatron_patch/training/step.py",
      '"lm loss": torch.stack([loss_sum.detach().clone(), mask.sum()])',
      '"lm loss": torch.stack([loss_sum.detach().clone(), torch.ones_like(mask).sum()])', (LOSS,)),
    M("step: mean of micro-batch means instead of token mean", "megatron_patch/training/step.py",
      "return totals[0] / totals[1]",
      'return torch.stack([l["lm loss"][0] / l["lm loss"][1] for l in losses]).mean()', (LOSS,)),
    M("engine: unused HF tensors ignored", "megatron_patch/checkpoint/engine.py",
      "unused = sorted(keys - set(needed))", "unused = []", (EXTRA_TENSOR,)),
    M("engine: in-memory loads (compare, --load-hf) skip the name check", "megatron_patch/checkpoint/engine.py",
      "    check_hf_coverage(plan, ckpt.keys())\n", "", (f"{SILENT}::test_in_memory_loads_refuse_a_tensor_the_table_does_not_map",)),
    M("compare: in-memory conversion skips the HF name check", "megatron_patch/verify/compare.py",
      "            check_hf_checkpoint(ShardPlan(family, hf_config, lay, config), ckpt)", "            pass",
      (f"{SILENT}::test_in_memory_loads_refuse_a_tensor_the_table_does_not_map",)),
    M("checkpointing: --load-hf skips the HF name check", "megatron_patch/training/checkpointing.py",
      "        check_hf_checkpoint(plan, ckpt)\n", "",
      (f"{SILENT}::test_in_memory_loads_refuse_a_tensor_the_table_does_not_map",)),
    M("engine: vocab padding kept on export", "megatron_patch/checkpoint/engine.py",
      "merged = [m[: self.model_args.vocab_size] for m in merged]", "merged = list(merged)", (PADDED_EXPORT,)),
    M("families: YaRN mscale / mscale_all_dim swapped", "megatron_patch/models/families/common.py",
      "m, m_all = float(mscale), float(mscale_all_dim)", "m_all, m = float(mscale), float(mscale_all_dim)",
      (YARN,)),
    M("families: YaRN get_mscale ignores mscale", "megatron_patch/models/families/common.py",
      "0.1 * mscale * math.log(scale) + 1.0", "0.1 * math.log(scale) + 1.0", (YARN_FACTOR,)),
    M("engine: MTP copy compared on the first 4096 rows only", "megatron_patch/checkpoint/engine.py",
      "for start in range(0, a.shape[0], rows_per_block):",
      "for start in range(0, min(a.shape[0], rows_per_block), rows_per_block):", (MTP_COPY,)),
    M("npu: unpermute fallback with fused / drop_and_pad swapped", "megatron_patch/runtime/npu_adapter.py",
      "routing_map, fused,\n                            drop_and_pad)",
      "routing_map, drop_and_pad,\n                            fused)", (NPU_FALLBACK,)),
    M("npu: unpermute fallback with probs / routing_map swapped", "megatron_patch/runtime/npu_adapter.py",
      "restore_shape, probs, routing_map, fused,", "restore_shape, routing_map, probs, fused,", (NPU_FALLBACK,)),
    M("npu: permute fallback with fused / drop_and_pad swapped", "megatron_patch/runtime/npu_adapter.py",
      "return original(tokens, routing_map, probs, num_out_tokens, fused, drop_and_pad)",
      "return original(tokens, routing_map, probs, num_out_tokens, drop_and_pad, fused)", (NPU_FALLBACK,)),
    M("checkpointing: RNG state not restored on resume", "megatron_patch/training/checkpointing.py",
      "    if load_rng:\n        set_rng_state(loaded[\"rng_state\"])", "    pass", (RESUME,)),
    M("compare: padded logits kept", "megatron_patch/verify/normalize.py",
      "full = gather(local, 2, tp_group, tp_size)[..., :vocab_size]",
      "full = gather(local, 2, tp_group, tp_size)", (PADDED_COMPARE,)),
    M("checkpointing: tracker written in place", "megatron_patch/checkpoint/mcore_layout.py",
      'tmp = root / (TRACKER_NAME + ".tmp")', "tmp = root / TRACKER_NAME", (TRACKER,)),
    M("hf2mcore.sh: MODEL_SIZE not passed on", "toolkits/checkpoint/hf2mcore.sh",
      '--dtype "$PR" --model-size "$MODEL_SIZE" "$@"', '--dtype "$PR" "$@"', (MODEL_SIZE,)),
    M("hf2mcore: MODEL_SIZE bound 1000x too loose", "megatron_patch/convert/hf2mcore.py",
      "if not declared / 2 <= count <= declared * 2:", "if not declared / 2e4 <= count <= declared * 2:",
      (MODEL_SIZE,)),
    # --- the routing patch, evaluate / warm-up / torch_dist load ------------------------------------------
    M("routing: router patch does not pass the group score", "megatron_patch/runtime/routing.py",
      "with group_score_topk(per_group):", "with group_score_topk(None):", (ROUTER,)),
    M("routing: group score over one expert too many", "megatron_patch/runtime/routing.py",
      "grouped.topk(group_score_topk, dim=-1)", "grouped.topk(min(group_score_topk + 1, grouped.shape[-1]), dim=-1)",
      (ROUTING,)),
    M("trainer: evaluate leaves dropout on", "megatron_patch/training/trainer.py",
      "        for c in self.chunks:\n            c.eval()", "        for c in self.chunks:\n            c.train()",
      (EVALUATE,)),
    M("trainer: evaluate divides by one batch too many", "megatron_patch/training/trainer.py",
      "return total / self.args.eval_iters", "return total / (self.args.eval_iters + 1)", (EVALUATE,)),
    M("trainer: warm-up does not restore the random state", "megatron_patch/training/trainer.py",
      "        set_rng_state(saved_rng)\n", "", (EVALUATE,)),
    M("trainer: warm-up never runs", "megatron_patch/training/trainer.py",
      "if self.iteration < args.train_iters and self.settings.warmup_steps:", "if False:", (EVALUATE,)),
    M("checkpointing: torch_dist --load loads nothing", "megatron_patch/checkpoint/chunks.py",
      "        load_dist(found.ckpt_dir, chunks, where)\n", "", (EVALUATE,)),
    M("trainer: --hidden-dropout ignored", "megatron_patch/training/trainer.py",
      'overrides["hidden_dropout"] = args.hidden_dropout', "pass", (EVALUATE,)),
    # --- conversion engine, families, compare, step, kernels ----------------------------------------------
    M("pipeline: stage and virtual chunk swapped", "megatron_patch/models/pipeline.py",
      "                return pp, vp, layer - layers.start",
      "                return vp, pp, layer - layers.start",
      (f"{SILENT}::test_layer_placement_matches_megatron_layer_offsets",)),
    M("hf2mcore: MTP copies not checked", "megatron_patch/convert/hf2mcore.py",
      "    check_hf_copies(plan, source.read)\n", "", ("tests/test_convert_errors.py", "-k", "mtp-copy")),
    M("engine: expert bias cast to the target dtype", "megatron_patch/checkpoint/engine.py",
      " or name.endswith(KEEP_DTYPE_SUFFIXES)", "", ("tests/test_convert_roundtrip.py::test_dtype_cast_and_verify",)),
    M("families: qwen2 hidden dropout 0.1", "megatron_patch/models/families/qwen2.py",
      'const("hidden_dropout", 0.0),', 'const("hidden_dropout", 0.1),', (LOSS,)),
    M("families: deepseek norm epsilon not mapped", "megatron_patch/models/families/deepseek.py",
      'field("layernorm_epsilon", "rms_norm_eps"),', 'const("layernorm_epsilon", 1e-2),', (YARN,)),
    M("families: routed_scaling_factor dropped", "megatron_patch/models/families/deepseek.py",
      'field("moe_router_topk_scaling_factor", "routed_scaling_factor", c.scaling_or_none),',
      'const("moe_router_topk_scaling_factor", None),', (YARN,)),
    M("compare: fp32 tolerance 1e4x too loose", "megatron_patch/verify/compare.py",
      '"fp32": Tolerance(atol=1e-5,', '"fp32": Tolerance(atol=1e-1,', (BROKEN,)),
    M("compare: router selection mismatch ignored", "megatron_patch/verify/compare.py",
      'row["passed"] = row["selection_mismatch"] <= tol.router_mismatch and row[metric] <= row["bound"]',
      'row["passed"] = row[metric] <= row["bound"]', (BROKEN,)),
    M("kernels: unpermute overwrites instead of summing", "megatron_patch/runtime/kernels/moe.py",
      "out.index_add_(0, sorted_indices, permuted_tokens)", "out.index_copy_(0, sorted_indices, permuted_tokens)",
      (KERNELS, "-k", "permute")),
    M("kernels: npu grouped matmul given counts, not offsets", "megatron_patch/runtime/kernels/moe.py",
      "group_list = torch.cumsum(counts, dim=0)", "group_list = counts", (KERNELS, "-k", "grouped")),
    M("kernels: rotate_half sign", "megatron_patch/runtime/kernels/rope.py",
      "return torch.cat((-second, first), dim=-1)", "return torch.cat((second, -first), dim=-1)",
      (KERNELS, "-k", "rope")),
    M("kernels: swiglu gate and up swapped", "megatron_patch/runtime/kernels/swiglu.py",
      "return F.silu(gate) * up", "return F.silu(up) * gate", (KERNELS, "-k", "swiglu")),
    M("kernels: rms_norm eps outside the root", "megatron_patch/runtime/kernels/rms_norm.py",
      "torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)", "(torch.rsqrt(h.pow(2).mean(-1, keepdim=True)) + eps)",
      (KERNELS, "-k", "rms_norm")),
    M("atomic: temporary output left behind on error", "megatron_patch/checkpoint/atomic.py",
      "            _remove(tmp)\n            disk = ", "            disk = ", (IO, "-k", "atomic")),
    M("mcore2hf: --hf-config of another model ignored next to hf_config/", "megatron_patch/checkpoint/mcore_reader.py",
      "    if config_dir == stored and hf_config_dir is not None:", "    if False:",
      (FAULTS, "-k", "another")),
    M("torchrun exit code: 2 outranks 3", "megatron_patch/training/torchrun_exit.py", "    for code in (3, 2):",
      "    for code in (2, 3):", (FAULTS, "-k", "torchrun_ends")),
    M("dist_load: no up-front check (DCP hides a refused .metadata in a traceback)",
      "megatron_patch/checkpoint/safe_load.py", "    check_dist_checkpoint(ckpt_dir)  # torch 2.13's",
      "    pass  # torch 2.13's", (FAULTS, "-k", "lora2peft_refuse")),
    M("expert LoRA: the whole factor's gradient not summed over expert TP", "megatron_patch/runtime/grouped_experts.py",
      "        return copy_to_tensor_model_parallel_region(a, group=tp_group), b", "        return a, b",
      (EXPERT_LORA, "-k", "match_single_rank")),
    M("expert LoRA: fc1's B stored as a contiguous slice, not [gate_i; up_i]",
      "megatron_patch/runtime/grouped_experts.py",
      "    if tp_axis == 0 and gated:", "    if False:",
      (EXPERT_LORA, "-k", "match_single_rank")),
    M("cpu_gemm: oneDNN's addmm_ overwrites the accumulated gradient", "megatron_patch/runtime/kernels/cpu_gemm.py",
      "            out.narrow(0, row, block.shape[0]).add_(block)", "            out.narrow(0, row, block.shape[0]).copy_(block)",
      ("tests/test_cpu_gemm.py",)),
    M("cpu_gemm: every row block of an accumulated product lands on the first rows",
      "megatron_patch/runtime/kernels/cpu_gemm.py", "            row += block.shape[0]", "            pass",
      ("tests/test_cpu_gemm.py",)),
    M("cpu attention: a GQA group's query heads overwrite each other's key/value gradients",
      "megatron_patch/runtime/kernels/cpu_attention.py",
      "        totals[kv] = part if totals[kv] is None else totals[kv].add_(part)", "        totals[kv] = part",
      ("tests/test_cpu_attention.py",)),
    M("cpu attention: the causal triangle is not masked", "megatron_patch/runtime/kernels/cpu_attention.py",
      "    if not causal:", "    if True:", ("tests/test_cpu_attention.py",)),
    M("compiled causal softmax: each query sees one key too many", "megatron_patch/runtime/kernels/cpu_native.c",
      "        int64_t n = i + 1 + offset < cols ? i + 1 + offset : cols;",
      "        int64_t n = i + 2 + offset < cols ? i + 2 + offset : cols;", ("tests/test_cpu_native.py",)),
    M("compiled transpose: the ragged edges negated", "megatron_patch/runtime/kernels/cpu_native.c",
      "            dst[j * ds + i] = src[i * ss + j];", "            dst[j * ds + i] = -src[i * ss + j];",
      ("tests/test_cpu_native.py",)),
    M("compiled SwiGLU backward: the up half's gradient scaled by the slope, not by silu",
      "megatron_patch/runtime/kernels/cpu_native.c", "_mm512_mask_storeu_ps(dup + j, k, _mm512_mul_ps(d, act));",
      "_mm512_mask_storeu_ps(dup + j, k, _mm512_mul_ps(d, slope));", ("tests/test_cpu_native.py",)),
    M("compiled weighted SwiGLU backward: the router probability left out of x's gradient",
      "megatron_patch/runtime/kernels/cpu_native.c", "d = _mm512_mul_ps(raw, prob);", "d = raw;",
      ("tests/test_cpu_native.py",)),
    M("compiled GEMM: each block of the contraction after the first overwrites C instead of adding to it",
      "megatron_patch/runtime/kernels/cpu_native.c", "nc - j0 < GEMM_NR ? nc - j0 : GEMM_NR, accumulate || p0 > 0);",
      "nc - j0 < GEMM_NR ? nc - j0 : GEMM_NR, accumulate);", ("tests/test_cpu_native.py",)),
    M("compiled GEMM: a row-major left operand's fifth row read from its fourth",
      "megatron_patch/runtime/kernels/cpu_native.c", "FMA_ROW(4, r3[ars + p])", "FMA_ROW(4, r3[p])",
      ("tests/test_cpu_native.py",)),
    M("lean CPU linear: the weight gradient added to main_grad without telling DDP (it adds the placeholder too)",
      "megatron_patch/runtime/cpu_linear.py", "                weight.grad_added_to_main_grad = True",
      "                pass", ("tests/test_cpu_linear.py",)),
    M("lean CPU linear: main_grad overwritten instead of accumulated", "megatron_patch/runtime/cpu_linear.py",
      "            PortableWgradAccumulation.wgrad_gemm_accum_fp32(input_2d, grad_2d, weight.main_grad)",
      "            weight.main_grad.copy_(cpu_gemm.mm(grad_2d.t(), input_2d))", ("tests/test_cpu_linear.py",)),
    M("expert LoRA: the whole factor counted on every expert-TP rank in the grad norm", "megatron_patch/models/lora.py",
      "    whole.shared = tp_rank != 0", "    pass", (EXPERT_LORA, "-k", "match_single_rank")),
]
