#!/bin/bash
# Qwen2 / Qwen2.5 LoRA fine-tuning (seed 002) with the difficulty curriculum, on megatron-core, with
# Pai-Megatron-Patch's positional arguments (the 27 of examples/common/pai_args.sh; SFT must be true and
# DATASET_PATH a prefix written by `megatron-patch preprocess --sft`). Multi-node: MASTER_ADDR, MASTER_PORT,
# NNODES, NODE_RANK (and GPUS_PER_NODE) as for the other launchers.
# Environment: LORA_RANK (16), LORA_ALPHA (32), LORA_DROPOUT (0), LORA_TARGET (the seven Qwen projections),
# CURRICULUM (true|false, default true), CURRICULUM_SEED (42), CURRICULUM_STAGES (default 0-30:80/20/0,
# 30-70:40/40/20,70-100:25/35/40), PACK (true|false, default false: several samples per sequence).
# The per-stage level counts go to OUTPUT_BASEPATH/curriculum_report.json.
# Afterwards: megatron-patch convert lora2peft --mcore-path OUTPUT_BASEPATH/checkpoint/<name> --hf-config HF --out DIR
set -euo pipefail
FAMILY=qwen2 MOE=false MLA=false SIZES="32B=64"
source "$(dirname "${BASH_SOURCE[0]}")/../common/pai_args.sh"
(( $# == 27 )) || pai_launch "$@"  # prints the argument list and fails
[[ "${18}" == true ]] || pai_fail "SFT=${18}: this script fine-tunes; pass SFT=true (and data from preprocess --sft)"
extra="--lora-rank ${LORA_RANK:-16} --lora-alpha ${LORA_ALPHA:-32} --lora-dropout ${LORA_DROPOUT:-0}"
extra+=" --lora-target ${LORA_TARGET:-q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj}"
if [[ "${PACK:-false}" == true ]]; then extra+=" --pack"; fi
if [[ "${CURRICULUM:-true}" == true ]]; then
    extra+=" --curriculum --curriculum-seed ${CURRICULUM_SEED:-42} --curriculum-report ${27}/curriculum_report.json"
    [[ -z "${CURRICULUM_STAGES:-}" ]] || extra+=" --curriculum-stages $CURRICULUM_STAGES"
fi
EXTRA_ARGS="$extra ${EXTRA_ARGS:-}" pai_launch "$@"
